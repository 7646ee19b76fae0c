"""A local Prefect server that `prefloop` starts once and every later command finds.

Why a real server and not Prefect's ephemeral mode: with Ray, every worker process
would start its own throwaway server and the task runs it records are lost. So the
CLI starts `prefect server start` detached, records it in `<state_dir>/server.json`,
and every process (the CLI, flows, Ray workers) is pointed at it through
`PREFECT_API_URL` (see `use_server`).

Ports are shared with other work on this machine: the server gets a free loopback
port, and we check that the process listening on it is the one we started.

Prefect is imported lazily (only in `use_server`) so that `prefloop --help` stays fast;
everything else here talks HTTP with the standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

SERVER_JSON = "server.json"
SERVER_LOG = "server.log"
_LOCK_FILE = "server.lock"
_LOG_TAIL_LINES = 25

# Popen handles of servers started by this process, so that stopping one reaps it
# (a killed but unreaped child stays a zombie and would look alive to `kill -0`).
_STARTED: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class ServerInfo:
    """Where a Prefect server answers.

    `pid`, `port` and `home` are None for a server configured from outside
    (`PREFECT_API_URL` in the environment): prefloop neither started nor owns it.
    """

    api_url: str
    ui_url: str
    pid: int | None
    port: int | None
    home: Path | None

    def to_json(self) -> str:
        """Serialise for `server.json` (paths as strings)."""
        data = asdict(self)
        data["home"] = None if self.home is None else str(self.home)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ServerInfo:
        """Parse what `to_json` wrote; raises ValueError/KeyError/TypeError on garbage."""
        data = json.loads(text)
        home = data["home"]
        return cls(
            api_url=str(data["api_url"]),
            ui_url=str(data["ui_url"]),
            pid=None if data["pid"] is None else int(data["pid"]),
            port=None if data["port"] is None else int(data["port"]),
            home=None if home is None else Path(home),
        )


def start_server(
    state_dir: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout_s: float = 60.0,
) -> ServerInfo:
    """Start a detached `prefect server start` whose state lives in `state_dir`.

    The server runs in its own session so it outlives the CLI that started it, logs to
    `state_dir/server.log`, keeps its SQLite database in `state_dir/prefect.db` and its
    Prefect home in `state_dir/home`. Returns once `GET /api/health` answers; raises
    RuntimeError with the tail of the log if it dies or `timeout_s` passes first
    (a cold start on this machine took ~31 s, a warm one ~9 s with a new database).
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port(host) if port is None else port
    log_path = state_dir / SERVER_LOG
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    proc = _launch(state_dir, host, port, log_path)
    info = _local_info(state_dir, host, port, pid=proc.pid)
    try:
        _wait_healthy(info, proc, log_path, log_offset, timeout_s)
        _check_listener(info, log_path, log_offset)
    except BaseException:
        _terminate_group(proc.pid, grace_s=5.0)
        raise
    _write_atomic(state_dir / SERVER_JSON, info.to_json())
    return info


def find_server(state_dir: Path, health_timeout_s: float = 10.0) -> ServerInfo | None:
    """The server recorded in `state_dir/server.json`, if it still runs and answers.

    A record whose process is gone (or whose PID now belongs to another program) is
    stale: the file is removed and None returned. A recorded server that still runs
    but does not answer is not silently replaced (that would leave it orphaned):
    RuntimeError says how to stop it.
    """
    record = Path(state_dir) / SERVER_JSON
    info = _read_record(record)
    if info is None:
        return None
    if info.pid is None or not _is_our_server(info.pid, info.port):
        record.unlink(missing_ok=True)
        return None
    if _poll_health(info.api_url, health_timeout_s):
        return info
    raise RuntimeError(
        f"Prefect server pid {info.pid} recorded in {record} is running but "
        f"{info.api_url}/health did not answer within {health_timeout_s:.0f} s. "
        f"Last lines of {Path(state_dir) / SERVER_LOG}:\n"
        f"{_log_tail(Path(state_dir) / SERVER_LOG, 0)}\n"
        "Stop it with `stop_server(state_dir)` (CLI: `prefloop server --stop`) and retry."
    )


