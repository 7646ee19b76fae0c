"""Preference fine-tuning of the policy's LoRA: only the adapter moves, the reference is the base,
pairs share t and ε, the preference is learnt, non-finite steps are refused, checkpoints round-trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models.policy import Policy, PolicyConfig, build_tiny
from models.preference_training import (
    LOG_KEYS,
    METRICS_FILE,
    PreferenceData,
    PreferenceTrainConfig,
    save_preference_checkpoint,
    train_preference,
)
from models.text_encoder import build_text_encoder

PROMPTS = ["a red ball falls", "a blue ball rolls to the right"]
# 1 layer of width 32, patch (1, 4, 4): a step on 8 pairs takes ~40 ms on one thread.
TINY = dict(layers=1, dim=32, head_dim=16)
METHODS = ("flow_dpo", "diffusion_dpo", "ipo", "kto", "rwr", "sft")
# Few rows and steps keep each training call well under a second.
QUICK = dict(steps=3, batch_size=4, warmup_steps=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    text = build_text_encoder(PROMPTS, root / "text_encoder")
    build_tiny("wan", root / "transformer", text_dim=text.hidden_size, text_len=text.max_length, **TINY)
    return root


def load(root) -> Policy:
    return Policy.from_pretrained(
        PolicyConfig(
            family="wan", transformer=str(root / "transformer"), text_encoder=str(root / "text_encoder"), device="cpu"
        )
    )


def patterns(shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fixed videos in [-1, 1]: the preferred pattern and the other."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1, torch.rand(shape, generator=g) * 2 - 1


def make_pairs(shape, n: int, seed: int = 1, prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n pairs: chosen = pattern A + small noise, rejected = pattern B + small noise."""
    a, b = patterns(shape)
    g = torch.Generator().manual_seed(seed)
    chosen = a + 0.05 * torch.randn((n, *shape), generator=g)
    rejected = b + 0.05 * torch.randn((n, *shape), generator=g)
    prompts = [prompt] * n if prompt else [PROMPTS[i % 2] for i in range(n)]
    return chosen, rejected, prompts


def data_for(method: str, shape, n: int = 8) -> PreferenceData:
    chosen, rejected, prompts = make_pairs(shape, n)
    if method == "kto":
        return PreferenceData.pointwise_from_pairs(chosen, rejected, prompts)
    if method == "rwr":
        rewards = torch.linspace(-1, 1, n)
        return PreferenceData(prompts=prompts, videos=chosen, rewards=rewards)
    if method == "sft":
        return PreferenceData(prompts=prompts, chosen=chosen, rejected=rejected)  # rejected allowed, unused
    return PreferenceData(prompts=prompts, chosen=chosen, rejected=rejected)


def split_state(policy: Policy) -> tuple[dict, dict]:
    """(LoRA tensors, base tensors) of the transformer, cloned."""
    state = {k: v.detach().clone() for k, v in policy.transformer.state_dict().items()}
    return {k: v for k, v in state.items() if ".lora_" in k}, {k: v for k, v in state.items() if ".lora_" not in k}


def test_config_defaults_and_refusals():
    cfg = PreferenceTrainConfig()
    assert (cfg.method, cfg.beta, cfg.beta_schedule, cfg.reference) == (
        "flow_dpo",
        2000.0,
        "constant",
        "disabled_adapter",
    )
    assert (cfg.lora_rank, cfg.lr, cfg.steps, cfg.batch_size, cfg.grad_clip) == (16, 1e-4, 150, 16, 1.0)
    with pytest.raises(ValueError, match="extra"):
        PreferenceTrainConfig(betta=1.0)
    with pytest.raises(ValueError, match="flow_dpo only"):
        PreferenceTrainConfig(method="kto", beta_schedule="one_minus_t_sq")
    with pytest.raises(ValueError, match="lambda1=0"):
        PreferenceTrainConfig(method="sft", lambda1=1.0)


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_every_lora_weight_and_no_base_weight(saved, method):
    cfg = PreferenceTrainConfig(method=method, **QUICK)
    fresh = load(saved)
    fresh.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)  # the LoRA training starts from
    lora0, base0 = split_state(fresh)
    policy = load(saved)
    seen = []
    info = train_preference(policy, data_for(method, policy.latent_shape), cfg, on_step=seen.append)
    lora, base = split_state(policy)
    # 1. every LoRA tensor moved (trl's smoke test), not a single base tensor did
    assert lora.keys() == lora0.keys() and len(lora) > 0
    for name in lora:
        assert not torch.equal(lora[name], lora0[name]), f"LoRA {name} did not change"
    assert base.keys() == base0.keys()
    for name in base:
        assert torch.equal(base[name], base0[name]), f"base weight {name} changed"
    # 2. the log: one record per step, every key present, the loss finite
    assert info["steps_done"] == 3 and info["stopped_on_nonfinite"] is None and info["lora"]["added"]
    assert seen == info["history"] and [r["step"] for r in seen] == [0, 1, 2]
    assert all(set(LOG_KEYS) <= set(r) and math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in seen)
    assert info["trainable_params"] == sum(v.numel() for v in lora.values())


