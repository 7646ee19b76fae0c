"""Diffusion-DPO: DPO for ε-prediction diffusion models.

Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization"
(arXiv 2311.12908). The equation is Flow-DPO's with ε-errors in place of velocity errors, so this
file only fixes the constant β and delegates to `flow_dpo_loss`.
"""

from __future__ import annotations

import torch

from models.losses.common import PreferenceLossOutput
from models.losses.flow_dpo import flow_dpo_loss

PAPER_BETA = 5000.0
"""β of the paper (SD1.5/SDXL, per-sample mean errors) in our `-(β/2)·Δ` convention. diffusers'
`train_diffusion_dpo.py` writes `logsigmoid(-β'·Δ)` with β'=2500: the ½ folded in, same value."""


def diffusion_dpo_loss(
    e_w: torch.Tensor,
    e_l: torch.Tensor,
    e_w_ref: torch.Tensor,
    e_l_ref: torch.Tensor,
    beta: float,
) -> PreferenceLossOutput:
    """Diffusion-DPO loss from per-pair ε-prediction errors.

    ```
    e   = mean over elements of |ε - ε_θ(x_t, t, y)|²     (likewise e_ref with the reference)
    Δ   = (e_w - e_w_ref) - (e_l - e_l_ref)
    L   = -log σ( -(β / 2) · Δ )
    ```

    The paper's `T·ω(λ_t)` factor (ω constant in practice) is folded into β. Reduction: per-sample **mean** over elements, loss **mean** over pairs; the
    paper's β = 5000 (`PAPER_BETA`) is for that reduction (diffusers' 2500 has the ½ folded in).
    Signs and outputs as `flow_dpo_loss`: Δ < 0 (winner improved more) gives `inside > 0`; the
    reference errors are detached.
    """
    return flow_dpo_loss(e_w, e_l, e_w_ref, e_l_ref, beta, beta_schedule="constant")
