"""SFT on winners (a baseline) and the flow-matching regularisers of IPO and PhysHPO.

Rectified-flow matching (Liu et al. 2022, arXiv 2209.03003); the regularisers follow IPO
(arXiv 2502.02088) and PhysHPO (arXiv 2508.10858).
"""

from __future__ import annotations

import torch

from models.losses.common import check_errors, check_non_negative


def sft_loss(e_w: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss on the winners only: `L = mean_i(e_w,i)`, a scalar.

    `e_w` (B,) are `e = mean over C·F·H·W of |v - v_θ(x_t, t, y)|²` (per-sample **mean**); the
    losers are not used.
    """
    check_errors(e_w=e_w)
    return e_w.float().mean()


def regularised(
    loss: torch.Tensor,
    e_winners: torch.Tensor | None = None,
    lambda1: float = 0.0,
    e_real: torch.Tensor | None = None,
    lambda2: float = 0.0,
) -> torch.Tensor:
    """`L + λ1 · mean(e_winners) + λ2 · mean(e_real)`.

    Keeps the policy a good generator of the preferred and of real videos while the preference
    loss moves it (IPO's real-video regulariser, PhysHPO's). Errors are per-sample **means**
    (B,) of the flow-matching error; λ = 0 switches a term off, a λ > 0 needs its errors.
    """
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"`loss` must be a scalar tensor, got {shape}; pass e.g. `flow_dpo_loss(...).loss`")
    total = loss
    terms = (("e_winners", e_winners, "lambda1", lambda1), ("e_real", e_real, "lambda2", lambda2))
    for name, errors, lam_name, lam in terms:
        check_non_negative(lam_name, lam)
        if errors is None:
            if lam > 0:
                raise ValueError(f"`{lam_name}={lam}` but `{name}` is None; pass the errors or set `{lam_name}=0`")
            continue
        check_errors(**{name: errors})
        total = total + float(lam) * errors.float().mean()
    return total
