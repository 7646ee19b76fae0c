"""Starting (or joining) Ray for a stage, so that every stage gets Ray the same way.

Why this wrapper and not a bare `ray.init()`:
- Other processes on this machine may run their own Ray cluster. A bare `ray.init()`
  attaches to the last cluster recorded under /tmp/ray (or to `RAY_ADDRESS`), so a
  local start here always passes `address="local"` and its own short temp dir. A
  cluster is only joined when an address is given explicitly.
- Ray workers are fresh processes: they must find the repo's packages (`tasks`,
  `models`, `data_contracts`, `infra`) and the Prefect server. Both travel in the
  job's `runtime_env` env vars (`PYTHONPATH`, `PREFECT_*`), which also reach the
  workers of a joined cluster, whose raylet does not inherit our environment.
- On 2 shared cores, every worker's math libraries are pinned to one thread; a stage
  that reserves whole CPUs asks for more (`StageResources.ray_options`).

Measured here (Ray 2.60, 2 cores): `ray.init` of a local cluster ~2.5-4 s (≈1 s more
under load), first task ~0.3 s, shutdown ~1.2 s, ~0.9 GiB RSS without the dashboard
(the dashboard adds ~0.9 GiB and does not start faster, so it is off by default).

Ray is imported inside functions so that importing this module (and `prefloop --help`)
stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.resources import thread_env

REPO_ROOT = Path(__file__).resolve().parents[1]

# Ray puts Unix sockets at <temp_dir>/session_<date>_<time>_<usec>_<pid>/sockets/
# plasma_store: ~64 characters after the temp dir, and Linux caps a socket path at
# 107. A short temp dir under /tmp keeps well inside that.
_MAX_TEMP_DIR_CHARS = 40
_TEMP_PARENT = Path("/tmp")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RaySession:
    """The Ray cluster this process is connected to.

    address:      GCS address (host:port) of the cluster.
    temp_dir:     Ray's temp dir (sessions, logs, spilled objects); None when joined.
    started_here: True if `ray_session` started this cluster and stops it on exit.
    """

    address: str
    temp_dir: Path | None
    started_here: bool


@dataclass
class _Active:
    """Bookkeeping for the Ray this module started, so nested sessions reuse it."""

    session: RaySession
    num_cpus: int | None
    ray_env_before: dict[str, str]
    owns_temp_dir: bool
    requested_address: str | None = None  # the `address` it was started with (None: local)


_ACTIVE: _Active | None = None
# Inside `ray_kept()`: the Ray a `ray_session` started there, stopped when the block ends.
_KEPT: list[_Active] | None = None


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    temp_dir: Path | None = None,
    *,
    dashboard: bool = False,
    threads_per_worker: int = 1,
) -> Iterator[RaySession]:
    """Ray for the duration of the block: a new local cluster, or a joined one.

    address:            None starts a new local cluster (`address="local"`, never
                        attaching to one found on the machine); "host:port" or
                        "ray://host:port" joins that cluster. The repo root must exist
                        at the same path on its nodes (workers import from it).
    num_cpus:           CPUs of a new local cluster (None: all cores). Not allowed
                        when joining: the cluster's size is its own.
    temp_dir:           Ray's temp dir for a new local cluster; None makes a short one
                        under /tmp that is removed on a clean exit (kept, with a log
                        line naming it, when the block raised: it holds Ray's logs).
    dashboard:          start Ray's dashboard (off: saves ~0.9 GiB RSS; start-up
                        time is about the same).
    threads_per_worker: OpenMP/BLAS threads per worker process.

    Inside an enclosing `ray_session` of this process, the running Ray is reused
    (arguments must agree with it) and only the outermost block shuts it down. A Ray
    initialised by other code is not reused: RuntimeError.

    Token auth: Ray 2.60 turns it on for a new local cluster when `RAY_AUTH_MODE` is
    unset (token in ~/.ray/auth_token) and sets `RAY_AUTH_MODE=token` in this
    process. That does not get in the way locally, so it stays on; the RAY_* variables
    Ray sets are restored on exit so they do not leak into later work. Joining a
    token-protected cluster needs `RAY_AUTH_MODE=token` and its token set by the caller.
    """
    global _ACTIVE
    import ray

    if ray.is_initialized():
        yield _reusable_session(address, num_cpus)
        return
    active = _start(address, num_cpus, temp_dir, dashboard, threads_per_worker)
    _ACTIVE = active
    if _KEPT is not None:  # the enclosing ray_kept() stops it
        _KEPT.append(active)
        yield active.session
        return
    failed = False
    try:
        yield active.session
    except BaseException:
        failed = True
        raise
    finally:
        _ACTIVE = None
        _stop(active, keep_temp_dir=failed)


@contextlib.contextmanager
def ray_kept() -> Iterator[None]:
    """Keep the Ray that the first `ray_session` inside this block starts until the block ends.

    The stages of one flow run each open a `ray_session`; inside this block they share one
    cluster instead of starting and stopping their own (~3-4 s to start and ~1.2 s to stop
    each time here, seven times in the default run). Ray is still started only if a stage
    needs it, so a run whose Ray stages are all cached starts none. When the block raises,
    Ray's temp dir (its logs) is kept, as `ray_session` does. Nested blocks are one block.
    """
    global _ACTIVE, _KEPT
    if _KEPT is not None:
        yield
        return
    _KEPT = []
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        kept, _KEPT = _KEPT, None
        for active in kept:
            if _ACTIVE is active:
                _ACTIVE = None
            _stop(active, keep_temp_dir=failed)


def current_node_id() -> str:
    """The id of the Ray node this code runs on, "" outside Ray: stages record which node did
    which work (generate's shard records, select's scoring nodes), so a multi-node run shows it."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def worker_env(threads_per_worker: int = 1) -> dict[str, str]:
    """Environment variables every Ray worker of this job gets.

    - PYTHONPATH: the repo root first, so `import tasks, models, data_contracts,
      infra` works in workers whatever their working directory (workers inherit the
      driver's cwd, which puts the repo on sys.path only when the driver runs from
      the repo root).
    - PREFECT_*: this process's Prefect settings from the environment (set
      `infra.prefect_server.use_server` before the session starts), so that flows and
      tasks in workers report to the same server. Without a `PREFECT_API_URL`,
      workers get `PREFECT_SERVER_EPHEMERAL_ENABLED=false`: each worker would
      otherwise start its own throwaway server and lose its runs silently.
    - thread caps for OpenMP/BLAS/numexpr, and no tokenizers parallelism.
    """
    pythonpath = [str(REPO_ROOT)]
    if os.environ.get("PYTHONPATH"):
        pythonpath.append(os.environ["PYTHONPATH"])
    env = {"PYTHONPATH": os.pathsep.join(pythonpath)}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PREFECT_")})
    if not env.get("PREFECT_API_URL"):
        env["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
    env.update(thread_env(threads_per_worker))
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _reusable_session(address: str | None, num_cpus: int | None) -> RaySession:
    """The Ray this module started, if the arguments agree; refuse one from elsewhere."""
    import ray

    active = _ACTIVE
    if active is None:
        raise RuntimeError(
            "ray_session: Ray is already initialised in this process by code outside "
            f"infra.ray_cluster (gcs address {_gcs_address(ray)}), so prefloop cannot "
            "know whether it may use or stop it. Start Ray only through "
            "infra.ray_cluster.ray_session, or call ray.shutdown() before this."
        )
    if address is not None and address not in (active.session.address, active.requested_address):
        raise ValueError(
            f"ray_session(address={address!r}): this process is already connected to "
            f"Ray at {active.session.address}; leave `address` unset to reuse it, or "
            "leave the enclosing ray_session first."
        )
    if num_cpus is not None and num_cpus != active.num_cpus:
        raise ValueError(
            f"ray_session(num_cpus={num_cpus}): the running local Ray was started with "
            f"num_cpus={active.num_cpus}; leave `num_cpus` unset to reuse it."
        )
    return active.session


def _start(
    address: str | None,
    num_cpus: int | None,
    temp_dir: Path | None,
    dashboard: bool,
    threads_per_worker: int,
) -> _Active:
    """`ray.init` for a new local cluster or a join, with our runtime env."""
    ray_env_before = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    runtime_env = {"env_vars": worker_env(threads_per_worker)}
    try:
        if address is not None:
            session = _join(address, num_cpus, temp_dir, runtime_env)
            return _Active(session, num_cpus, ray_env_before, owns_temp_dir=False, requested_address=address)
        session = _start_local(num_cpus, temp_dir, dashboard, runtime_env)
        return _Active(session, num_cpus, ray_env_before, temp_dir is None)
    except BaseException:
        _restore_ray_env(ray_env_before)
        raise


def _join(
    address: str, num_cpus: int | None, temp_dir: Path | None, runtime_env: dict
) -> RaySession:
    """Connect to the cluster at `address`; its size and temp dir are its own."""
    import ray

    if num_cpus is not None or temp_dir is not None:
        raise ValueError(
            f"ray_session(address={address!r}): num_cpus and temp_dir configure a new "
            "local cluster and cannot be set when joining one; drop them, or drop "
            "`address` to start a local cluster."
        )
    context = ray.init(address=address, runtime_env=runtime_env)
    return RaySession(_context_address(context, address), None, started_here=False)


def _start_local(
    num_cpus: int | None, temp_dir: Path | None, dashboard: bool, runtime_env: dict
) -> RaySession:
    """Start a new single-node cluster that nobody else on the machine attaches to."""
    import ray

    ray_temp_dir = _short_temp_dir(temp_dir)
    context = ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        runtime_env=runtime_env,
        _temp_dir=str(ray_temp_dir),
    )
    return RaySession(_context_address(context, "local"), ray_temp_dir, started_here=True)


