"""The round report and `prefloop report`: built from the stages' markers and manifests only.

A two-round run is laid out from markers written with known numbers (the metrics a real
`evaluate` / `train_reward` / `finetune` record), real manifests and small PNG figures, so every
figure and number in the report can be checked against what was written.
"""

from __future__ import annotations

import asyncio
import base64
import re

import cv2
import numpy as np
import pytest

from data_contracts import Lineage, RunLayout, write_manifest, write_marker
from flows.cli import main
from flows.report import publish_round_report, write_html_report, write_round_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPTS = ("a red ball falls", "a blue ball rolls to the left")


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (16, 48, 3), dtype=np.uint8)
    path.write_bytes(cv2.imencode(".png", img)[1].tobytes())
    return str(path)


def _checkpoint(layout, out):
    weights = out.files("weights") / "w.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"w")
    row = {"checkpoint_id": out.label, "kind": "policy", "format": "safetensors", "path": layout.stored_path(weights)}
    return write_manifest([row], "checkpoints", out.manifest_path, layout, Lineage(stage=out.stage))


def _evaluation(layout, out, k):
    rows = []
    for role, plausible in (("base", (True, False)), (f"round-{k}", (True, True))):
        for i, prompt in enumerate(PROMPTS):
            video = out.files("videos") / f"{role}-{i}.mp4"
            video.parent.mkdir(parents=True, exist_ok=True)
            video.write_bytes(b"mp4")
            rows.append({"eval_id": f"{role}-p{i}-000", "round": k, "policy_id": role, "prompt_id": f"p{i}",
                         "prompt": prompt, "seed": 100 + i, "video_path": layout.stored_path(video),
                         "plausible": plausible[i], "caption_agreement": True})
    return write_manifest(rows, "evaluation", out.manifest_path, layout, Lineage(stage="evaluate"))


def _rate(prefix, value):
    return {prefix: value, f"{prefix}_ci_low": value - 0.1, f"{prefix}_ci_high": value + 0.1}


def make_run(tmp_path, rounds=2, reward_model=True, hacking_in=None) -> RunLayout:
    layout = RunLayout(tmp_path, "rep")
    for k in range(1, rounds + 1):
        if reward_model:
            out = layout.stage("train_reward", k)
            write_marker(out, _checkpoint(layout, out), f"tr{k}", {
                "status": "complete", "counts": {"train_pairs": 40, "heldout_pairs": 10},
                "metrics": {"mq_acc_wo_ties": 0.6 + 0.1 * k, "mq_acc_w_ties": 0.5, "mq_random_wo_ties": 0.5,
                            "vq_acc_wo_ties": 0.7, "vq_random_wo_ties": 0.5}})
        out = layout.stage("finetune", k)
        write_marker(out, _checkpoint(layout, out), f"ft{k}", {
            "status": "complete", "config": {"train": {"method": "flow_dpo"}},
            "counts": {"pairs": 46, "steps_done": 300, **({"real_clip_steps": 1000, "real_clips": 841} if k == 2 else {})},
            "metrics": {"final_loss": 0.07},
            "images": {"loss and implicit accuracy": _png(out.files("figures") / "training_curves.png", k)}})
        out = layout.stage("evaluate", k)
        metrics = {**_rate("plausibility_base", 0.2), **_rate("caption_agreement_base", 0.3),
                   **_rate("plausibility_round", 0.2 + 0.1 * k), **_rate("caption_agreement_round", 0.3),
                   "motion_smoothness_base": 0.9, "motion_smoothness_round": 0.91, "policy_changed": 1.0,
                   "reward_hacking_warning": 1.0 if k == hacking_in else 0.0}
        if reward_model:
            metrics.update({**_rate("win_rate_mq_vs_base", 0.6), **_rate("win_rate_overall_vs_base", 0.55 + 0.1 * k)})
        strip = _png(out.files("figures") / "base_vs_round.png", 10 + k)
        write_marker(out, _evaluation(layout, out, k), f"ev{k}", {
            "status": "complete", "config": {"gate_margin": 0.05, "strip_pairs": 2}, "counts": {"pairs": 2},
            "metrics": metrics, "images": {"base (rows 1, 3, …) vs. round (rows 2, 4, …): same prompts and seeds": strip}})
    return layout


