"""Flow-RWR: reward-weighted regression with the rectified-flow error (a baseline).

Reward-weighted regression, Peters & Schaal 2007 ("Reinforcement learning by reward-weighted
regression for operational space control", ICML); used for text-to-image by Lee et al. 2023
(arXiv 2302.12192) and as the Flow-RWR baseline of VideoAlign (arXiv 2501.13918).
"""

from __future__ import annotations

import torch

from models.losses.common import check_errors, check_positive


def rwr_weights(rewards: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """`w = softmax(r / τ)` over the batch: exponential weights `exp(r/τ)` normalised to sum to 1.

    Normalising over the batch (our choice; ALGORITHMS.md §2) makes the loss scale independent of
    the reward offset. τ > 0: small τ concentrates the weight on the best sample. Detached.
    """
    check_errors(rewards=rewards)
    check_positive("tau", tau)
    return torch.softmax(rewards.detach().float() / float(tau), dim=0)


def rwr_loss(errors: torch.Tensor, rewards: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Flow-RWR loss, a scalar.

    ```
    w_i = exp(r_i / τ) / Σ_j exp(r_j / τ)            (batch-normalised, sums to 1)
    L   = Σ_i w_i · e_i  =  mean_i(B · w_i · e_i)
    ```

    `errors` (B,) are `e = mean over C·F·H·W of |v - v_θ(x_t, t, y)|²` (per-sample **mean**),
    `rewards` (B,) the critic's scores (higher is better; no gradient). With equal rewards this is
    the plain flow-matching loss mean(e).
    """
    check_errors(errors=errors, rewards=rewards)
    return (rwr_weights(rewards, tau) * errors.float()).sum()
