"""Deployments of prefloop's flows, from `infra/deployments.yaml`: work pools, schedules, parameters.

    prefloop deploy [--file F] [--only FLOW/NAME]   work pools + deployments on the server; a process
                                                    worker (`prefect worker start --pool P`) runs them
    prefloop serve  [--file F] [--pool P]           this process runs the deployments (no worker)

The YAML names flows (`iterative_alignment` or a stage), never Python paths; each becomes a
deployment `<flow>/<name>` whose entrypoint is a module path (`flows.stages.generate_flow`) pulled
from this repository's folder (`Flow.from_source` with a local path: the worker's pull step is
`set_working_directory`, so the worker runs on a machine that has this checkout and its venv).

Concurrency per GPU pool: each work pool carries Prefect's work-pool concurrency limit (the number of
flow runs the server lets the pool's workers run at once; the rest wait as Scheduled/Late), and a
deployment may add its own limit (`concurrency_limit`, runs of that deployment at once, ENQUEUE:
a run due while the previous one still runs waits for it).

The spec is checked before anything reaches the server: unknown keys, a bad cron string, an unknown
flow or work pool, a parameter the flow does not take, and an invalid run config are one error each,
naming the file and the deployment.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILE = REPO_ROOT / "infra" / "deployments.yaml"

# Flow name in the YAML -> its module-path entrypoint.
FLOW_ENTRYPOINTS: Mapping[str, str] = {
    "iterative_alignment": "flows.pipeline.iterative_alignment",
    **{s: f"flows.stages.{s}_flow" for s in
       ("ingest", "bootstrap", "select", "generate", "label", "train_reward", "finetune", "evaluate")},
}
_ROUND_FLOWS = frozenset({"generate", "label", "train_reward", "finetune", "evaluate"})
_PARAMETERS = frozenset({"run", "runs_root", "config", "force"})


class DeploymentSpecError(ValueError):
    """A deployments file that cannot be applied; the message names the file and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WorkPoolSpec(_Strict):
    concurrency_limit: int | None = Field(None, ge=1, description="flow runs at once on this pool; none: no limit")
    description: str = ""


class DeploymentSpec(_Strict):
    name: str = Field(min_length=1, description="deployment name; the full name is `<flow>/<name>`")
    flows: tuple[str, ...] = Field(min_length=1, description="flows deployed under this name")
    work_pool: str
    cron: str | None = Field(None, description="a cron schedule, e.g. `0 2 * * *`")
    interval_seconds: float | None = Field(None, gt=0, description="an interval schedule instead of cron")
    timezone: str | None = Field(None, description="IANA timezone of the cron schedule (default UTC)")
    paused: bool = False
    concurrency_limit: int | None = Field(None, ge=1, description="runs of this deployment at once (others wait)")
    tags: tuple[str, ...] = ()
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("flows")
    @classmethod
    def _known_flows(cls, flows: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [f for f in flows if f not in FLOW_ENTRYPOINTS]
        if unknown:
            raise ValueError(f"unknown flow(s) {unknown}; flows: {', '.join(FLOW_ENTRYPOINTS)}")
        return flows

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, cron: str | None) -> str | None:
        if cron is not None:
            from prefect.client.schemas.schedules import CronSchedule

            try:
                CronSchedule(cron=cron)
            except ValidationError:
                raise ValueError(f"`{cron}` is not a cron string; write five fields, e.g. `0 2 * * *` (02:00 daily)") from None
        return cron

    @model_validator(mode="after")
    def _one_schedule(self) -> DeploymentSpec:
        if self.cron is not None and self.interval_seconds is not None:
            raise ValueError("give `cron` or `interval_seconds`, not both")
        return self


class Defaults(_Strict):
    runs_root: str = Field("runs", description="folder of the runs; relative to the repository")
    config: dict[str, Any] = Field(default_factory=dict, description="run config sections (run, ingest, …)")


