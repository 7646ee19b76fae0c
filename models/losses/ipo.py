"""IPO-style squared preference loss on diffusion/flow errors.

Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
(arXiv 2310.12036), with the log-likelihood ratio replaced by the error margin as in Diffusion-DPO.
Not to be confused with IPO the iterative video loop (arXiv 2502.02088), which uses DPO or KTO.
"""

from __future__ import annotations

import torch

from models.losses.common import PreferenceLossOutput, check_positive, preference_margin, preference_output


def ipo_loss(
    e_w: torch.Tensor,
    e_l: torch.Tensor,
    e_w_ref: torch.Tensor,
    e_l_ref: torch.Tensor,
    beta: float,
) -> PreferenceLossOutput:
    """IPO loss: regress the margin to a fixed target instead of pushing it to infinity.

    ```
    Δ = (e_w - e_w_ref) - (e_l - e_l_ref)
    h = -Δ
    L = (h - 1/(2β))²
    ```

    Reduction: per-sample **mean** errors, loss **mean** over pairs. With mean-reduced errors h is
    small (differences of per-element MSEs), so β must be large for the target 1/(2β) to be of
    h's size. Signs: h > 0 when the policy improved the winner more than the loser relative to
    the reference. `inside` is reported as `-(β/2)·Δ = (β/2)·h`, as for DPO, so logs compare; the
    reference errors are detached.
    """
    # 1. check inputs; Δ with the reference's errors held constant
    delta = preference_margin(e_w, e_l, e_w_ref, e_l_ref)
    check_positive("beta", beta)
    # 2. squared distance of the margin from its target
    h = -delta
    per_pair = (h - 1 / (2 * float(beta))) ** 2
    inside = (float(beta) / 2) * h
    return preference_output(per_pair, inside, e_w, e_l, e_w_ref, e_l_ref)
