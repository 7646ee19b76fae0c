"""The report of a run: per round, a markdown file and a Prefect markdown artifact; `prefloop report`
writes the same as one self-contained HTML file.

    runs/<run>/round-NN/report/report.md   (+ its plots as PNG beside it)
    runs/<run>/report.html                 (every image inlined as base64)

Everything in it is read from the stages' markers (`stage.json`: counts, metrics, config, figures)
and the evaluation manifest; nothing is recomputed except the gate's verdict, which is the same
rule the pipeline applies (`tasks.evaluate.gate`) to the same markers. The report for round k shows
rounds 1..k: judge plausibility and caption agreement across rounds with 95% intervals, the reward
model's win rates and held-out accuracy, the fine-tuning curves, and the strip of base vs. aligned
samples for the same prompts and seeds.

A report is a list of blocks (heading, text, table, image) rendered twice: to markdown and to HTML.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_contracts import ROUND_STAGES, RunLayout, StageDir, read_manifest, read_marker
from data_contracts.lineage import atomic_write_bytes
from data_contracts.staleness import run_stages, stage_status

DIMENSIONS = ("vq", "mq", "ta", "overall")
VIDEO_METRICS = ("subject_consistency", "motion_smoothness", "dynamic_degree", "imaging_quality")


@dataclass(frozen=True)
class Block:
    """One piece of a report: `kind` is `h2`, `h3`, `p`, `table` or `image`."""

    kind: str
    text: str = ""
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    path: Path | None = None


@dataclass
class Round:
    """What the markers of one round say (an empty dict for a stage that has not completed)."""

    number: int
    markers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def metrics(self, stage: str) -> dict[str, float]:
        return self.markers.get(stage, {}).get("metrics", {})

    def counts(self, stage: str) -> dict[str, int]:
        return self.markers.get(stage, {}).get("counts", {})


def _rounds(layout: RunLayout, upto: int | None = None) -> list[Round]:
    found = []
    for round_dir in sorted(layout.run_dir.glob("round-[0-9]*")):
        k = int(round_dir.name.split("-")[1])
        if upto is not None and k > upto:
            continue
        markers = {s: m for s in ROUND_STAGES if (m := read_marker(layout.stage(s, k))) and m.get("status") == "complete"}
        if markers:
            found.append(Round(k, markers))
    return found


def _figure(stage_dir: StageDir, recorded: str) -> Path | None:
    """A figure a marker names; looked up in the stage's `figures/` if the run folder moved."""
    path = Path(recorded)
    if path.exists():
        return path
    moved = stage_dir.files("figures") / path.name
    return moved if moved.exists() else None


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _num(m: Mapping[str, float], key: str) -> str:
    return f"{m[key]:.3f}" if key in m else "—"


def _with_ci(m: Mapping[str, float], key: str) -> str:
    if key not in m:
        return "—"
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return f"{_pct(m[key])} ({_pct(low)}–{_pct(high)})" if low is not None and high is not None else _pct(m[key])


# --- plots --------------------------------------------------------------------------------------


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _axes() -> tuple[Any, Any]:
    """One figure of the report's size (small: it is inlined in artifacts and the HTML)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 3.2), dpi=80)


def _errorbar(ax: Any, x: Sequence[float], m: Sequence[Mapping[str, float]], key: str, **style: Any) -> None:
    """Points with their 95% interval; rounds without the metric are left out."""
    xs, ys, lo, hi = [], [], [], []
    for xi, mi in zip(x, m, strict=True):
        if key in mi:
            xs.append(xi)
            ys.append(100 * mi[key])
            lo.append(100 * (mi[key] - mi.get(f"{key}_ci_low", mi[key])))
            hi.append(100 * (mi.get(f"{key}_ci_high", mi[key]) - mi[key]))
    if xs:
        ax.errorbar(xs, ys, yerr=[lo, hi], capsize=4, marker="o", **style)


def plausibility_plot(rounds: Sequence[Round], path: Path) -> Path | None:
    """Judge plausibility and caption agreement of the base and each round's policy, 95% intervals."""
    evaluated = [r for r in rounds if "plausibility_round" in r.metrics("evaluate")]
    if not evaluated:
        return None
    base = evaluated[-1].metrics("evaluate")
    points = [{k.replace("_base", ""): v for k, v in base.items() if "_base" in k}]
    points += [{k.replace("_round", ""): v for k, v in r.metrics("evaluate").items() if "_round" in k} for r in evaluated]
    x = list(range(len(points)))
    fig, ax = _axes()
    _errorbar(ax, x, points, "plausibility", label="judge plausibility", color="C0")
    _errorbar(ax, [xi + 0.1 for xi in x], points, "caption_agreement", label="caption agreement", color="C1")
    ax.set_xticks(x, ["base"] + [f"round {r.number}" for r in evaluated])
    ax.set_ylabel("% of held-out samples")
    ax.set_ylim(0, 100)
    ax.set_title("held-out prompts, same seeds (95% Wilson intervals)")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def win_rate_plot(rounds: Sequence[Round], path: Path) -> Path | None:
    """The reward model's win rate of each round's policy against the base, per dimension."""
    scored = [r for r in rounds if any(f"win_rate_{d}_vs_base" in r.metrics("evaluate") for d in DIMENSIONS)]
    if not scored:
        return None
    fig, ax = _axes()
    width = 0.8 / len(scored)
    for i, r in enumerate(scored):
        m = r.metrics("evaluate")
        xs = [j + i * width for j, d in enumerate(DIMENSIONS) if f"win_rate_{d}_vs_base" in m]
        keys = [f"win_rate_{d}_vs_base" for d in DIMENSIONS if f"win_rate_{d}_vs_base" in m]
        ys = [m[k] for k in keys]
        err = [[m[k] - m.get(f"{k}_ci_low", m[k]) for k in keys], [m.get(f"{k}_ci_high", m[k]) - m[k] for k in keys]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=f"round {r.number}")
    ax.axhline(0.5, color="0.5", linestyle="--", linewidth=0.8)
    return _save_bars(fig, ax, path, width, DIMENSIONS, "win rate vs base", "reward model: round's policy vs base (95% intervals)")