def ensure_server(state_dir: Path) -> tuple[ServerInfo, bool]:
    """A Prefect server to talk to, and whether it was started by this call.

    Precedence, so that a user can always point prefloop at their own server:
    1. `PREFECT_API_URL` set in the environment wins. If it is the server recorded in
       `state_dir`, that record (with its pid) is returned; otherwise a ServerInfo with
       `pid=None, home=None` describes it. It must answer `/health` (RuntimeError
       otherwise): prefloop never starts a second server behind the user's back.
    2. The server recorded in `state_dir/server.json`, if it runs and answers.
    3. A new server (`start_server`).
    A file lock on `state_dir/server.lock` keeps two CLIs from starting two servers.
    Callers still call `use_server(info)` to point this process at it.
    """
    state_dir = Path(state_dir).resolve()
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        return _configured_server(state_dir, configured.rstrip("/")), False
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir / _LOCK_FILE):
        running = find_server(state_dir)
        if running is not None:
            return running, False
        return start_server(state_dir), True


def stop_server(state_dir: Path, timeout_s: float = 20.0) -> bool:
    """Stop the server recorded in `state_dir` and remove its record.

    Sends SIGTERM to the server's process group (it leads its own session), then
    SIGKILL if it is still up after `timeout_s`. Only a process whose command line is
    our `prefect server start --port P` is signalled, so a PID reused by another
    program is never touched. Returns True if a running server was stopped.
    """
    record = Path(state_dir) / SERVER_JSON
    info = _read_record(record)
    stopped = False
    if info is not None and info.pid is not None and _is_our_server(info.pid, info.port):
        _terminate_group(info.pid, grace_s=timeout_s)
        stopped = True
    record.unlink(missing_ok=True)
    return stopped


def use_server(info: ServerInfo) -> None:
    """Point Prefect in this process and in every child process at `info`.

    Sets `PREFECT_API_URL`, `PREFECT_UI_URL`, `PREFECT_SERVER_ANALYTICS_ENABLED=false`
    and `PREFECT_SERVER_EPHEMERAL_ENABLED=false` in `os.environ`; children (Ray's
    raylet and workers started after this call, subprocesses) inherit them. Disabling
    ephemeral mode makes a process that somehow lost the URL fail loudly instead of
    recording runs in a throwaway database.

    Measured on Prefect 3.8.8: changing `os.environ` after `import prefect` does NOT
    reach this process. `prefect.context` snapshots the settings from the environment
    into `GLOBAL_SETTINGS_CONTEXT` at import, and `get_current_settings()` (used by
    `get_client` and the flow engine) reads that snapshot. So when Prefect is already
    imported, this also calls `prefect.context.refresh_global_settings_context()`,
    which rebuilds the snapshot from the environment (added for plugins in
    PrefectHQ/prefect#20393). A `temporary_settings(...)` block or a running
    flow carries its own settings context that the refresh cannot change, so this
    raises RuntimeError when called inside one: call it first, before any flow runs.
    """
    os.environ.update(_client_env(info))
    if "prefect.context" not in sys.modules:
        return
    import prefect.context
    from prefect.settings import get_current_settings

    prefect.context.refresh_global_settings_context()
    seen = get_current_settings().api.url
    if seen != info.api_url:
        raise RuntimeError(
            f"use_server({info.api_url!r}): Prefect in this process still uses "
            f"api.url={seen!r}, because an active Prefect settings context (a "
            "`temporary_settings` block or a running flow) overrides the global one. "
            "Call use_server before entering it."
        )


def _client_env(info: ServerInfo) -> dict[str, str]:
    """Environment variables that make Prefect clients use `info` and nothing else."""
    return {
        "PREFECT_API_URL": info.api_url,
        "PREFECT_UI_URL": info.ui_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
    }


