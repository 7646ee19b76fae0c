"""`prefloop`: run the DAG, run one stage, list runs, reports, deployments, the local Prefect server.

    prefloop run [--run demo] [--config FILE] [--set stage.key=value …]
    prefloop stage ingest --run demo [--round K] [--force]
    prefloop runs
    prefloop report --run demo                  (runs/demo/report.html)
    prefloop sample --run demo --guidance VQ:MQ:TA=0:1:0 --weight 2 --prompts "a red ball falls" --out DIR
    prefloop deploy [--file F] [--only FLOW/NAME]
    prefloop serve [--file F] [--pool P]
    prefloop server [--stop | --status]

`--help` stays fast: Prefect, torch and Ray are imported inside the commands.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_contracts import ROUND_STAGES, STAGES, RunLayout, check_run_name, read_marker, server_state_dir
from data_contracts.staleness import run_stages, stage_status


def _runs_root(args: argparse.Namespace) -> Path:
    return Path(args.runs_root or os.environ.get("PREFLOOP_RUNS", "runs")).absolute()


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="demo", help="run name: a folder under the runs root (default: demo)")
    p.add_argument("--config", type=Path, help="whole-run YAML config (sections: run, ingest, …)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="override one config value, e.g. --set ingest.source=/data/clips (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="recompute even if the stage's cache key is unchanged")


@contextmanager
def run_lock(layout: RunLayout) -> Iterator[None]:
    """One writer per run directory: a second `prefloop` on the same run is refused."""
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    with open(layout.lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise SystemExit(
                f"run `{layout.run}` is in use by another prefloop process ({f.read().strip() or 'unknown pid'}); "
                "wait for it to finish or use another --run name"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare(args: argparse.Namespace):
    from flows.config import ConfigError, resolve_config, save_config

    runs_root = _runs_root(args)
    check_run_name(args.run)
    saved = runs_root / args.run / "config.yaml"
    try:
        cfg = resolve_config(saved, args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"prefloop: {err}") from None
    layout = cfg.layout(runs_root, args.run)
    return cfg, layout, save_config


def _connect_prefect(runs_root: Path) -> object:
    """Point this process at a real Prefect server (never the ephemeral mode), starting one if needed."""
    from infra.prefect_server import ensure_server, use_server

    info, started = ensure_server(server_state_dir(runs_root))
    use_server(info)
    verb = "started" if started else "using"
    print(f"prefloop: {verb} Prefect server {info.ui_url} (stop it with `prefloop server --stop`)", flush=True)
    return info


def _flow_run_url(info: object, state: object) -> str:
    return f"{info.ui_url}/runs/flow-run/{state.state_details.flow_run_id}"


def cmd_run(args: argparse.Namespace) -> int:
    cfg, layout, save_config = _prepare(args)
    with run_lock(layout):
        save_config(cfg, layout.config_path)
        info = _connect_prefect(layout.runs_root)
        from flows.pipeline import iterative_alignment

        state = iterative_alignment(
            layout.run, str(layout.runs_root), cfg.model_dump(mode="json"), force=args.force, return_state=True
        )
        print(f"prefloop: flow run in the Prefect UI: {_flow_run_url(info, state)}")
        if not state.is_completed():
            print(f"prefloop: run `{layout.run}` ended {state.name}: {state.message}", file=sys.stderr)
            return 1
    _print_run(layout.runs_root, layout.run)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    cfg, layout, save_config = _prepare(args)
    if args.name in ROUND_STAGES and args.round is None:
        raise SystemExit(f"prefloop: stage `{args.name}` runs per round: add --round K")
    with run_lock(layout):
        save_config(cfg, layout.config_path)
        info = _connect_prefect(layout.runs_root)
        from flows.stages import STAGE_FLOWS

        if args.name not in STAGE_FLOWS:
            raise SystemExit(f"prefloop: stage `{args.name}` is not built yet; built stages: {', '.join(STAGE_FLOWS)}")
        kwargs = {"round": args.round} if args.name in ROUND_STAGES else {}
        state = STAGE_FLOWS[args.name](
            layout.run, str(layout.runs_root), cfg.model_dump(mode="json"), force=args.force, return_state=True, **kwargs
        )
        print(f"prefloop: flow run in the Prefect UI: {_flow_run_url(info, state)}")
        if not state.is_completed():
            print(f"prefloop: stage `{args.name}` ended {state.name}: {state.message}", file=sys.stderr)
            return 1
    _print_run(layout.runs_root, layout.run)
    return 0


def _print_run(runs_root: Path, run: str) -> None:
    layout = RunLayout(runs_root, run)
    print(f"run {run}  ({layout.run_dir})")
    stages = run_stages(layout)
    if not stages:
        print("  (no stages yet)")
    for stage_dir in stages:
        marker = read_marker(stage_dir) or {}
        status, why = stage_status(stage_dir)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(marker["finished_at"])) if "finished_at" in marker else "-"
        counts = marker.get("counts", {})
        # plain counts (videos, usable, …) before the per-reason breakdowns ("reason:…")
        ordered = sorted(counts.items(), key=lambda kv: (":" in kv[0], kv[0] != "videos", kv[0]))
        shown = ", ".join(f"{k}={v}" for k, v in ordered[:8])
        print(f"  {stage_dir.label:<22} {status:<10} {when:<16} {marker.get('seconds', '-')!s:>8}s  {shown}")
        if why:
            print(f"  {'':<22} {status}: {why}")


def cmd_runs(args: argparse.Namespace) -> int:
    runs_root = _runs_root(args)
    runs = sorted(p.name for p in runs_root.iterdir() if p.is_dir() and not p.name.startswith(".")) if runs_root.exists() else []
    if not runs:
        print(f"no runs under {runs_root} (start one with `prefloop run --run NAME`)")
        return 0
    for run in runs:
        _print_run(runs_root, run)
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from infra.prefect_server import find_server, start_server, stop_server

    state_dir = server_state_dir(_runs_root(args))
    if args.stop:
        print("prefloop: server stopped" if stop_server(state_dir) else "prefloop: no server was running")
        return 0
    info = find_server(state_dir)
    if args.status:
        print(json.dumps(info.__dict__, default=str) if info else "prefloop: no server running")
        return 0 if info else 1
    if info is None:
        info = start_server(state_dir, host=args.host, port=args.port)
        print(f"prefloop: started Prefect server (pid {info.pid})")
    print(f"Prefect UI:  {info.ui_url}")
    print(f"Prefect API: {info.api_url}")
    print(f"other prefloop commands find it through {state_dir / 'server.json'}; stop it with `prefloop server --stop`")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    cfg, layout, save_config = _prepare(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from models.preference_training import PreferenceTrainConfig

    known = PreferenceTrainConfig.model_fields["method"].annotation.__args__
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise SystemExit(f"prefloop compare: unknown method(s) {unknown}; choose from {', '.join(known)}")
    with run_lock(layout):
        save_config(cfg, layout.config_path)
        info = _connect_prefect(layout.runs_root)
        from flows.compare import compare_flow

        state = compare_flow(
            layout.run, str(layout.runs_root), cfg.model_dump(mode="json"), round=args.round, methods=methods,
            force=args.force, return_state=True,
        )
        print(f"prefloop: flow run in the Prefect UI: {_flow_run_url(info, state)}")
        if not state.is_completed():
            print(f"prefloop: compare ended {state.name}: {state.message}", file=sys.stderr)
            return 1
    return 0


def _existing_run(args: argparse.Namespace, command: str) -> RunLayout:
    """The layout of the run `--run` names, which must exist (commands that read a run, never start one)."""
    runs_root = _runs_root(args)
    check_run_name(args.run)
    layout = RunLayout(runs_root, args.run)
    if not layout.run_dir.exists():
        raise SystemExit(f"prefloop {command}: no run `{args.run}` under {runs_root} (list them with `prefloop runs`)")
    return layout


def cmd_report(args: argparse.Namespace) -> int:
    layout = _existing_run(args, "report")
    from flows.report import write_html_report

    print(f"prefloop: report of run `{args.run}` written to {write_html_report(layout)}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    layout = _existing_run(args, "sample")
    from models.reward_guidance import RewardGuidanceConfig, parse_weights
    from tasks.generate import read_prompt_file
    from tasks.sample import sample_to_dir
    from tasks.video_io import read_image

    if len(args.prompts) == 1 and Path(args.prompts[0]).is_file():
        prompts = read_prompt_file(Path(args.prompts[0]), "sample")
    else:
        prompts = [p.strip() for p in args.prompts if p.strip()]
    try:
        guidance = None
        if args.weight > 0:
            guidance = RewardGuidanceConfig(
                weights=parse_weights(args.guidance), scale=args.weight, reward_model=args.reward_model,
                mode=args.mode, max_ratio=args.max_ratio,
            )
        first = read_image(args.first_frame) if args.first_frame else None
        listing = sample_to_dir(
            layout, prompts, args.out, policy=args.policy, samples_per_prompt=args.samples, seed=args.seed,
            guidance=guidance, reward_model=args.reward_model, first_frame=first,
        )
    except (ValueError, OSError) as err:
        raise SystemExit(f"prefloop sample: {err}") from None
    stats = listing["guidance_stats"]
    guided = "" if stats is None else (
        f", guided ({listing['guidance_mode']}): {stats['clipped']} of {stats['corrections']} corrections clipped"
    )
    print(f"prefloop: {len(listing['samples'])} videos of policy {listing['policy_id']} in {args.out}{guided}")
    return 0


def _load_deployments(path: Path | None):
    from infra.deployments import DEFAULT_FILE, DeploymentSpecError, load_spec

    try:
        return load_spec(path or DEFAULT_FILE)
    except DeploymentSpecError as err:
        raise SystemExit(f"prefloop: {err}") from None


def cmd_deploy(args: argparse.Namespace) -> int:
    spec = _load_deployments(args.file)
    info = _connect_prefect(_runs_root(args))
    from infra.deployments import DeploymentSpecError, deploy

    try:
        applied = deploy(spec, only=args.only)
    except DeploymentSpecError as err:
        raise SystemExit(f"prefloop: {err}") from None
    for planned, deployment_id in applied:
        print(f"  {planned.full_name:<34} pool {planned.work_pool:<14} {planned.schedule_text}")
        print(f"  {'':<34} {info.ui_url}/deployments/deployment/{deployment_id}")
    pools = sorted({p.work_pool for p, _ in applied})
    print(f"prefloop: {len(applied)} deployment(s) on {info.api_url}; work pools and their limits: {info.ui_url}/work-pools")
    for pool in pools:
        print(f"  start a worker for `{pool}`: PREFECT_API_URL={info.api_url} {Path(sys.executable).parent / 'prefect'} "
              f"worker start --pool {pool}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    spec = _load_deployments(args.file)
    info = _connect_prefect(_runs_root(args))
    from infra.deployments import DeploymentSpecError, serve

    print(f"prefloop: serving deployments{' of pool ' + args.pool if args.pool else ''} against {info.ui_url} "
          "(Ctrl-C stops; their schedules pause)", flush=True)
    # A process started in the background by a non-interactive shell inherits SIGINT as ignored, and
    # Python then keeps it so: Ctrl-C / `kill -INT` would never stop the runner or pause the schedules.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        serve(spec, pool=args.pool)
    except DeploymentSpecError as err:
        raise SystemExit(f"prefloop: {err}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefloop", description="Preference alignment of text-to-video models.")
    parser.add_argument("--runs-root", help="folder holding the runs (default: ./runs, or $PREFLOOP_RUNS)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole DAG (iterative_alignment flow)")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stage", help="run (or rerun) one stage of a run as its own flow")
    p.add_argument("name", choices=STAGES, help="the stage")
    p.add_argument("--round", type=int, help="the round, for per-round stages")
    _add_config_args(p)
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("compare", help="train several fine-tuning methods on one round's pairs and evaluate them side by side")
    p.add_argument("--round", type=int, default=1, help="the round whose pairs are used (default 1)")
    p.add_argument("--methods", default="flow_dpo,sft,rwr", help="comma-separated finetune.train.method values")
    _add_config_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("runs", help="list runs and the status of their stages")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("report", help="write the run's report (plots, tables, frame strips) as one HTML file")
    p.add_argument("--run", default="demo", help="run name (default: demo)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sample", help="sample videos from a run's policy, optionally reward-guided (Flow-NRG)")
    p.add_argument("--run", default="demo", help="run name (default: demo)")
    p.add_argument("--prompts", nargs="+", required=True, help="prompts, or one text file with a prompt per line")
    p.add_argument("--out", type=Path, required=True, help="folder for the mp4s and samples.json")
    p.add_argument("--guidance", default="VQ:MQ:TA=0:1:0", help="reward weights per dimension (default VQ:MQ:TA=0:1:0)")
    p.add_argument("--weight", type=float, default=0.0, help="guidance scale w of v - w·t/(1-t)·∇r (default 0: none)")
    p.add_argument("--mode", choices=("auto", "noisy", "clean_x0"), default="auto",
                   help="reward on x_t (noisy-latent model) or on x̂0 = x_t - t·v (clean model); auto: by the checkpoint")
    p.add_argument("--max-ratio", type=float, default=1.0, help="clip each correction to this multiple of ‖v‖")
    p.add_argument("--reward-model", help="reward model folder (default: the run's latest train_reward checkpoint)")
    p.add_argument("--policy", choices=("latest", "base"), default="latest", help="latest finetuned policy or the base")
    p.add_argument("--samples", type=int, default=1, help="videos per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--first-frame", help="an image (the policy's size) to hold as frame 0 of every video")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("deploy", help="create the work pools and deployments of infra/deployments.yaml on the server")
    p.add_argument("--file", type=Path, help="deployments file (default: infra/deployments.yaml)")
    p.add_argument("--only", action="append", default=[], metavar="FLOW/NAME",
                   help="apply only this deployment, e.g. iterative_alignment/nightly (repeatable)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("serve", help="run the deployments of infra/deployments.yaml in this process (no worker)")
    p.add_argument("--file", type=Path, help="deployments file (default: infra/deployments.yaml)")
    p.add_argument("--pool", help="serve only the deployments of this work pool, at its concurrency limit")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("server", help="start the local Prefect server (UI included) on a free port")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, help="port (default: a free one)")
    p.add_argument("--stop", action="store_true", help="stop the server prefloop started")
    p.add_argument("--status", action="store_true", help="print the running server's address")
    p.set_defaults(func=cmd_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