def reward_accuracy_plot(rounds: Sequence[Round], path: Path) -> Path | None:
    """Held-out accuracy (without ties) of each round's reward model, beside a random scorer's."""
    trained = [r for r in rounds if any(f"{d}_acc_wo_ties" in r.metrics("train_reward") for d in DIMENSIONS[:3])]
    if not trained:
        return None
    fig, ax = _axes()
    width = 0.8 / len(trained)
    for i, r in enumerate(trained):
        m = r.metrics("train_reward")
        dims = [d for d in DIMENSIONS[:3] if f"{d}_acc_wo_ties" in m]
        xs = [DIMENSIONS.index(d) + i * width for d in dims]
        ax.bar(xs, [m[f"{d}_acc_wo_ties"] for d in dims], width, label=f"round {r.number}")
        ax.scatter(xs, [m.get(f"{d}_random_wo_ties", float("nan")) for d in dims], color="k", marker="_", s=200,
                   label="random" if i == 0 else None, zorder=3)
    return _save_bars(fig, ax, path, width, DIMENSIONS[:3], "held-out accuracy w/o ties", "reward model accuracy per round")


def _save_bars(fig: Any, ax: Any, path: Path, width: float, dims: Sequence[str], ylabel: str, title: str) -> Path:
    """Bars grouped by dimension (one bar a round), a rate axis from 0 to 1."""
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(dims))], [d.upper() for d in dims])
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


# --- the blocks ---------------------------------------------------------------------------------


def _gate_verdict(rounds: Sequence[Round], r: Round) -> str:
    """The gate's verdict on round r, by the pipeline's rule on the same markers."""
    from tasks.evaluate import gate

    current = r.metrics("evaluate")
    if "plausibility_round" not in current and current.get("policy_changed", 1.0) != 0.0:
        return "not gated: no judge plausibility in the evaluation"
    previous = next((p.metrics("evaluate") for p in rounds if p.number == r.number - 1), None)
    margin = r.markers["evaluate"].get("config", {}).get("gate_margin", 0.0)
    return gate(current, previous, margin)[1]


def _strip_rows(layout: RunLayout, r: Round) -> list[tuple[str, ...]]:
    """Which prompt and seed each pair of rows of the evaluate strip shows, with the judge's verdicts."""
    marker = r.markers["evaluate"]
    n = marker.get("config", {}).get("strip_pairs", 0)
    try:
        rows = read_manifest(layout.stage("evaluate", r.number).manifest_path, "evaluation", layout).rows()
    except (OSError, ValueError):
        return []
    base = [x for x in rows if x["eval_id"].startswith("base-")][:n]
    ours = {(x["prompt_id"], x["seed"]): x for x in rows if x["eval_id"].startswith("round-")}
    verdict = {True: "plausible", False: "implausible", None: "—"}
    out = []
    for i, b in enumerate(base):
        o = ours.get((b["prompt_id"], b["seed"]), {})
        out.append((f"{2 * i + 1}–{2 * i + 2}", b["prompt"], str(b["seed"]), verdict[b["plausible"]], verdict[o.get("plausible")]))
    return out