@pytest.mark.parametrize("reference", ["disabled_adapter", "frozen_copy"])
def test_reference_is_the_base_model(saved, reference):
    """At step 0 the LoRA's B is 0, so the policy is the reference: e_w = e_w_ref, e_l = e_l_ref,
    Δ = 0, and the Flow-DPO loss is -log σ(0) = log 2 with implicit accuracy ½ (exact zero counts ½).
    Later the reference errors must not depend on how far the LoRA moved: a run at lr 1e-3 and one
    at lr 1e-12 see the same batches (same seed), so their reference errors are identical."""
    shape = load(saved).latent_shape
    runs = {}
    for lr in (1e-3, 1e-12):
        policy = load(saved)
        cfg = PreferenceTrainConfig(steps=4, batch_size=4, warmup_steps=0, lr=lr, reference=reference)
        runs[lr] = train_preference(policy, data_for("flow_dpo", shape), cfg)["history"]
    first = runs[1e-3][0]
    assert first["e_w"] == first["e_w_ref"] and first["e_l"] == first["e_l_ref"]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["implicit_accuracy"] == 0.5 and first["inside"] == 0.0
    for key in ("e_w_ref", "e_l_ref"):
        assert [r[key] for r in runs[1e-3]] == [r[key] for r in runs[1e-12]]
    assert runs[1e-3][-1]["e_w"] != runs[1e-3][-1]["e_w_ref"]


def test_winner_and_loser_share_t_and_noise_with_the_reference(saved):
    """Chosen = 0, rejected = 1: then x_t^w = t·ε and x_t^l = (1-t) + t·ε, so with one shared t and ε
    `x_t^l - x_t^w = 1 - t` everywhere; the reference must see the very same inputs."""
    policy = load(saved)
    shape, n = policy.latent_shape, 4
    calls = []
    real_velocity = policy.velocity

    def spy(x_t, t, emb, mask):
        calls.append((x_t.detach().clone(), t.detach().clone(), torch.is_grad_enabled()))
        return real_velocity(x_t, t, emb, mask)

    policy.velocity = spy
    data = PreferenceData(prompts=[PROMPTS[0]] * n, chosen=torch.zeros((n, *shape)), rejected=torch.ones((n, *shape)))
    train_preference(policy, data, PreferenceTrainConfig(steps=1, batch_size=n))
    # policy on winners and losers with gradient, then the reference on both without
    assert [c[2] for c in calls] == [True, True, False, False]
    (xw, tw, _), (xl, tl, _), (xw_ref, tw_ref, _), (xl_ref, tl_ref, _) = calls
    assert torch.equal(tw, tl) and torch.equal(tw, tw_ref) and torch.equal(tw, tl_ref)
    assert torch.equal(xw, xw_ref) and torch.equal(xl, xl_ref)
    torch.testing.assert_close(xl - xw, (1 - tw).view(-1, 1, 1, 1, 1).expand_as(xw), atol=1e-6, rtol=0)
    noise = xw / tw.view(-1, 1, 1, 1, 1)
    assert not torch.allclose(noise[0], noise[1])  # each pair its own ε


