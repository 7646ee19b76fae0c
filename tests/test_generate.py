"""`generate`: seeds that do not depend on order, shards that resume, actors that die without loss."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from data_contracts import Lineage, RunLayout, read_manifest, write_manifest
from models.policy import Policy, PolicyConfig, build_tiny, save_policy_folder
from models.text_encoder import build_text_encoder
from tasks import generate
from tasks.generate import GenerateConfig, plan_samples, read_prompt_file, sample_seed
from tasks.video_io import read_video

PROMPTS = ["a red ball falls", "a blue ball rolls to the right", "a green ball is thrown to the left"]


@pytest.fixture(scope="module")
def ray_local():
    from infra.ray_cluster import ray_session

    with ray_session(num_cpus=2):
        yield


@pytest.fixture()
def run(tmp_path):
    """A run whose bootstrap holds a tiny random Wan policy, and a `videos` manifest of prompts."""
    layout = RunLayout(tmp_path / "runs", "gen")
    boot = layout.stage("bootstrap")
    folder = boot.files("policy")
    text = build_text_encoder(PROMPTS, folder / "text_encoder")
    build_tiny("wan", folder / "transformer", text_dim=text.hidden_size, text_len=text.max_length, layers=1, dim=32, head_dim=16)
    save_policy_folder(folder, PolicyConfig(family="wan", transformer=str(folder / "transformer"),
                                            text_encoder=str(folder / "text_encoder"), steps=3, guidance_scale=2.0))
    ckpt = write_manifest(
        [{"checkpoint_id": "base", "kind": "policy", "format": "diffusers", "path": layout.stored_path(folder),
          "base_id": "tiny", "round": None, "metrics_json": None}],
        "checkpoints", boot.manifest_path, layout, Lineage("bootstrap", {}, "x"),
    )
    ingest = layout.stage("ingest")
    videos_dir = ingest.files("videos")
    videos_dir.mkdir(parents=True)
    rows = []
    for i, prompt in enumerate(PROMPTS):
        path = videos_dir / f"v{i}.mp4"
        path.write_bytes(b"")  # contents are not read: generate only takes the captions
        rows.append({"video_id": f"v{i}", "video_path": layout.stored_path(path), "caption": prompt, "source": "test",
                     "width": 16, "height": 16, "fps": 8.0, "num_frames": 8, "duration_s": 1.0, "file_bytes": 0,
                     "reason": None, "split": "heldout" if i == 2 else "train"})
    videos = write_manifest(rows, "videos", ingest.manifest_path, layout, Lineage("ingest", {}, "x"))
    return layout, {"videos": videos, "checkpoints": ckpt}


def generate_run(layout, inputs, cfg, out=None, **kwargs):
    out = out or layout.stage("generate", round=1)
    out.path.mkdir(parents=True, exist_ok=True)
    return generate.run(inputs, cfg, layout, out, Lineage("generate", {k: v.content_hash for k, v in inputs.items()}, cfg.hash()), round=1, **kwargs), out


CFG = GenerateConfig(samples_per_prompt=3, shard_size=2, batch_size=2, actors=2)


def test_seeds_are_fixed_per_prompt_and_sample_not_per_position():
    cfg = GenerateConfig(samples_per_prompt=4)
    a = plan_samples(PROMPTS, cfg, round_=1)
    b = plan_samples(list(reversed(PROMPTS)), cfg, round_=1)
    assert len(a) == 12 and len({r["generation_id"] for r in a}) == 12
    assert {r["generation_id"]: r["seed"] for r in a} == {r["generation_id"]: r["seed"] for r in b}
    assert len({r["seed"] for r in a}) == 12
    assert sample_seed(0, 1, PROMPTS[0], 0) != sample_seed(0, 2, PROMPTS[0], 0), "rounds draw new samples"
    assert sample_seed(0, 1, PROMPTS[0], 0) != sample_seed(1, 1, PROMPTS[0], 0), "the config seed matters"


def test_prompt_file_errors_name_the_line(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red ball falls\n\nbad \x07 prompt\n")
    with pytest.raises(ValueError, match=r"prompts.txt`, line 3: control character"):
        read_prompt_file(f)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    f.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_file(f)


def test_generations_manifest_videos_and_latents(run, ray_local):
    layout, inputs = run
    result, out = generate_run(layout, inputs, CFG)
    rows = read_manifest(result.manifest.path, "generations", layout).rows()
    # 1. K samples for each training prompt (the held-out one stays for evaluate), one shard each 2 samples
    assert len(rows) == 6 and {r["prompt"] for r in rows} == set(PROMPTS[:2])
    assert result.counts == {"prompts": 2, "samples": 6, "shards": 3, "shards_resumed": 0, "sampling_nodes": 1}
    assert {(r["policy_id"], r["steps"], r["guidance"], r["round"]) for r in rows} == {("base", 3, 2.0, 1)}
    # 2. the mp4 holds the video sampled from that seed (lossy codec: a random policy samples noise,
    #    which mp4 keeps only coarsely, so compare each frame's mean colour); the cached latent is the
    #    encoding of the mp4 as written, what the critic judged: it decodes to the file's frames exactly
    policy = Policy.from_pretrained(PolicyConfig(family="wan", transformer=str(layout.run_dir / "bootstrap/policy/transformer"),
                                                 text_encoder=str(layout.run_dir / "bootstrap/policy/text_encoder"), device="cpu"))
    r = rows[4]
    latent = load_file(layout.resolve(r["latent_path"]))["latent"]
    video = read_video(layout.resolve(r["video_path"]))
    assert video.shape == (8, 16, 16, 3)
    sampled = policy.decode(policy.sample_latents([r["prompt"]], [r["seed"]], steps=3, guidance=2.0))[0]
    assert np.abs(video.astype(float).mean(axis=(1, 2)) - sampled.astype(float).mean(axis=(1, 2))).max() < 12
    np.testing.assert_array_equal(policy.decode(latent[None])[0], video)
    assert float(latent.abs().max()) <= 1.0


def test_a_restarted_stage_keeps_finished_shards(run, ray_local):
    layout, inputs = run
    first, out = generate_run(layout, inputs, CFG)
    before = {p.name: p.stat().st_mtime_ns for p in out.files("videos").iterdir()}
    # a crash after shard 1 was recorded but before the others: their records are gone
    (out.files("shards") / "shard-00000.json").unlink()
    (out.files("shards") / "shard-00002.json").unlink()
    again, _ = generate_run(layout, inputs, CFG)
    assert again.counts["shards_resumed"] == 1
    after = {p.name: p.stat().st_mtime_ns for p in out.files("videos").iterdir()}
    shard1 = json.loads((out.files("shards") / "shard-00001.json").read_text())["rows"]
    kept = {Path(r["video_path"]).name for r in shard1}
    assert all(after[name] == before[name] for name in kept), "finished shards are not sampled again"
    assert all(after[name] != before[name] for name in set(before) - kept)
    assert read_manifest(again.manifest.path, "generations", layout).table.equals(read_manifest(first.manifest.path, "generations", layout).table)


def test_a_forced_rerun_samples_every_shard_again(run, ray_local):
    """`--force` recomputes: finished shards of the same key are not kept (a restart without it keeps them)."""
    layout, inputs = run
    first, out = generate_run(layout, inputs, CFG)
    before = {p.name: p.stat().st_mtime_ns for p in out.files("videos").iterdir()}
    again, _ = generate_run(layout, inputs, CFG, out=replace(out, fresh=True))
    assert again.counts["shards_resumed"] == 0 and again.counts["shards"] == first.counts["shards"]
    after = {p.name: p.stat().st_mtime_ns for p in out.files("videos").iterdir()}
    assert after.keys() == before.keys() and all(after[n] != before[n] for n in before)
    assert read_manifest(again.manifest.path, "generations", layout).table.equals(read_manifest(first.manifest.path, "generations", layout).table)


class DiesOnce(generate.PolicyWorker):
    """Exits its process on its first shard (once per test, via a flag file): a killed worker."""

    def run_shard(self, job):
        flag = Path(job.record_path).parent.parent / "died-once"
        if not flag.exists():
            flag.write_text(str(os.getpid()))
            os._exit(1)
        return super().run_shard(job)


def test_a_killed_actor_is_restarted_and_nothing_is_lost_or_duplicated(run, ray_local):
    layout, inputs = run
    result, out = generate_run(layout, inputs, CFG, worker_cls=DiesOnce)
    assert (out.path / "died-once").exists(), "the fault was injected"
    rows = read_manifest(result.manifest.path, "generations", layout).rows()
    ids = [r["generation_id"] for r in rows]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert len(list(out.files("videos").glob("*.mp4"))) == 6
    assert not list(out.files("videos").glob("*.tmp*")), "no partial files left behind"