def report_blocks(layout: RunLayout, upto: int | None = None) -> list[Block]:
    """The report of rounds 1..`upto` (all rounds when None), plots written to the round's report folder."""
    rounds = _rounds(layout, upto)
    blocks = [Block("h2", f"prefloop run `{layout.run}`" + (f" — through round {rounds[-1].number}" if rounds else ""))]
    if not rounds:
        return [*blocks, Block("p", "No round has completed a stage yet.")]
    figures = layout.round_report_dir(rounds[-1].number)
    # 1. across rounds
    judge = [("base", _with_ci(rounds[-1].metrics("evaluate"), "plausibility_base"),
              _with_ci(rounds[-1].metrics("evaluate"), "caption_agreement_base"), "—", "—")]
    for r in rounds:
        m = r.metrics("evaluate")
        if "evaluate" in r.markers:
            wr = f"{m['win_rate_overall_vs_base']:.2f}" if "win_rate_overall_vs_base" in m else "—"
            judge.append((f"round {r.number}", _with_ci(m, "plausibility_round"), _with_ci(m, "caption_agreement_round"),
                          wr, _gate_verdict(rounds, r)))
    blocks += [
        Block("h3", "Held-out evaluation across rounds"),
        Block("p", "The independent judge on held-out prompts; every policy sampled with the same prompts and seeds. "
              "Intervals are 95% Wilson intervals."),
        Block("table", header=("policy", "judge plausibility (95% CI)", "caption agreement (95% CI)",
                               "reward-model win rate vs base", "gate"), rows=tuple(judge)),
    ]
    for title, plot, name in (
        ("judge plausibility and caption agreement", plausibility_plot, "plausibility.png"),
        ("reward-model win rates vs base", win_rate_plot, "win_rates.png"),
        ("reward-model held-out accuracy", reward_accuracy_plot, "reward_accuracy.png"),
    ):
        path = plot(rounds, figures / name)
        blocks.append(Block("image", title, path=path) if path else Block("p", f"({title}: no round has these numbers)"))
    hacking = [r.number for r in rounds if r.metrics("evaluate").get("reward_hacking_warning", 0.0) > 0]
    if hacking:
        blocks.append(Block("p", f"**Reward-hacking warning** in round(s) {', '.join(map(str, hacking))}: the reward "
                            "model's wins rose while the judge's plausibility fell."))
    video = [(name.replace("_", " "), f"{rounds[-1].metrics('evaluate').get(name + '_base', float('nan')):.3f}",
              *(f"{r.metrics('evaluate')[name + '_round']:.3f}" if name + "_round" in r.metrics("evaluate") else "—"
                for r in rounds))
             for name in VIDEO_METRICS if name + "_base" in rounds[-1].metrics("evaluate")]
    if video:
        blocks += [Block("h3", "VBench-like metrics"),
                   Block("table", header=("metric", "base", *(f"round {r.number}" for r in rounds)), rows=tuple(video))]
    # 2. each round
    for r in rounds:
        blocks += _round_blocks(layout, rounds, r)
    # 3. where the stages stand
    blocks += [Block("h3", "Stages"),
               Block("table", header=("stage", "status", "seconds", "note"), rows=tuple(
                   (d.label, *_status_row(d)) for d in run_stages(layout)
                   if d.round is None or d.round <= rounds[-1].number))]
    return blocks


def _status_row(d: StageDir) -> tuple[str, str, str]:
    status, why = stage_status(d)
    return status, str((read_marker(d) or {}).get("seconds", "—")), why


def _round_blocks(layout: RunLayout, rounds: Sequence[Round], r: Round) -> list[Block]:
    blocks = [Block("h3", f"Round {r.number}")]
    gen, lab, fin = r.counts("generate"), r.counts("label"), r.counts("finetune")
    facts = []
    if gen:
        facts.append(f"generated {gen.get('samples', '?')} videos for {gen.get('prompts', '?')} prompts")
    if lab:
        facts.append(f"labelled {lab.get('pairs', '?')} pairs")
    if "finetune" in r.markers:
        method = r.markers["finetune"].get("config", {}).get("train", {}).get("method", "?")
        if fin.get("real_clip_steps"):
            facts.append(f"trained every weight on {fin.get('real_clips', '?')} selected real clips for "
                         f"{fin['real_clip_steps']} steps")
        facts.append(f"fine-tuned with {method} on {fin.get('pairs', '?')} pairs for {fin.get('steps_done', '?')} steps"
                     + (" (no pair decided: policy unchanged)" if fin.get("policy_unchanged") else ""))
    if "evaluate" in r.markers:
        facts.append(f"gate: {_gate_verdict(rounds, r)}")
    blocks.append(Block("p", "; ".join(facts) + "." if facts else "No stage of this round has completed."))
    tr = r.metrics("train_reward")
    if tr:
        keys = ("acc_wo_ties", "acc_w_ties", "random_wo_ties")
        rows = tuple((d.upper(), *(_num(tr, f"{d}_{k}") for k in keys))
                     for d in DIMENSIONS[:3] if any(f"{d}_{k}" in tr for k in keys))
        c = r.counts("train_reward")
        blocks.append(Block("p", f"Reward model: {c.get('train_pairs', '?')} training pairs, "
                            f"{c.get('heldout_pairs', '?')} held out (accuracy w/o ties needs a held-out pair that is no tie)."))
        if rows:
            blocks.append(Block("table", header=("dimension", "accuracy w/o ties", "accuracy w/ ties", "random w/o ties"), rows=rows))
    for stage, wanted in (("finetune", "loss"), ("evaluate", "base")):
        marker = r.markers.get(stage, {})
        for title, recorded in marker.get("images", {}).items():
            path = _figure(layout.stage(stage, r.number), recorded)
            if path is not None and wanted in title:
                blocks.append(Block("image", f"round {r.number} {stage}: {title}", path=path))
                if stage == "evaluate":
                    legend = _strip_rows(layout, r)
                    if legend:
                        blocks.append(Block("table", header=("strip rows", "prompt", "seed", "base", f"round {r.number}"),
                                            rows=tuple(legend)))
    return blocks