def _stop(active: _Active, keep_temp_dir: bool) -> None:
    """Disconnect (and, for our own cluster, stop it); tidy up what we created."""
    import ray

    ray.shutdown()
    _restore_ray_env(active.ray_env_before)
    temp_dir = active.session.temp_dir
    if temp_dir is None or not active.owns_temp_dir:
        return
    if keep_temp_dir:
        logger.warning("Ray session failed; its logs are kept in %s", temp_dir)
        return
    shutil.rmtree(temp_dir, ignore_errors=True)


def _short_temp_dir(temp_dir: Path | None) -> Path:
    """The temp dir to give Ray: checked for Unix socket path length, or a new one."""
    if temp_dir is None:
        return Path(tempfile.mkdtemp(prefix="pfl-ray-", dir=_TEMP_PARENT))
    temp_dir = Path(temp_dir).resolve()
    if len(str(temp_dir)) > _MAX_TEMP_DIR_CHARS:
        raise ValueError(
            f"ray_session(temp_dir={str(temp_dir)!r}): {len(str(temp_dir))} characters "
            f"is too long; Ray puts Unix sockets ~64 characters below it and Linux caps "
            f"socket paths at 107. Use a path of at most {_MAX_TEMP_DIR_CHARS} characters "
            "(e.g. under /tmp), or leave temp_dir unset."
        )
    temp_dir.mkdir(parents=True, exist_ok=True)
    return temp_dir


def _restore_ray_env(before: dict[str, str]) -> None:
    """Put RAY_* variables back as they were (ray.init sets RAY_AUTH_MODE and others)."""
    for key in [k for k in os.environ if k.startswith("RAY_")]:
        if key not in before:
            del os.environ[key]
    os.environ.update(before)


def _context_address(context, fallback: str) -> str:
    """The GCS address from `ray.init`'s context (a ray:// client has none)."""
    info = getattr(context, "address_info", None) or {}
    return str(info.get("gcs_address") or info.get("address") or fallback)


def _gcs_address(ray) -> str:
    """Address of the Ray this process is connected to, for error messages."""
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - only used to enrich an error message
        return "unknown"
