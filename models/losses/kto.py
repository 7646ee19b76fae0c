"""KTO for diffusion/flow errors: pointwise (desirable / undesirable) labels instead of pairs.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
(arXiv 2402.01306); used for video by IPO, "Iterative Preference Optimization" (arXiv 2502.02088)
when a critic labels single videos.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.losses.common import check_errors, check_non_negative, check_positive

ReduceMean = Callable[[torch.Tensor], torch.Tensor]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the workers of the default process group (a detached copy).

    The mean of per-worker means equals the global mean when every worker holds the same
    batch size, as under DDP with `drop_last`.
    """
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()


def _default_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        return all_reduce_mean(x)
    return x


@dataclass(frozen=True)
class KTOLossOutput:
    """What `kto_loss` returns; everything but `loss` and `per_sample` is detached.

    - `loss`: scalar, mean of `per_sample` over the batch.
    - `per_sample`: (B,) loss of each sample.
    - `reward`: (B,) implicit reward `g = e_ref - e_θ`.
    - `reference_point`: scalar `z = max(0, mean(g))` after the cross-worker reduction.
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    reward: torch.Tensor
    reference_point: torch.Tensor


def kto_loss(
    e_theta: torch.Tensor,
    e_ref: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    reduce_mean: ReduceMean | None = None,
) -> KTOLossOutput:
    """KTO loss from per-sample errors of the policy and the reference.

    ```
    g = e_ref - e_θ                                  (> 0: the policy fits the video better)
    z = max(0, mean_batch(g)), detached              (reference point)
    L = λ_y · (1 - σ(s_y · β · (g - z)))             s_y = +1 desirable, -1 undesirable
    ```

    λ_y is `lambda_d` for desirable and `lambda_u` for undesirable samples (KTO's 1.0 each;
    raise the rarer class's weight when the labels are imbalanced). Inputs are (B,) errors
    `e = mean over C·F·H·W of |v - v(x_t, t, y)|²` with the policy and the reference sharing t and
    ε per sample; `desirable` is a bool tensor (B,). Reduction: per-sample **mean** over elements
    (β is for that reduction), loss **mean** over the batch. The reference errors and z are
    detached.

    `reduce_mean(tensor) -> tensor` turns the local batch mean of g into the mean over all
    workers before clamping, so every worker uses the same z. By default it is the identity,
    unless `torch.distributed` is initialised, in which case it is `all_reduce_mean` (which
    assumes equal per-worker batch sizes). Pass `reduce_mean=lambda x: x` to keep z local.
    """
    # 1. check inputs
    check_errors(e_theta=e_theta, e_ref=e_ref)
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        kind = desirable.dtype if isinstance(desirable, torch.Tensor) else type(desirable).__name__
        raise TypeError(
            f"`desirable` must be a bool torch.Tensor of shape (B,), got {kind}; convert labels with `labels == 1`"
        )
    if desirable.shape != e_theta.shape:
        raise ValueError(
            f"`desirable` has shape {tuple(desirable.shape)} but `e_theta` has shape {tuple(e_theta.shape)}; "
            "pass one label per sample"
        )
    check_positive("beta", beta)
    check_non_negative("lambda_d", lambda_d)
    check_non_negative("lambda_u", lambda_u)

    # 2. implicit reward of each sample; the reference is a constant
    g = e_ref.detach().float() - e_theta.float()

    # 3. reference point: batch mean over all workers, clamped at 0, never differentiated
    reduce = _default_reduce_mean if reduce_mean is None else reduce_mean
    z = torch.as_tensor(reduce(g.detach().mean())).detach().float().clamp(min=0)
    if z.numel() != 1:
        raise ValueError(f"`reduce_mean` returned shape {tuple(z.shape)}; it must return the scalar mean it was given")
    z = z.reshape(()).to(g.device)

    # 4. value of each sample relative to the reference point
    desirable = desirable.to(g.device)
    sign = torch.where(desirable, 1.0, -1.0).to(g.device)
    weight = torch.where(desirable, float(lambda_d), float(lambda_u)).to(g.device)
    per_sample = weight * (1 - torch.sigmoid(sign * float(beta) * (g - z)))
    return KTOLossOutput(loss=per_sample.mean(), per_sample=per_sample, reward=g.detach(), reference_point=z)
