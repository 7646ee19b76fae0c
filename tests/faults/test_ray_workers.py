"""A Ray worker SIGKILLed from outside in the middle of its job, in `generate` and in `label`:
Ray restarts the actor, the job is retried on it, and the stage's output is complete, without
duplicates, and the same as a run without the fault."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_contracts import read_manifest
from tasks import generate, label
from tasks.label import LabelConfig
from tests.faults.helpers import KillWhenAnnounced, announce_and_wait
from tests.test_generate import CFG, generate_run
from tests.test_generate import run as gen_run  # noqa: F401 - fixture
from tests.test_label import VIOLATIONS, label_run, make_run, twins

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def ray_local():
    from infra.ray_cluster import ray_session

    with ray_session(num_cpus=2):
        yield


class PolicyKilledMidShard(generate.PolicyWorker):
    """The real policy worker; its first shard stops half-way (after its first video is on disk)
    until the test kills the process."""

    def run_shard(self, job):
        flag = Path(job.record_path).parent.parent / "killed-pid"
        if not flag.exists():
            first = generate.ShardJob(**{**job.__dict__, "items": job.items[:1], "record_path": job.record_path + ".partial"})
            generate.sample_shard(self.policy, first)  # a video and a latent of this shard are written
            Path(first.record_path).unlink()
        announce_and_wait(flag)
        return super().run_shard(job)


def test_generate_actor_killed_mid_shard(gen_run, ray_local):  # noqa: F811
    layout, inputs = gen_run
    out = layout.stage("generate", round=1)
    killer = KillWhenAnnounced(out.path / "killed-pid")
    killer.start()
    result, out = generate_run(layout, inputs, CFG, worker_cls=PolicyKilledMidShard)
    killer.join(1)
    assert killer.killed is not None, "the fault was injected"
    with pytest.raises(ProcessLookupError):
        os.kill(killer.killed, 0)
    rows = read_manifest(result.manifest.path, "generations", layout).rows()
    ids = [r["generation_id"] for r in rows]
    assert len(ids) == 6 and len(set(ids)) == 6, "every sample once"
    assert sorted(p.stem for p in out.files("videos").glob("*.mp4")) == sorted(ids)
    assert sorted(p.stem for p in out.files("latents").glob("*.safetensors")) == sorted(ids)
    assert not [p for p in out.path.rglob("*") if ".tmp" in p.name], "no partial files left behind"
    # the same samples as a run without the fault: seeds are per (prompt, k), never per attempt
    clean_out = layout.stage("generate", round=2)
    clean = generate.run(inputs, CFG, layout, clean_out, generate.Lineage("generate", {}, CFG.hash()), round=1)
    clean_rows = read_manifest(clean.manifest.path, "generations", layout).rows()
    assert [(r["generation_id"], r["seed"]) for r in rows] == [(r["generation_id"], r["seed"]) for r in clean_rows]


class CriticKilledMidJob(label.CriticWorker):
    """The real critic worker (the simulated annotators); its first scoring job stops half-way."""

    def score_job(self, job):
        flag = Path(job.videos[0].path).parents[3] / "killed-pid"  # the run folder
        if not flag.exists():
            label.load_video(job.videos[0])  # it was decoding when it died
        announce_and_wait(flag)
        return super().score_job(job)

    def compare_job(self, job):
        return super().compare_job(job)


def test_label_actor_killed_mid_job(tmp_path, ray_local):
    prompts = []
    for seed, violation in enumerate(VIOLATIONS * 2):
        caption, good, bad = twins(seed, violation)
        prompts.append((caption, [bad, good, bad]))
    layout, inputs = make_run(tmp_path, prompts)
    cfg = LabelConfig(backend="ray", actors=2, batch_size=2, pairing="all_pairs")
    flag = layout.run_dir / "killed-pid"
    killer = KillWhenAnnounced(flag)
    killer.start()
    result, rows, scores = label_run(layout, inputs, cfg, worker_cls=CriticKilledMidJob)
    killer.join(1)
    assert killer.killed is not None, "the fault was injected"
    assert len(scores) == 18 and len({s["generation_id"] for s in scores}) == 18, "every video scored once"
    assert len(rows) == 18 and len({r["pair_id"] for r in rows}) == 18, "3 pairs per prompt, each once"
    assert result.counts["unreadable_videos"] == 0
    # the same labels as without the fault, in this process (each pair's raters are seeded by its ids)
    (layout.stage("label", round=1).path / "manifest.parquet").rename(tmp_path / "faulted.parquet")
    _, clean_rows, clean_scores = label_run(layout, inputs, cfg.model_copy(update={"backend": "local"}))
    assert rows == clean_rows and scores == clean_scores
