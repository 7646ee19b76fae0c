"""Preference losses: expected values derived by hand in each docstring (torchtune's DPO test style).

σ values used below: σ(0.2) = 0.549834, so -log σ(0.2) = log(1 + e^-0.2) = 0.598139 and
σ(-0.2) = 0.450166; σ(0.15) = 0.537430, so 1 - σ(0.15) = 0.462570.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from models.losses import (
    PAPER_BETA,
    PreferenceLossOutput,
    boundary_anchored,
    diffusion_dpo_loss,
    flow_dpo_loss,
    frame_mask_errors,
    hierarchical_loss,
    ipo_loss,
    kto_loss,
    mask_prompt,
    motion_errors,
    pair_errors,
    regularised,
    rwr_loss,
    rwr_weights,
    sft_loss,
    temporal_difference,
    weighted_negatives,
)

HAND_LOSS = math.log1p(math.exp(-0.2))  # -log σ(0.2) = 0.598139
SIGMA_MINUS_02 = 1 / (1 + math.exp(0.2))  # σ(-0.2) = 0.450166


def tensors(*values: float) -> list[torch.Tensor]:
    """One (1,) float tensor per value: a single pair."""
    return [torch.tensor([v]) for v in values]


def hand_pair() -> list[torch.Tensor]:
    """e_w=0.2, e_l=0.5, e_w_ref=0.3, e_l_ref=0.4: Δ = (0.2-0.3) - (0.5-0.4) = -0.2."""
    return tensors(0.2, 0.5, 0.3, 0.4)


class TestFlowDPOLoss:
    def test_hand_value(self):
        """β=2: Δ = -0.2, inside = -(2/2)·(-0.2) = 0.2, L = -log σ(0.2) = 0.598139; accuracy 1."""
        out = flow_dpo_loss(*hand_pair(), beta=2.0)
        assert isinstance(out, PreferenceLossOutput)
        torch.testing.assert_close(out.inside, torch.tensor([0.2]))
        torch.testing.assert_close(out.loss, torch.tensor(HAND_LOSS))
        torch.testing.assert_close(out.per_pair, torch.tensor([HAND_LOSS]))
        assert out.loss.ndim == 0
        assert float(out.implicit_accuracy) == 1.0
        for name, value in (("e_w", 0.2), ("e_l", 0.5), ("e_w_ref", 0.3), ("e_l_ref", 0.4)):
            torch.testing.assert_close(getattr(out, name), torch.tensor(value))

    def test_sign_convention(self):
        """Lowering the winner's error (0.2 → 0.1) or raising the loser's (0.5 → 0.6) makes Δ more
        negative, inside larger, the loss smaller; no change (Δ = 0) gives log 2."""
        base = float(flow_dpo_loss(*hand_pair(), beta=2.0).loss)
        better_winner = float(flow_dpo_loss(*tensors(0.1, 0.5, 0.3, 0.4), beta=2.0).loss)
        worse_loser = float(flow_dpo_loss(*tensors(0.2, 0.6, 0.3, 0.4), beta=2.0).loss)
        assert better_winner < base and worse_loser < base
        same_as_ref = flow_dpo_loss(*tensors(0.3, 0.4, 0.3, 0.4), beta=2.0)
        assert float(same_as_ref.loss) == pytest.approx(math.log(2))

    def test_beta_schedule_one_minus_t_sq(self):
        """β=8, t=0.5: β_t = 8·(1-0.5)² = 8/4 = 2, so the hand value 0.598139 again; at t=0 β_t = 8:
        inside = -(8/2)·(-0.2) = 0.8. The constant schedule ignores t."""
        e = hand_pair()
        out = flow_dpo_loss(*e, beta=8.0, t=torch.tensor([0.5]), beta_schedule="one_minus_t_sq")
        torch.testing.assert_close(out.inside, torch.tensor([0.2]))
        torch.testing.assert_close(out.loss, torch.tensor(HAND_LOSS))
        at_zero = flow_dpo_loss(*e, beta=8.0, t=torch.tensor([0.0]), beta_schedule="one_minus_t_sq")
        torch.testing.assert_close(at_zero.inside, torch.tensor([0.8]))
        constant = flow_dpo_loss(*e, beta=8.0, t=torch.tensor([0.5]))
        torch.testing.assert_close(constant.inside, torch.tensor([0.8]))

    def test_beta_schedule_needs_t(self):
        with pytest.raises(ValueError, match="pass `t`"):
            flow_dpo_loss(*hand_pair(), beta=8.0, beta_schedule="one_minus_t_sq")

    def test_exact_zero_counts_half(self):
        """Four pairs: Δ = 0 exactly (errors equal the reference's) → ½; the hand pair → 1; the hand
        pair with winner and loser swapped (Δ = +0.2, inside -0.2) → 0; the hand pair → 1.
        Accuracy (½ + 1 + 0 + 1) / 4 = 0.625."""
        e_w = torch.tensor([0.3, 0.2, 0.5, 0.2])
        e_l = torch.tensor([0.4, 0.5, 0.2, 0.5])
        e_w_ref = torch.tensor([0.3, 0.3, 0.4, 0.3])
        e_l_ref = torch.tensor([0.4, 0.4, 0.3, 0.4])
        out = flow_dpo_loss(e_w, e_l, e_w_ref, e_l_ref, beta=2.0)
        assert float(out.inside[0]) == 0.0
        assert float(out.implicit_accuracy) == pytest.approx(0.625)

    def test_gradient_reaches_policy_errors_only(self):
        """The reference errors are detached. dL/de_w = (β/2)·σ(-inside) = 1·σ(-0.2) = 0.450166 and
        dL/de_l = -0.450166 (β=2, one pair)."""
        e_w, e_l, e_w_ref, e_l_ref = (x.requires_grad_() for x in hand_pair())
        flow_dpo_loss(e_w, e_l, e_w_ref, e_l_ref, beta=2.0).loss.backward()
        assert e_w_ref.grad is None and e_l_ref.grad is None
        torch.testing.assert_close(e_w.grad, torch.tensor([SIGMA_MINUS_02]))
        torch.testing.assert_close(e_l.grad, torch.tensor([-SIGMA_MINUS_02]))

    def test_logsigmoid_is_stable_for_large_margins(self):
        """inside = -(5000/2)·Δ with Δ = ±1 is ±2500: the loss is 0 and 2500, not inf or nan."""
        out = flow_dpo_loss(*[torch.tensor(v) for v in ([0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0])], beta=5000.0)
        torch.testing.assert_close(out.per_pair, torch.tensor([0.0, 2500.0]))

    def test_invalid_inputs(self):
        e_w, e_l, e_w_ref, e_l_ref = hand_pair()
        with pytest.raises(ValueError, match=r"`e_l` has shape \(2,\) but `e_w` has shape \(1,\)"):
            flow_dpo_loss(e_w, torch.tensor([0.5, 0.5]), e_w_ref, e_l_ref, beta=2.0)
        with pytest.raises(ValueError, match=r"shape \(1, 1\).*flatten\(1\)\.mean\(1\)"):
            flow_dpo_loss(e_w.view(1, 1), e_l, e_w_ref, e_l_ref, beta=2.0)
        for beta in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="`beta` must be a finite number > 0"):
                flow_dpo_loss(e_w, e_l, e_w_ref, e_l_ref, beta=beta)
        with pytest.raises(ValueError, match="'constant', 'one_minus_t_sq'"):
            flow_dpo_loss(e_w, e_l, e_w_ref, e_l_ref, beta=2.0, beta_schedule="linear")
        with pytest.raises(ValueError, match=r"`t` has shape \(2,\)"):
            flow_dpo_loss(e_w, e_l, e_w_ref, e_l_ref, beta=2.0, t=torch.rand(2), beta_schedule="one_minus_t_sq")


class TestDiffusionDPOLoss:
    def test_equals_flow_dpo_for_the_same_errors(self):
        g = torch.Generator().manual_seed(0)
        e = [torch.rand(5, generator=g) for _ in range(4)]
        diffusion = diffusion_dpo_loss(*e, beta=PAPER_BETA)
        flow = flow_dpo_loss(*e, beta=PAPER_BETA)
        for name in PreferenceLossOutput.__dataclass_fields__:
            torch.testing.assert_close(getattr(diffusion, name), getattr(flow, name))

    def test_hand_value_and_paper_beta(self):
        """β=2 on the hand pair gives 0.598139; the paper's β is 5000 (diffusers' 2500 has the ½ in)."""
        torch.testing.assert_close(diffusion_dpo_loss(*hand_pair(), beta=2.0).loss, torch.tensor(HAND_LOSS))
        assert PAPER_BETA == 5000.0


class TestIPOLoss:
    def test_hand_value(self):
        """Hand pair, β=2: h = -Δ = 0.2, target 1/(2·2) = 0.25, L = (0.2 - 0.25)² = 0.0025;
        inside = (β/2)·h = 0.2."""
        out = ipo_loss(*hand_pair(), beta=2.0)
        torch.testing.assert_close(out.loss, torch.tensor(0.0025))
        torch.testing.assert_close(out.inside, torch.tensor([0.2]))
        assert float(out.implicit_accuracy) == 1.0

    def test_minimum_at_target_and_ref_detached(self):
        """e_w = 0.25 against e_w_ref = 0.5, loser unchanged: Δ = -0.25, h = 0.25 = 1/(2·2), L = 0."""
        e_w, e_l, e_w_ref, e_l_ref = (x.requires_grad_() for x in tensors(0.25, 0.5, 0.5, 0.5))
        out = ipo_loss(e_w, e_l, e_w_ref, e_l_ref, beta=2.0)
        assert float(out.loss.detach()) == 0.0
        out.loss.backward()
        assert e_w_ref.grad is None and e_l_ref.grad is None and e_w.grad is not None


class TestKTOLoss:
    def test_hand_value(self):
        """β=1, e_ref = [0.5, 0.5], e_θ = [0.3, 0.6]: g = [0.2, -0.1], z = max(0, 0.05) = 0.05.
        Desirable: 1 - σ(+1·(0.2 - 0.05)) = 1 - σ(0.15) = 0.462570; undesirable:
        1 - σ(-1·(-0.1 - 0.05)) = 1 - σ(0.15) = 0.462570; mean 0.462570."""
        out = kto_loss(torch.tensor([0.3, 0.6]), torch.tensor([0.5, 0.5]), torch.tensor([True, False]), beta=1.0)
        expected = 1 - 1 / (1 + math.exp(-0.15))
        torch.testing.assert_close(out.reward, torch.tensor([0.2, -0.1]))
        torch.testing.assert_close(out.reference_point, torch.tensor(0.05))
        torch.testing.assert_close(out.per_sample, torch.tensor([expected, expected]))
        torch.testing.assert_close(out.loss, torch.tensor(expected))

    def test_lambda_weights(self):
        """λ_D=2, λ_U=0.5 scale the two samples of the hand case: [2·0.462570, 0.5·0.462570]."""
        out = kto_loss(
            torch.tensor([0.3, 0.6]),
            torch.tensor([0.5, 0.5]),
            torch.tensor([True, False]),
            beta=1.0,
            lambda_d=2.0,
            lambda_u=0.5,
        )
        expected = 1 - 1 / (1 + math.exp(-0.15))
        torch.testing.assert_close(out.per_sample, torch.tensor([2 * expected, 0.5 * expected]))

    def test_reference_point_clamped_at_zero(self):
        """e_θ = [0.6, 0.7], e_ref = [0.5, 0.5]: g = [-0.1, -0.2], mean -0.15 < 0 → z = 0."""
        out = kto_loss(torch.tensor([0.6, 0.7]), torch.tensor([0.5, 0.5]), torch.tensor([True, True]), beta=1.0)
        assert float(out.reference_point) == 0.0
        expected = [1 - 1 / (1 + math.exp(0.1)), 1 - 1 / (1 + math.exp(0.2))]
        torch.testing.assert_close(out.per_sample, torch.tensor(expected))

    def test_reference_point_detached_and_ref_errors_get_no_gradient(self):
        """With z constant, dL/de_θ,i = (1/B)·λ·s_i·β·σ(u_i)·(1-σ(u_i)), u_i = s_i·β·(g_i - z).
        Both samples desirable, so a z that carried gradient would add -(1/B)·Σ_j dL/dz ≠ 0."""
        e_theta = torch.tensor([0.3, 0.45], requires_grad=True)
        e_ref = torch.tensor([0.5, 0.5], requires_grad=True)
        out = kto_loss(e_theta, e_ref, torch.tensor([True, True]), beta=3.0)
        assert not out.reference_point.requires_grad
        out.loss.backward()
        assert e_ref.grad is None
        u = 3.0 * (torch.tensor([0.2, 0.05]) - 0.125)
        torch.testing.assert_close(e_theta.grad, 0.5 * 3.0 * torch.sigmoid(u) * (1 - torch.sigmoid(u)))

    def test_reduce_hook_is_called(self):
        """The hook gets the local batch mean of g (0.05) and its result (0.3 here, as if other
        workers had larger rewards) is the reference point."""
        calls = []

        def reduce_mean(x):
            calls.append(x.clone())
            return torch.tensor(0.3)

        out = kto_loss(
            torch.tensor([0.3, 0.6]),
            torch.tensor([0.5, 0.5]),
            torch.tensor([True, False]),
            beta=1.0,
            reduce_mean=reduce_mean,
        )
        assert len(calls) == 1
        torch.testing.assert_close(calls[0], torch.tensor(0.05))
        torch.testing.assert_close(out.reference_point, torch.tensor(0.3))

    def test_invalid_labels(self):
        with pytest.raises(TypeError, match="bool"):
            kto_loss(torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([1.0]), beta=1.0)
        with pytest.raises(ValueError, match=r"`desirable` has shape \(2,\) but `e_theta` has shape \(1,\)"):
            kto_loss(torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([True, False]), beta=1.0)


class TestRWRLoss:
    def test_hand_value(self):
        """r = [0, log 3], τ=1: w = [1/(1+3), 3/(1+3)] = [0.25, 0.75]; e = [0.4, 0.8]:
        L = 0.25·0.4 + 0.75·0.8 = 0.1 + 0.6 = 0.7 = mean(2·w·e) = (0.2 + 1.2)/2."""
        rewards, errors = torch.tensor([0.0, math.log(3)]), torch.tensor([0.4, 0.8])
        w = rwr_weights(rewards)
        torch.testing.assert_close(w, torch.tensor([0.25, 0.75]))
        torch.testing.assert_close(rwr_loss(errors, rewards), torch.tensor(0.7))
        torch.testing.assert_close(rwr_loss(errors, rewards), (2 * w * errors).mean())

    def test_weights_are_softmax_over_tau_and_sum_to_one(self):
        """τ=2 with r = [0, 2·log 3] gives the same [0.25, 0.75]; any batch sums to 1."""
        torch.testing.assert_close(
            rwr_weights(torch.tensor([0.0, 2 * math.log(3)]), tau=2.0), torch.tensor([0.25, 0.75])
        )
        r = torch.randn(7, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(rwr_weights(r, tau=0.5), torch.softmax(r / 0.5, dim=0))
        assert float(rwr_weights(r, tau=0.5).sum()) == pytest.approx(1.0)
        with pytest.raises(ValueError, match="`tau`"):
            rwr_weights(r, tau=0.0)


class TestSFTAndRegularisers:
    def test_sft_is_mean_of_winner_errors(self):
        torch.testing.assert_close(sft_loss(torch.tensor([0.2, 0.4])), torch.tensor(0.3))

    def test_regularised_hand_value(self):
        """1.0 + 0.5·mean([0.2, 0.4]) + 2·mean([0.1]) = 1 + 0.15 + 0.2 = 1.35; λ=0 terms vanish."""
        total = regularised(torch.tensor(1.0), torch.tensor([0.2, 0.4]), 0.5, torch.tensor([0.1]), 2.0)
        torch.testing.assert_close(total, torch.tensor(1.35))
        torch.testing.assert_close(regularised(torch.tensor(1.0)), torch.tensor(1.0))

    def test_regulariser_needs_its_errors(self):
        with pytest.raises(ValueError, match="`lambda2=1.0` but `e_real` is None"):
            regularised(torch.tensor(1.0), lambda2=1.0)


class TestPairErrors:
    def test_shared_t_and_noise_and_hand_value(self):
        """One pair of 2-frame 1×1 videos: x_w = 1, x_l = 0, ε = 2, t = 0.5, and a velocity_fn that
        records its inputs and predicts 0. x_t^w = 0.5·1 + 0.5·2 = 1.5, x_t^l = 0.5·0 + 0.5·2 = 1.0;
        e_w = (0 - (2 - 1))² = 1, e_l = (0 - (2 - 0))² = 4. Both calls get the same t, and
        ε recovered as (x_t - (1-t)·x0)/t is the same for both."""
        seen = []

        def velocity_fn(x_t, t, cond):
            seen.append((x_t.clone(), t.clone(), cond))
            return torch.zeros_like(x_t)

        x_w, x_l, noise = torch.ones(1, 1, 2, 1, 1), torch.zeros(1, 1, 2, 1, 1), torch.full((1, 1, 2, 1, 1), 2.0)
        t = torch.tensor([0.5])
        e_w, e_l = pair_errors(velocity_fn, x_w, x_l, t, noise, cond="a ball falls")
        torch.testing.assert_close(e_w, torch.tensor([1.0]))
        torch.testing.assert_close(e_l, torch.tensor([4.0]))
        (xt_w, t_w, cond_w), (xt_l, t_l, cond_l) = seen
        torch.testing.assert_close(xt_w, torch.full_like(x_w, 1.5))
        torch.testing.assert_close(xt_l, torch.full_like(x_l, 1.0))
        assert torch.equal(t_w, t_l) and cond_w == cond_l == "a ball falls"

        def recovered_noise(x_t, x0, t):
            tb = t.view(-1, 1, 1, 1, 1)
            return (x_t - (1 - tb) * x0) / tb

        torch.testing.assert_close(recovered_noise(xt_w, x_w, t_w), recovered_noise(xt_l, x_l, t_l))

    def test_shared_per_pair_in_a_random_batch(self):
        g = torch.Generator().manual_seed(0)
        x_w, x_l, noise = (torch.randn(3, 2, 4, 3, 3, generator=g) for _ in range(3))
        t = torch.tensor([0.1, 0.5, 0.9])
        seen = []

        def velocity_fn(x_t, t_in, cond):
            seen.append((x_t, t_in))
            return torch.zeros_like(x_t)

        pair_errors(velocity_fn, x_w, x_l, t, noise, cond=None)
        (xt_w, t_w), (xt_l, t_l) = seen
        tb = t.view(-1, 1, 1, 1, 1)
        assert torch.equal(t_w, t) and torch.equal(t_l, t)
        torch.testing.assert_close((xt_w - (1 - tb) * x_w) / tb, noise)
        torch.testing.assert_close((xt_l - (1 - tb) * x_l) / tb, noise)

    def test_first_frame_exclusion(self):
        """An oracle velocity (ε - x_t)/(1-t) = ε - x0, wrong by +3 on frame 0 only, 3 frames:
        with frame 0 the error is 3²/3 = 3, without it 0."""
        g = torch.Generator().manual_seed(1)
        x_w, x_l, noise = (torch.randn(2, 1, 3, 2, 2, generator=g) for _ in range(3))
        t = torch.tensor([0.25, 0.5])

        def velocity_fn(x_t, t_in, cond):
            v = (noise - x_t) / (1 - t_in.view(-1, 1, 1, 1, 1))
            v[:, :, 0] += 3.0
            return v

        with_first = pair_errors(velocity_fn, x_w, x_l, t, noise, cond=None)
        without_first = pair_errors(velocity_fn, x_w, x_l, t, noise, cond=None, exclude_first_frame=True)
        torch.testing.assert_close(with_first.e_w, torch.tensor([3.0, 3.0]))
        torch.testing.assert_close(with_first.e_l, torch.tensor([3.0, 3.0]))
        torch.testing.assert_close(without_first.e_w, torch.zeros(2), atol=1e-10, rtol=0)
        torch.testing.assert_close(without_first.e_l, torch.zeros(2), atol=1e-10, rtol=0)

    def test_held_first_frame_is_given_clean_at_time_zero(self):
        """hold_first_frame: frame 0 of x_t is x0's own with its time 0; the later frames are on the path."""
        g = torch.Generator().manual_seed(2)
        x_w, x_l, noise = (torch.randn(2, 1, 3, 2, 2, generator=g) for _ in range(3))
        t = torch.tensor([0.25, 0.5])
        seen = []

        def velocity_fn(x_t, t_in, cond):
            seen.append((x_t.clone(), t_in.clone()))
            return torch.zeros_like(x_t)

        pair_errors(velocity_fn, x_w, x_l, t, noise, cond=None, exclude_first_frame=True, hold_first_frame=True)
        for (x_t, t_in), x0 in zip(seen, (x_w, x_l), strict=True):
            torch.testing.assert_close(x_t[:, :, 0], x0[:, :, 0])
            tb = t.view(-1, 1, 1, 1, 1)
            torch.testing.assert_close(x_t[:, :, 1:], ((1 - tb) * x0 + tb * noise)[:, :, 1:])
            torch.testing.assert_close(t_in, torch.tensor([[0.0, 0.25, 0.25], [0.0, 0.5, 0.5]]))
        with pytest.raises(ValueError, match="set `exclude_first_frame`"):
            pair_errors(velocity_fn, x_w, x_l, t, noise, cond=None, hold_first_frame=True)

    def test_frame_mask_errors_hand_value(self):
        """Frame 0 = 100, frames 1 and 2 = 1: all frames (100+1+1)/3 = 34, frames 1.. = 1."""
        sq = torch.ones(1, 2, 3, 2, 2)
        sq[:, :, 0] = 100.0
        torch.testing.assert_close(frame_mask_errors(sq, exclude_first_frame=False), torch.tensor([34.0]))
        torch.testing.assert_close(frame_mask_errors(sq, exclude_first_frame=True), torch.tensor([1.0]))
        with pytest.raises(ValueError, match="at least 2 frames"):
            frame_mask_errors(torch.ones(1, 1, 1, 2, 2), exclude_first_frame=True)

    def test_invalid_shapes(self):
        x = torch.zeros(2, 1, 3, 2, 2)

        def velocity_fn(x_t, t, cond):
            return x_t

        with pytest.raises(
            ValueError, match=r"`x_l` has shape \(2, 1, 4, 2, 2\) but `x_w` has shape \(2, 1, 3, 2, 2\)"
        ):
            pair_errors(velocity_fn, x, torch.zeros(2, 1, 4, 2, 2), torch.rand(2), x, None)
        with pytest.raises(ValueError, match=r"`t` has shape \(3,\)"):
            pair_errors(velocity_fn, x, x, torch.rand(3), x, None)
        with pytest.raises(ValueError, match="returned shape"):
            pair_errors(lambda x_t, t, c: x_t[:, :, 1:], x, x, torch.rand(2), x, None)