# --- rendering ----------------------------------------------------------------------------------


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block], relative_to: Path | None = None) -> str:
    """Markdown; images as paths relative to `relative_to`, or inlined as data URIs when None."""
    out = []
    for b in blocks:
        if b.kind in ("h2", "h3"):
            out.append(f"{'#' * int(b.kind[1])} {b.text}")
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "table":
            out.append("\n".join(["| " + " | ".join(map(_md_cell, b.header)) + " |",
                                  "|" + "---|" * len(b.header),
                                  *("| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows)]))
        elif b.kind == "image":
            src = _png_data_uri(b.path) if relative_to is None else os.path.relpath(b.path, relative_to)
            out.append(f"**{b.text}**\n\n![{b.text}]({src})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained HTML page: styles inline, every image a base64 data URI."""
    import re

    def inline(text: str) -> str:  # the few markdown marks the blocks use: **bold**, `code`
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    body = []
    for b in blocks:
        if b.kind in ("h2", "h3"):
            body.append(f"<{b.kind}>{inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{inline(b.text)}</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{inline(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "image":
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="{_png_data_uri(b.path)}">'
                        f"<figcaption>{inline(b.text)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
             "th{background:#f4f4f4}img{max-width:100%;image-rendering:pixelated}figcaption{font-size:.9em;color:#555}"
             "code{background:#f4f4f4;padding:0 .2em}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# --- writing and publishing ---------------------------------------------------------------------


def write_round_report(layout: RunLayout, round: int) -> tuple[Path, list[Block]]:
    """`round-NN/report/report.md` (rounds 1..round) with its plots beside it."""
    blocks = report_blocks(layout, upto=round)
    path = layout.round_report_dir(round) / "report.md"
    atomic_write_bytes(path, to_markdown(blocks, relative_to=path.parent).encode())
    return path, blocks


def write_html_report(layout: RunLayout) -> Path:
    """`report.html`: the report through the last round, one file with every image inlined."""
    blocks = report_blocks(layout)
    atomic_write_bytes(layout.report_path, to_html(blocks, f"prefloop run {layout.run}").encode())
    return layout.report_path


def publish_round_report(layout: RunLayout, round: int) -> Path:
    """Write the round's report and publish it as a Prefect markdown artifact (images inlined)."""
    from prefect.artifacts import create_markdown_artifact

    from flows.stages import artifact_key

    path, blocks = write_round_report(layout, round)
    create_markdown_artifact(
        key=artifact_key(layout.run, f"round-{round:02d}/report"),
        markdown=to_markdown(blocks),
        description=f"report of run `{layout.run}` through round {round}; also `{path}`",
    )
    return path


def report_task(layout: RunLayout, round: int) -> str:
    """`publish_round_report` as a Prefect task of the whole-DAG flow run (never cached: markers change).

    The report is a view of what the stages wrote: when it fails, the task run shows the error and
    the run goes on (the stages' results are intact; `prefloop report` can write it later)."""
    from prefect import get_run_logger, task
    from prefect.cache_policies import NO_CACHE

    publish = task(publish_round_report, name="report", cache_policy=NO_CACHE)
    state = publish.with_options(name=f"round-{round:02d}/report")(layout, round, return_state=True)
    if not state.is_completed():
        get_run_logger().warning("round %d report failed (the run goes on): %s", round, state.message)
        return f"report failed: {state.message}"
    return str(state.result())