def _server_env(state_dir: Path, host: str, port: int) -> dict[str, str]:
    """The server's environment: ours, minus any inherited PREFECT_* setting.

    Inherited PREFECT_* variables are dropped so that a shell's client settings (a
    `PREFECT_API_URL` or `PREFECT_PROFILE` meant for another server) cannot change
    where this server keeps its database or what it advertises to the UI.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    api_url = f"http://{_url_host(host)}:{port}/api"
    env.update(
        {
            "PREFECT_HOME": str(state_dir / "home"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
                f"sqlite+aiosqlite:///{state_dir / 'prefect.db'}"
            ),
            "PREFECT_UI_API_URL": api_url,
            # No network here: no start-up analytics, no promotional UI content.
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        }
    )
    return env


def _launch(state_dir: Path, host: str, port: int, log_path: Path) -> subprocess.Popen:
    """Start the server process detached (own session = own process group)."""
    cmd = [
        sys.executable, "-m", "prefect", "server", "start",
        "--host", host, "--port", str(port),
    ]
    with open(log_path, "ab") as log:
        log.write(f"\n--- prefloop: {' '.join(cmd)} at {time.ctime()}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            env=_server_env(state_dir, host, port),
            cwd=state_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _STARTED[proc.pid] = proc
    return proc


def _wait_healthy(
    info: ServerInfo,
    proc: subprocess.Popen,
    log_path: Path,
    log_offset: int,
    timeout_s: float,
) -> None:
    """Poll `/health` until it answers; raise with the log tail if the server dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"Prefect server (`prefect server start --port {info.port}`) exited "
                f"with code {proc.returncode} before answering {info.api_url}/health. "
                f"Last lines of {log_path}:\n{_log_tail(log_path, log_offset)}\n"
                "If the port was taken, call start_server without `port` to pick a free one."
            )
        if _health(info.api_url, timeout_s=1.0):
            return
        time.sleep(0.25)
    raise RuntimeError(
        f"Prefect server pid {proc.pid} did not answer {info.api_url}/health within "
        f"{timeout_s:.0f} s (a cold start on 2 busy cores can take ~30 s). Last lines "
        f"of {log_path}:\n{_log_tail(log_path, log_offset)}\n"
        "Raise `timeout_s` or check the log for the cause."
    )


def _check_listener(info: ServerInfo, log_path: Path, log_offset: int) -> None:
    """Make sure the healthy server on our port is the process we started.

    Another program could have bound the port between our probe and the server's
    bind; then `/health` might answer from someone else's server. Checked through
    /proc on Linux; skipped where /proc is not available.
    """
    assert info.pid is not None and info.port is not None
    listens = _pid_listens_on(info.pid, info.port)
    if listens is False:
        raise RuntimeError(
            f"Port {info.port} answers {info.api_url}/health, but the process listening "
            f"on it is not the server we started (pid {info.pid}): another program took "
            f"the port. Last lines of {log_path}:\n{_log_tail(log_path, log_offset)}\n"
            "Retry start_server without `port` to pick another free port."
        )


def _configured_server(state_dir: Path, api_url: str) -> ServerInfo:
    """ServerInfo for an externally configured `PREFECT_API_URL` that must answer."""
    record = _read_record(state_dir / SERVER_JSON)
    if record is not None and record.api_url == api_url:
        found = find_server(state_dir)
        if found is not None:
            return found
    if not _poll_health(api_url, timeout_s=5.0):
        raise RuntimeError(
            f"PREFECT_API_URL={api_url} is set in the environment but {api_url}/health "
            "does not answer. Start that server, or unset PREFECT_API_URL to let "
            "prefloop start its own local server."
        )
    parsed = urlparse(api_url)
    ui_url = api_url[: -len("/api")] if api_url.endswith("/api") else api_url
    return ServerInfo(api_url=api_url, ui_url=ui_url, pid=None, port=parsed.port, home=None)


