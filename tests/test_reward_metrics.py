"""The reward model's Rao–Kupper loss and VideoAlign's accuracy protocol, against values derived by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.btt import INVALID, LABELS, TIE, A, B, btt_loss, btt_probabilities, encode_labels
from models.reward_metrics import (
    NEVER_TIE,
    accuracy_with_ties,
    accuracy_without_ties,
    per_dimension_report,
    random_baseline,
    signs_from_labels,
)

LOG5 = math.log(5.0)

# ---------------------------------------------------------------------------------------------
# Bradley-Terry with ties


def test_probabilities_at_d_zero_by_hand():
    """d = 0, θ = 5: P(A) = P(B) = σ(−log 5) = 1 / (1 + 5) = 1/6;
    P(tie) = (25 − 1) · (1/6) · (1/6) = 24/36 = 2/3 (= (θ − 1)/(θ + 1)); 1/6 + 1/6 + 2/3 = 1."""
    p_a, p_b, p_tie = btt_probabilities(torch.tensor(0.0, dtype=torch.float64))
    assert p_a.item() == pytest.approx(1 / 6)
    assert p_b.item() == pytest.approx(1 / 6)
    assert p_tie.item() == pytest.approx(2 / 3)


def test_probabilities_at_d_log_theta_by_hand():
    """d = log 5, θ = 5: P(A) = σ(0) = 1/2; P(B) = σ(−2 log 5) = 1 / (1 + 25) = 1/26;
    P(tie) = 24 · (1/2) · (1/26) = 12/26; 13/26 + 1/26 + 12/26 = 1."""
    p_a, p_b, p_tie = btt_probabilities(torch.tensor(LOG5, dtype=torch.float64))
    assert (p_a.item(), p_b.item(), p_tie.item()) == pytest.approx((1 / 2, 1 / 26, 12 / 26))


@pytest.mark.parametrize("theta", [1.01, 1.5, 5.0, 20.0, 1e3])
def test_probabilities_sum_to_one_over_a_grid(theta):
    d = torch.cat([torch.tensor([-1e4]), torch.linspace(-60, 60, 241), torch.tensor([1e4])]).double()
    p_a, p_b, p_tie = btt_probabilities(d, theta)
    total = p_a + p_b + p_tie
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)
    assert bool(((p_a >= 0) & (p_b >= 0) & (p_tie >= 0)).all())
    # A's probability rises and B's falls with d
    assert bool((p_a.diff() >= 0).all()) and bool((p_b.diff() <= 0).all())


def test_probabilities_accept_a_float():
    p_a, p_b, p_tie = btt_probabilities(0.0)
    assert p_tie.item() == pytest.approx(2 / 3)


def test_loss_and_gradients_by_hand():
    """One pair, three dimensions, r_B = 0, θ = 5:
    VQ: d = log 5, label A:   nll = −log σ(0) = log 2;       dnll/dd = −σ(log θ − d) = −1/2
    MQ: d = 0,     label tie: nll = −log(2/3) = log(3/2);    dnll/dd = −(σ(log θ − d) − σ(d + log θ)) = 0
    TA: d = 3,     invalid:   nll = 0, no gradient
    loss = (log 2 + log 3/2) / 2 valid = log(3) / 2; ∂loss/∂r_A = (−1/2, 0, 0) / 2 = (−1/4, 0, 0) = −∂loss/∂r_B.
    """
    r_a = torch.tensor([[LOG5, 0.0, 3.0]], dtype=torch.float64, requires_grad=True)
    r_b = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[A, TIE, INVALID]])
    loss, nll = btt_loss(r_a, r_b, labels)
    assert loss.item() == pytest.approx(math.log(3) / 2)
    torch.testing.assert_close(nll.detach(), torch.tensor([[math.log(2), math.log(1.5), 0.0]], dtype=torch.float64))
    loss.backward()
    torch.testing.assert_close(r_a.grad, torch.tensor([[-0.25, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(r_b.grad, torch.tensor([[0.25, 0.0, 0.0]], dtype=torch.float64))


def test_loss_matches_the_probability_formulas():
    """On random pairs the loss equals −log of the textbook probabilities, picked by label."""
    g = torch.Generator().manual_seed(0)
    r_a = torch.randn(64, 3, generator=g, dtype=torch.float64) * 3
    r_b = torch.randn(64, 3, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 4, (64, 3), generator=g)
    theta = 5.0
    d = r_a - r_b
    p_a = torch.sigmoid(d - math.log(theta))
    p_b = torch.sigmoid(-d - math.log(theta))
    table = torch.stack([p_a, p_b, (theta**2 - 1) * p_a * p_b], dim=-1)
    valid = labels != INVALID
    expected = -torch.log(table.gather(-1, labels.clamp_max(TIE).unsqueeze(-1)).squeeze(-1))[valid].mean()
    loss, nll = btt_loss(r_a, r_b, labels, theta)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert bool((nll[~valid] == 0).all())


def test_masked_entries_get_zero_gradient_even_when_extreme():
    r_a = torch.tensor([[1.0, 1e6], [-2.0, -1e6]], requires_grad=True)
    r_b = torch.zeros(2, 2, requires_grad=True)
    labels = torch.tensor([[B, INVALID], [A, INVALID]])
    loss, _ = btt_loss(r_a, r_b, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert r_a.grad[:, 1].tolist() == [0.0, 0.0] and r_b.grad[:, 1].tolist() == [0.0, 0.0]
    assert bool((r_a.grad[:, 0] != 0).all())


def test_large_differences_stay_finite():
    """d = 1e4 with label B: nll = −log σ(−1e4 − log 5) ≈ 1e4 + log 5 (σ(−x) ≈ e^{−x}); its gradient
    w.r.t. d is σ(d + log θ) ≈ 1. The tie at d = −1e4: nll ≈ 1e4 + log 5 − log 24 (log σ(d − log θ)
    ≈ d − log 5, log σ(−d − log θ) ≈ 0)."""
    r_a = torch.tensor([[1e4, -1e4, -1e4]], dtype=torch.float32, requires_grad=True)
    r_b = torch.zeros(1, 3, requires_grad=True)
    labels = torch.tensor([[B, A, TIE]])
    loss, nll = btt_loss(r_a, r_b, labels)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(r_a.grad).all())
    assert nll[0, 0].item() == pytest.approx(1e4 + LOG5, rel=1e-6)
    assert nll[0, 2].item() == pytest.approx(1e4 + LOG5 - math.log(24), rel=1e-6)
    assert r_a.grad[0, 0].item() == pytest.approx(1 / 3)  # (dnll/dd ≈ 1) / 3 valid entries


def test_no_valid_entry_gives_zero_loss_that_backpropagates():
    r_a = torch.randn(4, 3, requires_grad=True)
    r_b = torch.randn(4, 3, requires_grad=True)
    loss, nll = btt_loss(r_a, r_b, torch.full((4, 3), INVALID))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert r_a.grad.abs().sum().item() == 0.0 and r_b.grad.abs().sum().item() == 0.0
    assert nll.abs().sum().item() == 0.0


@pytest.mark.parametrize("theta", [1.0, 0.5, -3.0, float("nan"), float("inf")])
def test_theta_must_exceed_one(theta):
    with pytest.raises(ValueError, match="θ > 1"):
        btt_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([[A]]), theta)
    with pytest.raises(ValueError, match="θ > 1"):
        btt_probabilities(0.0, theta)


def test_loss_refuses_bad_labels_and_shapes():
    with pytest.raises(ValueError, match=r"labels\[1, 0\] = 4"):
        btt_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([[0], [4]]))
    with pytest.raises(ValueError, match="dtype"):
        btt_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="same shape"):
        btt_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long))


def test_encode_labels():
    assert LABELS == ("A", "B", "tie", "invalid")
    assert encode_labels(["A", "B", "tie", "invalid"]).tolist() == [A, B, TIE, INVALID]
    codes = encode_labels([["A", "tie", "B"], ["invalid", "A", "A"]])
    assert codes.dtype == torch.long and codes.tolist() == [[0, 2, 1], [3, 0, 0]]
    with pytest.raises(ValueError, match=r"'Tie'.*\('A', 'B', 'tie', 'invalid'\)"):
        encode_labels(["A", "Tie"])


# ---------------------------------------------------------------------------------------------
# Accuracy w/o ties


def test_accuracy_without_ties_by_hand():
    """m = (2, −1, 0, 3, 0.5), h = (1, 1, 1, 0, −1): the tie (index 3) is dropped;
    2 vs 1 concordant; −1 vs 1 discordant; 0 vs 1 discordant (m = 0 misses); 0.5 vs −1 discordant.
    accuracy = 1 / 4."""
    result = accuracy_without_ties(np.array([2, -1, 0, 3, 0.5]), np.array([1, 1, 1, 0, -1]))
    assert (result.accuracy, result.n, result.concordant, result.discordant) == (0.25, 4, 1, 3)


def test_accuracy_without_ties_drops_invalid_and_takes_tensors():
    """NaN labels are invalid: m = (1, −1, 5), h = (1, −1, NaN) → 2 of 2 concordant."""
    result = accuracy_without_ties(torch.tensor([1.0, -1.0, 5.0]), torch.tensor([1.0, -1.0, float("nan")]))
    assert (result.accuracy, result.n) == (1.0, 2)
    assert isinstance(result.accuracy, float)


def test_accuracy_without_ties_empty_is_nan():
    result = accuracy_without_ties([0.3, -0.2], [0, float("nan")])
    assert math.isnan(result.accuracy) and result.n == 0


def test_accuracy_refuses_unknown_labels():
    with pytest.raises(ValueError, match=r"h\[1\] = 2.0"):
        accuracy_without_ties([1.0, 2.0], [1, 2])
    with pytest.raises(ValueError, match=r"m\[0\]"):
        accuracy_with_ties([float("nan"), 2.0], [1, 1])


# ---------------------------------------------------------------------------------------------
# Accuracy w/ ties (tie calibration)


def test_tie_calibration_picks_an_epsilon_strictly_inside_by_hand():
    """m = (0.1, −0.2, 0.3, 1.0, −2.0, 0.5), h = (0, 0, 1, 1, −1, 0). Correct = C + T_hm out of 6.
    ε = −1 (never tie): concordant 0.3, 1.0, −2.0 → 3/6
    ε = 0.1: + the human tie at 0.1 → 4/6;  ε = 0.2: + the tie at −0.2 → 5/6
    ε = 0.3: 0.3 (h = 1) becomes a model tie → 4/6;  ε = 0.5: + the tie at 0.5 → 5/6
    ε = 1.0: → 4/6;  ε = 2.0: → 3/6.
    Best 5/6 at ε = 0.2 and 0.5: the smaller, 0.2. There C = 3, D = 0, T_h = 1 (0.5), T_m = 0, T_hm = 2."""
    result = accuracy_with_ties([0.1, -0.2, 0.3, 1.0, -2.0, 0.5], [0, 0, 1, 1, -1, 0])
    assert result.accuracy == pytest.approx(5 / 6)
    assert result.epsilon == pytest.approx(0.2)
    assert (result.concordant, result.discordant, result.human_tie_only, result.model_tie_only, result.both_tie) == (
        3,
        0,
        1,
        0,
        2,
    )
    assert result.n == 6
    assert result.curve_epsilons == pytest.approx((NEVER_TIE, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0))
    assert result.curve_accuracies == pytest.approx(tuple(c / 6 for c in (3, 4, 5, 4, 5, 4, 3)))


def test_tie_calibration_with_zero_signal_by_hand():
    """m = (0, 0, 1), h = (0, 1, 1).
    ε = −1: (0, h 0) T_h; (0, h 1) discordant since m = 0 has no sign; (1, h 1) concordant → 1/3
    ε = 0:  (0, h 0) T_hm; (0, h 1) T_m; (1, h 1) concordant → 2/3
    ε = 1:  T_hm, T_m, T_m → 1/3.  Best 2/3 at ε = 0."""
    result = accuracy_with_ties([0.0, 0.0, 1.0], [0, 1, 1])
    assert (result.accuracy, result.epsilon) == (pytest.approx(2 / 3), 0.0)
    assert result.curve_accuracies == pytest.approx((1 / 3, 2 / 3, 1 / 3))
    assert (result.concordant, result.discordant, result.human_tie_only, result.model_tie_only, result.both_tie) == (
        1,
        0,
        0,
        1,
        1,
    )


def test_tie_calibration_never_tie_when_ties_do_not_help():
    """No human ties and a perfect signal: any model tie costs, so ε = −1 and accuracy = 1."""
    result = accuracy_with_ties([1.0, -2.0, 3.0], [1, -1, 1])
    assert (result.accuracy, result.epsilon) == (1.0, NEVER_TIE)


def test_tie_calibration_at_fixed_epsilons():
    """Same pairs as the by-hand sweep: ε = 0.25 ties 0.1 and −0.2 (as ε = 0.2) → 5/6; ε = 10 ties
    everything → 3/6 human ties; ε = −0.5 ties nothing → 3/6."""
    m, h = [0.1, -0.2, 0.3, 1.0, -2.0, 0.5], [0, 0, 1, 1, -1, 0]
    result = accuracy_with_ties(m, h, epsilons=[10.0, 0.25, -0.5])
    assert result.curve_epsilons == (-0.5, 0.25, 10.0)
    assert result.curve_accuracies == pytest.approx((3 / 6, 5 / 6, 3 / 6))
    assert (result.accuracy, result.epsilon) == (pytest.approx(5 / 6), 0.25)


def test_tie_calibration_empty_is_nan():
    result = accuracy_with_ties([1.0], [float("nan")])
    assert math.isnan(result.accuracy) and math.isnan(result.epsilon) and result.n == 0


def naive_tie_calibration(m: list[float], h: list[float]):
    """O(n²) reference: classify every pair at every candidate ε, straight from the definition."""
    pairs = [(mi, hi) for mi, hi in zip(m, h, strict=True) if not math.isnan(hi)]
    candidates = [NEVER_TIE] + sorted({abs(mi) for mi, _ in pairs})
    curve = []
    for eps in candidates:
        c = d = t_h = t_m = t_hm = 0
        for mi, hi in pairs:
            model_tie = abs(mi) <= eps
            if model_tie and hi == 0:
                t_hm += 1
            elif model_tie:
                t_m += 1
            elif hi == 0:
                t_h += 1
            elif (mi > 0 and hi == 1) or (mi < 0 and hi == -1):
                c += 1
            else:
                d += 1
        curve.append(((c + t_hm) / (c + d + t_h + t_m + t_hm), eps, (c, d, t_h, t_m, t_hm)))
    best = max(curve, key=lambda row: (row[0], -row[1]))
    return candidates, [row[0] for row in curve], best


def test_sorted_sweep_equals_naive_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        m = rng.integers(-4, 5, n) / 2  # halves in [−2, 2]: repeated |m|, both signs, zeros
        h = rng.choice([-1.0, 0.0, 1.0, np.nan], size=n, p=[0.35, 0.25, 0.3, 0.1])
        result = accuracy_with_ties(m, h)
        if np.isnan(h).all():
            assert result.n == 0
            continue
        epsilons, accuracies, (best_acc, best_eps, counts) = naive_tie_calibration(m.tolist(), h.tolist())
        assert list(result.curve_epsilons) == epsilons
        assert list(result.curve_accuracies) == pytest.approx(accuracies)
        assert (result.accuracy, result.epsilon) == (pytest.approx(best_acc), best_eps)
        got = (result.concordant, result.discordant, result.human_tie_only, result.model_tie_only, result.both_tie)
        assert got == counts


# ---------------------------------------------------------------------------------------------
# Random baseline and the report


def test_random_baseline():
    """A random score matches a decisive label half the time: w/o ties ≈ 0.5 (per-draw sd
    √(0.25 / 1400) ≈ 0.013 over ~1400 decisive pairs, ≈ 0.003 averaged over 20 draws). w/ ties is at least
    the 30% human-tie share, the accuracy of "always tie"."""
    rng = np.random.default_rng(1)
    h = rng.choice([-1.0, 0.0, 1.0], size=2000, p=[0.35, 0.3, 0.35])
    baseline = random_baseline(h, seed=7, n_draws=20)
    assert baseline.acc_wo_ties == pytest.approx(0.5, abs=0.015)
    assert baseline.acc_w_ties >= (h == 0).mean()
    assert baseline == random_baseline(h, seed=7, n_draws=20)  # fixed seed, same numbers
    assert math.isnan(random_baseline([np.nan], seed=0).acc_wo_ties)


def test_signs_from_labels():
    h = signs_from_labels(torch.tensor([A, B, TIE, INVALID]))
    assert h[:3].tolist() == [1.0, -1.0, 0.0] and math.isnan(h[3])
    with pytest.raises(ValueError, match="codes must be"):
        signs_from_labels(np.array([5]))


def test_per_dimension_report():
    """Rows agree with the single-dimension functions; the overall signal is the mean of the three:
    pair 0: (1 + 2 + 0) / 3 = 1 with overall label 1 → concordant; pair 1: (−1 − 1 − 1) / 3 = −1 with
    label −1 → concordant; pair 2 has an invalid overall label; pair 3: (0.3 + 0 − 0.6) / 3 = −0.1
    with label 1 → discordant. Overall w/o ties: 2 / 3."""
    m = np.array([[1.0, 2.0, 0.0], [-1.0, -1.0, -1.0], [0.5, 0.5, 0.5], [0.3, 0.0, -0.6]])
    labels = encode_labels([["A", "A", "tie"], ["B", "B", "B"], ["tie", "invalid", "A"], ["A", "tie", "B"]])
    h = signs_from_labels(labels)
    h_overall = np.array([1.0, -1.0, np.nan, 1.0])
    rows = per_dimension_report(torch.from_numpy(m), h, h_overall=h_overall, seed=3, n_draws=10)
    assert [row["dimension"] for row in rows] == ["VQ", "MQ", "TA", "overall"]
    for j, row in enumerate(rows[:3]):
        assert row["acc_wo_ties"] == accuracy_without_ties(m[:, j], h[:, j]).accuracy
        calibrated = accuracy_with_ties(m[:, j], h[:, j])
        assert (row["acc_w_ties"], row["epsilon"]) == (calibrated.accuracy, calibrated.epsilon)
        assert row["random_w_ties"] == random_baseline(h[:, j], seed=3, n_draws=10).acc_w_ties
    assert rows[1]["n"] == 3  # MQ's invalid label is excluded
    assert rows[3]["n"] == 3 and rows[3]["acc_wo_ties"] == pytest.approx(2 / 3)
    assert all(isinstance(row["acc_w_ties"], float) for row in rows)
    assert len(per_dimension_report(m, h, seed=3, n_draws=2)) == 3  # no overall label, no overall row
    with pytest.raises(ValueError, match=r"\(pairs, 2\)"):
        per_dimension_report(m, h, names=("VQ", "MQ"))


def test_an_all_tie_set():
    """Every human label a tie. w/o ties: no pair is left, accuracy NaN with n = 0. w/ ties: with
    ε ≥ max|m| = 0.7 the model ties all four pairs too, so acc = T_hm / n = 4/4 = 1; with no model
    ties (ε = −1) every pair is T_h and acc = 0. BTT with θ = 5 on ties: at d = 0,
    P(tie) = 24 · (1/6)² = 2/3, so the loss is −log(2/3) = 0.405465."""
    m = np.array([0.7, -0.2, 0.0, 0.5])
    h = np.zeros(4)
    wo = accuracy_without_ties(m, h)
    assert wo.n == 0 and np.isnan(wo.accuracy)
    w = accuracy_with_ties(m, h)
    assert w.accuracy == 1.0 and w.epsilon == pytest.approx(0.7)
    assert accuracy_with_ties(m, h, epsilons=[-1.0]).accuracy == 0.0
    zeros = torch.zeros(3, 3)
    loss, _ = btt_loss(zeros, zeros, torch.full((3, 3), TIE))
    assert float(loss) == pytest.approx(-math.log(2 / 3), abs=1e-6)