def test_caption_dropout_trains_some_rows_on_the_empty_prompt(saved):
    """caption_dropout=0.5: within a step, some rows see the empty prompt's embedding (the CFG
    unconditional) and the others their own; a pair's winner and loser and the reference see the same
    text. At 0 no row does."""
    policy = load(saved)
    shape, n = policy.latent_shape, 16
    empty = policy.empty_text(1)
    seen = []
    real_velocity = policy.velocity

    def spy(x_t, t, emb, mask):
        seen.append((emb.detach().clone(), torch.is_grad_enabled()))
        return real_velocity(x_t, t, emb, mask)

    policy.velocity = spy
    data = PreferenceData(prompts=[PROMPTS[0]] * n, chosen=torch.zeros((n, *shape)), rejected=torch.ones((n, *shape)))

    def empty_rows(emb):
        width = min(emb.shape[1], empty.embeddings.shape[1])
        flat = (emb[:, :width] - empty.embeddings[:, :width]).abs().flatten(1).amax(1)
        return flat < 1e-6

    train_preference(policy, data, PreferenceTrainConfig(steps=1, batch_size=n, caption_dropout=0.5))
    dropped = [empty_rows(emb) for emb, _ in seen]
    assert 0 < int(dropped[0].sum()) < n
    assert all(torch.equal(d, dropped[0]) for d in dropped)  # winner, loser, reference: one text per row
    seen.clear()
    policy.velocity = real_velocity
    policy = load(saved)
    policy.velocity = spy
    train_preference(policy, data, PreferenceTrainConfig(steps=1, batch_size=n, caption_dropout=0.0))
    assert not any(bool(empty_rows(emb).any()) for emb, _ in seen)
    with pytest.raises(ValueError):
        PreferenceTrainConfig(caption_dropout=1.0)


def test_learns_the_preference(saved):
    """One prompt, chosen ≈ pattern A, rejected ≈ pattern B, default lr and β: the implicit accuracy
    reaches ≥ 0.9, and on held-out pairs (fixed t, ε) the policy's error falls on the chosen pattern
    relative to the rejected one, measured against the reference (Δ < 0)."""
    policy = load(saved)
    shape = policy.latent_shape
    chosen, rejected, prompts = make_pairs(shape, 16, prompt=PROMPTS[0])
    cfg = PreferenceTrainConfig(steps=100, batch_size=8)
    info = train_preference(policy, PreferenceData(prompts=prompts, chosen=chosen, rejected=rejected), cfg)
    assert info["stopped_on_nonfinite"] is None
    assert info["final"]["implicit_accuracy"] >= 0.9
    assert info["final"]["loss"] < 0.5 * math.log(2)
    # held-out pairs from the same patterns, one fixed t and ε per pair
    x_w, x_l, held_prompts = make_pairs(shape, 16, seed=99, prompt=PROMPTS[0])
    g = torch.Generator().manual_seed(5)
    t, noise = torch.rand(16, generator=g), torch.randn(x_w.shape, generator=g)
    with torch.no_grad():
        e_w, e_l = (policy.flow_matching_loss(x, held_prompts, t=t, noise=noise) for x in (x_w, x_l))
        with policy.disable_adapter():
            e_w_ref, e_l_ref = (policy.flow_matching_loss(x, held_prompts, t=t, noise=noise) for x in (x_w, x_l))
    delta = (e_w - e_w_ref) - (e_l - e_l_ref)
    assert float((delta < 0).float().mean()) >= 0.9


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_is_not_applied_and_training_stops(saved, where):
    """A NaN velocity (loss) or an inf gradient at step 2: the LoRA keeps its weights after step 1."""
    policy = load(saved)
    policy.add_lora(16, 32)
    state = {"next": 0, "after_1": None}

    def on_step(record):
        state["next"] = record["step"] + 1
        if record["step"] == 1:
            state["after_1"] = split_state(policy)[0]

    if where == "loss":
        policy.transformer.register_forward_hook(
            lambda mod, args, out: (out[0] * float("nan"),) if state["next"] == 2 and torch.is_grad_enabled() else out
        )
    else:
        lora_b = next(p for name, p in policy.transformer.named_parameters() if ".lora_B" in name)
        lora_b.register_hook(lambda g: torch.full_like(g, float("inf")) if state["next"] == 2 else g)
    info = train_preference(
        policy, data_for("flow_dpo", policy.latent_shape), PreferenceTrainConfig(steps=6, batch_size=4), on_step
    )
    reason = "loss is nan" if where == "loss" else "grad norm is inf"
    assert info["stopped_on_nonfinite"].startswith(f"step 2: {reason}")
    assert info["steps_done"] == 2 and len(info["history"]) == 2
    lora = split_state(policy)[0]
    assert all(torch.equal(lora[k], v) for k, v in state["after_1"].items())
    assert all(p.grad is None for p in policy.lora_parameters())