def _local_info(state_dir: Path, host: str, port: int, pid: int | None) -> ServerInfo:
    """ServerInfo for a server we run on `host:port` with state in `state_dir`."""
    ui_url = f"http://{_url_host(host)}:{port}"
    return ServerInfo(
        api_url=f"{ui_url}/api", ui_url=ui_url, pid=pid, port=port, home=state_dir / "home"
    )


def _url_host(host: str) -> str:
    """Host as it goes into a URL: a wildcard bind is reached on loopback, IPv6 in []."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _free_port(host: str) -> int:
    """A port that is free on `host` right now (the OS picks it when binding port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _health(api_url: str, timeout_s: float) -> bool:
    """True if `GET {api_url}/health` answers Prefect's `true`.

    Uses an opener without proxies: a proxy from the environment must not see (or
    break) loopback traffic.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{api_url}/health", timeout=timeout_s) as response:
            return response.status == 200 and response.read().strip() == b"true"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _poll_health(api_url: str, timeout_s: float) -> bool:
    """`_health`, retried until `timeout_s` passes (a busy server answers late)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if _health(api_url, timeout_s=max(0.5, min(2.0, timeout_s))):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def _read_record(record: Path) -> ServerInfo | None:
    """ServerInfo from `server.json`; a missing or unreadable file counts as none.

    An unreadable record cannot point at a server we could stop, so it is removed.
    """
    try:
        return ServerInfo.from_json(record.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        record.unlink(missing_ok=True)
        return None


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a record."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (released on close)."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _is_alive(pid: int) -> bool:
    """True if `pid` runs.

    A child of ours that exited is reaped here; a zombie whose parent has not reaped
    it yet (another prefloop process started the server) counts as dead, although
    `kill(pid, 0)` still succeeds on it.
    """
    proc = _STARTED.get(pid)
    if proc is not None and proc.poll() is not None:
        del _STARTED[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """True if /proc says `pid` has exited but is not reaped (False off Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _is_our_server(pid: int, port: int | None) -> bool:
    """True if `pid` runs `prefect server start ... --port <port>`.

    Guards against PID reuse: we only ever signal a process whose command line is
    the server we launched.
    """
    if not _is_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in argv]
    return "prefect" in args and "server" in args and "--port" in args and (
        port is None or str(port) in args
    )


def _pid_listens_on(pid: int, port: int) -> bool | None:
    """Whether `pid` holds a TCP socket listening on `port`; None if unknowable.

    Matches socket inodes of LISTEN entries in /proc/net/tcp{,6} against the
    process's open file descriptors.
    """
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    return any(_fd_target(fd) in targets for fd in fds)


def _fd_target(fd: Path) -> str:
    """What a /proc/<pid>/fd entry points at ("" if it closed while we looked)."""
    try:
        return os.readlink(fd)
    except OSError:
        return ""


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on TCP `port`, from /proc; None off Linux."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return None
    inodes: set[str] = set()
    listen_state = "0A"
    for table in tables:
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if fields[3] == listen_state and local_port == port:
                inodes.add(fields[9])
    return inodes


def _terminate_group(pid: int, grace_s: float) -> None:
    """SIGTERM the process group led by `pid`, SIGKILL it after `grace_s`.

    A server started by this process is reaped at the end, so no zombie is left
    that `kill(pid, 0)` would still find.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    if not _wait_gone(pid, grace_s):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)
    proc = _STARTED.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `pid` to exit; True if it did."""
    deadline = time.monotonic() + timeout_s
    while _is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _log_tail(log_path: Path, offset: int) -> str:
    """The last lines the server wrote since `offset` (where this start began)."""
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError as exc:
        return f"(could not read {log_path}: {exc})"
    lines = text.strip().splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(lines) if lines else "(log is empty)"