def test_round_report_shows_every_round_so_far_from_the_markers(tmp_path):
    layout = make_run(tmp_path)
    path, _ = write_round_report(layout, 2)
    assert path == tmp_path / "rep" / "round-02" / "report" / "report.md"
    md = path.read_text()
    # 1. judge rates with their intervals, across rounds, and the gate's verdict by the pipeline's rule
    assert "| base | 20.0% (10.0%–30.0%) | 30.0% (20.0%–40.0%) | — | — |" in md
    assert "| round 1 | 30.0% (20.0%–40.0%) | 30.0% (20.0%–40.0%) | 0.65 | keep: plausibility 0.300 vs 0.200 of the base policy" in md
    assert "| round 2 | 40.0% (30.0%–50.0%)" in md and "keep: plausibility 0.400 vs 0.300 of the previous round's policy" in md
    assert "| motion smoothness | 0.900 | 0.910 | 0.910 |" in md
    # 2. reward-model accuracy per round, fine-tuning facts
    assert "| MQ | 0.800 | 0.500 | 0.500 |" in md and "| MQ | 0.700 | 0.500 | 0.500 |" in md
    assert "fine-tuned with flow_dpo on 46 pairs for 300 steps" in md
    assert md.count("trained every weight on 841 selected real clips for 1000 steps; fine-tuned with flow_dpo") == 1
    # 3. plots beside the report, linked relatively; reused figures of the stages linked where they are
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"plausibility.png", "win_rates.png", "reward_accuracy.png"} <= set(links)
    assert "../finetune/figures/training_curves.png" in links and "../../round-01/finetune/figures/training_curves.png" in links
    assert "../evaluate/figures/base_vs_round.png" in links
    for link in links:
        assert (path.parent / link).read_bytes().startswith(PNG_MAGIC), link
    # 4. the strip's rows named: the same prompt and seed for base and round, with the judge's verdicts
    assert "| 3–4 | a blue ball rolls to the left | 101 | implausible | plausible |" in md
    assert "Reward-hacking" not in md

    round1 = write_round_report(layout, 1)[0].read_text()
    assert "round 1" in round1 and "round 2" not in round1


def test_missing_numbers_are_said_not_drawn(tmp_path):
    layout = make_run(tmp_path, rounds=1, reward_model=False, hacking_in=1)
    md = write_round_report(layout, 1)[0].read_text()
    assert "(reward-model win rates vs base: no round has these numbers)" in md
    assert "(reward-model held-out accuracy: no round has these numbers)" in md
    assert not (layout.round_report_dir(1) / "win_rates.png").exists()
    assert "**Reward-hacking warning** in round(s) 1" in md


def test_prefloop_report_writes_one_self_contained_html(tmp_path, capsys):
    layout = make_run(tmp_path)
    assert main(["--runs-root", str(tmp_path), "report", "--run", "rep"]) == 0
    assert str(layout.report_path) in capsys.readouterr().out
    page = layout.report_path.read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 + 2 + 2  # three plots, a loss curve and a strip per round
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "href=" not in page and "<link" not in page  # nothing outside the file
    assert "<td>40.0% (30.0%–50.0%)</td>" in page and "<strong>" not in page
    with pytest.raises(SystemExit, match="no run `nope`"):
        main(["--runs-root", str(tmp_path), "report", "--run", "nope"])


def test_round_report_is_a_prefect_markdown_artifact_with_images_inlined(tmp_path, prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    layout = make_run(tmp_path)

    @flow(name="prefloop-report-test")
    def publish() -> None:
        publish_round_report(layout, 2)

    state = publish(return_state=True)
    assert state.is_completed(), state

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rep-round-02-report"])))

    (artifact,) = asyncio.run(read())
    assert artifact.type == "markdown" and artifact.flow_run_id == state.state_details.flow_run_id
    images = re.findall(r"!\[[^\]]*\]\((data:image/png;base64,[^)]+)\)", artifact.data)
    assert len(images) == 7
    assert "| round 2 | 40.0% (30.0%–50.0%)" in artifact.data
    assert write_html_report(layout).exists()
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)  # the flow's logs reach the server before the session stops it