class DeploymentsFile(_Strict):
    work_pools: dict[str, WorkPoolSpec]
    defaults: Defaults = Field(default_factory=Defaults)
    deployments: tuple[DeploymentSpec, ...]

    @model_validator(mode="after")
    def _pools_exist(self) -> DeploymentsFile:
        for d in self.deployments:
            if d.work_pool not in self.work_pools:
                raise ValueError(f"deployment `{d.name}` names work pool `{d.work_pool}`, which `work_pools` does not list")
        return self


@dataclass(frozen=True)
class Planned:
    """One deployment as it will be created: `<flow>/<name>` with its merged parameters."""

    flow: str
    name: str
    entrypoint: str
    work_pool: str
    parameters: dict[str, Any]
    schedules: tuple[Any, ...]
    concurrency_limit: int | None
    paused: bool
    tags: tuple[str, ...]
    description: str | None

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.name}"

    @property
    def schedule_text(self) -> str:
        if not self.schedules:
            return "no schedule (run from the UI or `prefect deployment run`)"
        s = self.schedules[0]
        return f"cron `{s.cron}` ({s.timezone or 'UTC'})" if s.cron else f"every {s.interval.total_seconds():g} s"


def load_spec(path: Path = DEFAULT_FILE) -> DeploymentsFile:
    """Read and check a deployments file (structure, crons, flows, pools, parameters, run configs)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise DeploymentSpecError(f"cannot read deployments file `{path}`: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise DeploymentSpecError(f"`{path}` is not valid YAML: {err}") from None
    try:
        spec = DeploymentsFile.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"`{_where(e['loc'], data)}`: {e['msg']}" for e in err.errors())
        raise DeploymentSpecError(f"`{path}`: {problems}") from None
    for planned in plan(spec):
        _check_parameters(path, planned)
    return spec


def _where(loc: Sequence[Any], data: Any) -> str:
    """`deployments[0].cron` → `deployments[nightly].cron`: name a deployment, not its index."""
    parts = []
    for i, key in enumerate(loc):
        if isinstance(key, int) and i > 0 and loc[i - 1] == "deployments":
            try:
                key = data["deployments"][key].get("name", key)
            except (KeyError, IndexError, TypeError, AttributeError):
                pass
            parts[-1] += f"[{key}]"
        else:
            parts.append(str(key))
    return ".".join(parts)


def _check_parameters(path: Path, planned: Planned) -> None:
    allowed = _PARAMETERS | ({"round"} if planned.flow in _ROUND_FLOWS else set())
    unknown = sorted(set(planned.parameters) - allowed)
    if unknown:
        raise DeploymentSpecError(
            f"`{path}`, deployment `{planned.full_name}`: flow `{planned.flow}` takes no parameter(s) {unknown}; "
            f"it takes {', '.join(sorted(allowed))}"
        )
    if "run" not in planned.parameters:
        raise DeploymentSpecError(f"`{path}`, deployment `{planned.full_name}`: give `parameters.run` (the run's name)")
    from data_contracts import check_run_name
    from flows.config import RunConfig

    try:
        check_run_name(planned.parameters["run"])
        RunConfig.model_validate(planned.parameters["config"])
    except ValidationError as err:
        problems = "; ".join(f"`config.{'.'.join(map(str, e['loc']))}`: {e['msg']}" for e in err.errors())
        raise DeploymentSpecError(f"`{path}`, deployment `{planned.full_name}`: {problems}") from None
    except ValueError as err:
        raise DeploymentSpecError(f"`{path}`, deployment `{planned.full_name}`: {err}") from None


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


def plan(spec: DeploymentsFile, repo_root: Path = REPO_ROOT, only: Sequence[str] = ()) -> list[Planned]:
    """Every deployment of the spec (or those named `flow/name` in `only`), parameters merged."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.schedules import Cron, Interval

    planned = []
    for d in spec.deployments:
        schedules: tuple[Any, ...] = ()
        if d.cron is not None:
            schedules = (Cron(d.cron, timezone=d.timezone or "UTC"),)
        elif d.interval_seconds is not None:
            schedules = (Interval(datetime.timedelta(seconds=d.interval_seconds)),)
        base = {"runs_root": spec.defaults.runs_root, "config": spec.defaults.config}
        parameters = _merge(base, d.parameters)
        root = Path(parameters["runs_root"])
        parameters["runs_root"] = str(root if root.is_absolute() else (Path(repo_root) / root).absolute())
        for flow in d.flows:
            planned.append(Planned(
                flow=flow, name=d.name, entrypoint=FLOW_ENTRYPOINTS[flow], work_pool=d.work_pool,
                parameters=parameters, schedules=schedules,
                concurrency_limit=d.concurrency_limit and ConcurrencyLimitConfig(limit=d.concurrency_limit),
                paused=d.paused, tags=("prefloop", *d.tags), description=d.description,
            ))
    if only:
        names = {p.full_name for p in planned}
        missing = sorted(set(only) - names)
        if missing:
            raise DeploymentSpecError(f"no deployment(s) {missing} in the file; deployments: {', '.join(sorted(names))}")
        planned = [p for p in planned if p.full_name in only]
    return planned


