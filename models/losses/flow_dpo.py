"""Flow-DPO: DPO for rectified-flow (velocity-prediction) video models.

VideoAlign, "Improving Video Generation with Human Feedback" (arXiv 2501.13918),
§Flow-DPO; DPO itself is Rafailov et al. 2023 (arXiv 2305.18290).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.losses.common import PreferenceLossOutput, check_positive, preference_margin, preference_output

BETA_SCHEDULES = ("constant", "one_minus_t_sq")


def beta_at(beta: float, t: torch.Tensor | None, beta_schedule: str, batch: int) -> torch.Tensor:
    """β_t for each pair: `β` ("constant", the default) or `β·(1-t)²` ("one_minus_t_sq").

    `β(1-t)²` is what the ε-space derivation gives; VideoAlign keeps constant β because the
    t-dependent one reward-hacks (motion wins rise, text alignment and VBench fall). Kept for
    ablation; it needs `t` (B,) in [0, 1].
    """
    check_positive("beta", beta)
    if beta_schedule == "constant":
        return torch.tensor(float(beta))
    if beta_schedule != "one_minus_t_sq":
        raise ValueError(f"unknown `beta_schedule` {beta_schedule!r}; valid: {', '.join(map(repr, BETA_SCHEDULES))}")
    if t is None:
        raise ValueError("`beta_schedule='one_minus_t_sq'` needs the pairs' times: pass `t` of shape (B,)")
    if not isinstance(t, torch.Tensor) or t.shape != (batch,):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"`t` has shape {shape} but the errors have shape ({batch},); pass one time per pair, shape ({batch},)"
        )
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError(f"`t` must lie in [0, 1]; got min {float(t.min())}, max {float(t.max())}")
    return float(beta) * (1 - t.detach().float()) ** 2


def flow_dpo_loss(
    e_w: torch.Tensor,
    e_l: torch.Tensor,
    e_w_ref: torch.Tensor,
    e_l_ref: torch.Tensor,
    beta: float,
    t: torch.Tensor | None = None,
    beta_schedule: str = "constant",
) -> PreferenceLossOutput:
    """Flow-DPO loss from per-pair velocity errors.

    ```
    Δ   = (e_w - e_w_ref) - (e_l - e_l_ref)
    L   = -log σ( -(β_t / 2) · Δ )            (computed with logsigmoid)
    β_t = β   or   β·(1-t)²   (beta_schedule="one_minus_t_sq", needs t)
    ```

    Inputs are (B,) errors `e = mean over C·F·H·W of |v - v_θ(x_t, t, y)|²` with one shared t and
    ε per pair (`pair_errors`). Reduction: per-sample **mean** over elements, loss **mean** over
    pairs. β is therefore a β for mean-reduced errors: the paper's β=500 was used with sum
    reduction, i.e. β=500·(C·F·H·W) here.

    Signs: lower error = higher likelihood, so Δ < 0 when the policy improved the winner more
    than the loser relative to the reference; then `inside = -(β_t/2)·Δ > 0` and the loss falls
    below log 2. The reference errors are detached (no gradient reaches the reference). `t` is
    ignored when `beta_schedule="constant"`.
    """
    # 1. check inputs; Δ with the reference's errors held constant
    delta = preference_margin(e_w, e_l, e_w_ref, e_l_ref)
    beta_t = beta_at(beta, t, beta_schedule, delta.shape[0])
    # 2. Bradley-Terry likelihood of the observed preference, with implicit reward -(β_t/2)·e
    inside = -(beta_t / 2) * delta
    per_pair = -F.logsigmoid(inside)
    return preference_output(per_pair, inside, e_w, e_l, e_w_ref, e_l_ref)