def test_same_seed_same_lora(saved):
    def run(seed: int):
        policy = load(saved)
        info = train_preference(
            policy, data_for("flow_dpo", policy.latent_shape), PreferenceTrainConfig(seed=seed, **QUICK)
        )
        return split_state(policy)[0], info["history"]

    (a, hist_a), (b, hist_b), (c, _) = run(0), run(0), run(1)
    assert hist_a == hist_b and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_regularisers_add_winner_and_real_errors(saved):
    """At step 0 the DPO term is log 2, so loss = log 2 + λ1·mean(e_w) + λ2·mean(e_real) with λ1 = λ2 = 1."""
    policy = load(saved)
    shape = policy.latent_shape
    real, _, real_prompts = make_pairs(shape, 4, seed=7)
    cfg = PreferenceTrainConfig(steps=1, batch_size=4, lambda1=1.0, lambda2=1.0)
    info = train_preference(policy, data_for("flow_dpo", shape), cfg, real_latents=real, real_prompts=real_prompts)
    first = info["history"][0]
    assert first["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["loss"] == pytest.approx(math.log(2) + first["e_w"] + first["e_real"], rel=1e-6)


def test_saved_lora_loads_back_with_identical_velocities(saved, tmp_path):
    policy = load(saved)
    info = train_preference(policy, data_for("flow_dpo", policy.latent_shape), PreferenceTrainConfig(**QUICK))
    out = save_preference_checkpoint(policy, tmp_path / "ckpt", info)
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["steps_done"] == 3 and metrics["config"]["method"] == "flow_dpo"
    assert metrics["final"]["loss"] == pytest.approx(info["final"]["loss"]) and len(metrics["history"]) == 3
    loaded = load(saved)
    loaded.load_lora(out)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn((2, *policy.latent_shape), generator=g), torch.rand(2, generator=g)
    text = policy.encode_text(PROMPTS)
    with torch.no_grad():
        ours = policy.velocity(x, t, text.embeddings, text.mask)
        assert torch.equal(ours, loaded.velocity(x, t, text.embeddings, text.mask))
        with policy.disable_adapter():
            assert not torch.equal(ours, policy.velocity(x, t, text.embeddings, text.mask))


def _bad_cases(shape):
    chosen, rejected, prompts = make_pairs(shape, 4)
    nan = chosen.clone()
    nan[1, 0, 0, 0, 0] = float("nan")
    return {
        "no rejected": ("flow_dpo", dict(prompts=prompts, chosen=chosen), "`rejected` is missing; flow_dpo needs"),
        "shapes differ": ("ipo", dict(prompts=prompts, chosen=chosen, rejected=rejected[:, :, :4]), "`rejected` is"),
        "prompt count": ("flow_dpo", dict(prompts=prompts[:3], chosen=chosen, rejected=rejected), "one per prompt"),
        "kto without labels": ("kto", dict(prompts=prompts, videos=chosen), "`desirable` is missing"),
        "kto int labels": ("kto", dict(prompts=prompts, videos=chosen, desirable=torch.ones(4)), "bool tensor"),
        "rwr reward shape": (
            "rwr",
            dict(prompts=prompts, videos=chosen, rewards=torch.ones(3)),
            "one reward per video",
        ),
        "unused field": (
            "flow_dpo",
            dict(prompts=prompts, chosen=chosen, rejected=rejected, rewards=torch.ones(4)),
            "does not use",
        ),
        "nan latent": ("sft", dict(prompts=prompts, chosen=nan), r"rows \[1\] hold NaN"),
        "too few rows": ("sft", dict(prompts=prompts[:2], chosen=chosen[:2]), "fewer than batch_size=4"),
    }


@pytest.mark.parametrize("case", list(_bad_cases((3, 8, 16, 16))))  # the case names; tensors are rebuilt per test
def test_errors_say_what_is_missing(saved, case):
    policy = load(saved)
    method, fields, match = _bad_cases(policy.latent_shape)[case]
    with pytest.raises(ValueError, match=match):
        train_preference(policy, PreferenceData(**fields), PreferenceTrainConfig(method=method, batch_size=4))
    assert not policy.has_lora  # refused before touching the policy


def test_real_videos_need_lambda2_and_vice_versa(saved):
    policy = load(saved)
    data = data_for("flow_dpo", policy.latent_shape)
    real, _, real_prompts = make_pairs(policy.latent_shape, 4)
    with pytest.raises(ValueError, match="needs real_latents"):
        train_preference(policy, data, PreferenceTrainConfig(batch_size=4, lambda2=1.0))
    with pytest.raises(ValueError, match="set lambda2 > 0"):
        train_preference(
            policy, data, PreferenceTrainConfig(batch_size=4), real_latents=real, real_prompts=real_prompts
        )