def ensure_work_pools(spec: DeploymentsFile, names: Sequence[str] | None = None) -> None:
    """Create the process work pools the spec lists (or update their limit and description)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        for name, pool in spec.work_pools.items():
            if names is not None and name not in names:
                continue
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type="process", description=pool.description,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    concurrency_limit=pool.concurrency_limit,
                ))
                continue
            # WorkPoolUpdate drops unset fields, so a limit removed from the YAML is cleared explicitly.
            update = WorkPoolUpdate(description=pool.description, concurrency_limit=pool.concurrency_limit)
            client.update_work_pool(name, update)


def _to_deployment(flow: Any, p: Planned) -> Any:
    from prefect.deployments.runner import EntrypointType

    from data_contracts import code_version

    return flow.to_deployment(
        name=p.name, schedules=list(p.schedules) or None, paused=p.paused, concurrency_limit=p.concurrency_limit,
        parameters=p.parameters, tags=list(p.tags), description=p.description, version=code_version(),
        work_pool_name=p.work_pool, entrypoint_type=EntrypointType.MODULE_PATH,
    )


def deploy(spec: DeploymentsFile, repo_root: Path = REPO_ROOT, only: Sequence[str] = ()) -> list[tuple[Planned, UUID]]:
    """Apply the work pools and deployments to the Prefect server this process points at."""
    from prefect import Flow

    planned = plan(spec, repo_root, only)
    ensure_work_pools(spec, sorted({p.work_pool for p in planned}))
    applied = []
    for p in planned:
        flow = Flow.from_source(source=str(repo_root), entrypoint=p.entrypoint)
        applied.append((p, _to_deployment(flow, p).apply(work_pool_name=p.work_pool)))
    return applied


def serve(spec: DeploymentsFile, pool: str | None = None, repo_root: Path = REPO_ROOT) -> None:
    """Run the spec's deployments (those on `pool`, if given) in this process until interrupted.

    No worker and no work pool: Prefect's runner polls the server for the deployments' scheduled
    runs and starts each in a subprocess, at most the pool's `concurrency_limit` at once.
    """
    from prefect import serve as prefect_serve
    from prefect.flows import load_flow_from_entrypoint

    if pool is not None and pool not in spec.work_pools:
        raise DeploymentSpecError(f"no work pool `{pool}` in the deployments file; pools: {', '.join(spec.work_pools)}")
    planned = [p for p in plan(spec, repo_root) if pool is None or p.work_pool == pool]
    limits = [spec.work_pools[pool].concurrency_limit] if pool else [w.concurrency_limit for w in spec.work_pools.values()]
    limit = None if None in limits else sum(limits)
    deployments = [_to_deployment(load_flow_from_entrypoint(p.entrypoint), p) for p in planned]
    prefect_serve(*deployments, limit=limit, print_starting_message=True)