class TestPhysHPO:
    def test_hierarchical_defaults_and_hand_value(self):
        """Defaults λ=0.4, ρ=0.3, μ=0.2: 1 + 0.4·10 + 0.3·100 + 0.2·1000 = 1 + 4 + 30 + 200 = 235;
        terms left out are not added."""
        defaults = {k: p.default for k, p in inspect.signature(hierarchical_loss).parameters.items()}
        assert (defaults["lam"], defaults["rho"], defaults["mu"]) == (0.4, 0.3, 0.2)
        terms = [torch.tensor(v) for v in (1.0, 10.0, 100.0, 1000.0)]
        torch.testing.assert_close(hierarchical_loss(*terms), torch.tensor(235.0))
        torch.testing.assert_close(hierarchical_loss(terms[0], motion=terms[2]), torch.tensor(31.0))
        with pytest.raises(ValueError, match="scalar"):
            hierarchical_loss(torch.ones(2))

    def test_weighted_negatives(self):
        """0.7·mean([1, 1]) + 0.3·mean([2, 2, 2]) = 0.7 + 0.6 = 1.3."""
        defaults = {k: p.default for k, p in inspect.signature(weighted_negatives).parameters.items()}
        assert (defaults["w_same"], defaults["w_masked"]) == (0.7, 0.3)
        torch.testing.assert_close(weighted_negatives(torch.ones(2), torch.full((3,), 2.0)), torch.tensor(1.3))

    def test_boundary_frames_replaced_exactly(self):
        """6 frames, n=2: frames 0, 1, 4, 5 from the donor, 2 and 3 from the video; inputs unchanged."""
        video = torch.arange(6.0).view(1, 1, 6, 1, 1).expand(2, 3, 6, 2, 2).clone()
        donor = -video - 100
        video_before, donor_before = video.clone(), donor.clone()
        out = boundary_anchored(video, donor)
        assert out.shape == video.shape
        for f in (0, 1, 4, 5):
            assert torch.equal(out[:, :, f], donor[:, :, f])
        for f in (2, 3):
            assert torch.equal(out[:, :, f], video[:, :, f])
        assert torch.equal(video, video_before) and torch.equal(donor, donor_before)
        with pytest.raises(ValueError, match="2·n < 4"):
            boundary_anchored(video[:, :, :4], donor[:, :, :4], n=2)
        with pytest.raises(ValueError, match=r"`donor` has shape"):
            boundary_anchored(video, donor[:, :, :5])

    def test_temporal_difference_and_motion_errors(self):
        """v_pred frames [0, 1, 3] (1 channel, 1×1), target 0: Δ_t v = [1, 2],
        motion error = (1² + 2²)/2 = 2.5. A velocity error constant over frames has no motion error."""
        v_pred = torch.tensor([0.0, 1.0, 3.0]).view(1, 1, 3, 1, 1)
        torch.testing.assert_close(temporal_difference(v_pred).flatten(), torch.tensor([1.0, 2.0]))
        torch.testing.assert_close(motion_errors(v_pred, torch.zeros_like(v_pred)), torch.tensor([2.5]))
        torch.testing.assert_close(motion_errors(v_pred + 5.0, v_pred), torch.tensor([0.0]))

    def test_mask_prompt(self):
        prompt = "a red ball bounces twice on the floor"
        rng = np.random.default_rng
        assert mask_prompt(prompt, rng(0), p=0.0) == prompt
        assert mask_prompt(prompt, rng(0), p=1.0) == ""
        assert mask_prompt("a ball", rng(0), p=1.0, mask_token="[MASK]") == "[MASK] [MASK]"
        masked = mask_prompt(prompt, rng(3), p=0.5)
        assert masked == mask_prompt(prompt, rng(3), p=0.5)
        words = iter(prompt.split())
        assert all(word in words for word in masked.split())  # an ordered subsequence
        with pytest.raises(ValueError, match="probability"):
            mask_prompt(prompt, rng(0), p=1.5)
