"""Helpers of the fault tier (`pytest -m faults`): killing processes from outside, and scanning
for the processes a test started (marked by an environment variable they all inherit)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def processes_with_env(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds `marker` (a `NAME=value` string)."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[-1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class KillWhenAnnounced(threading.Thread):
    """SIGKILLs the process whose pid appears in `flag` (written by a worker that reached the
    point where it should die), from outside that process, as an OOM killer or a node loss would."""

    def __init__(self, flag: Path, timeout_s: float = 120.0):
        super().__init__(daemon=True)
        self.flag, self.timeout_s = flag, timeout_s
        self.killed: int | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                text = self.flag.read_text().strip()
            except OSError:
                text = ""
            if text:
                self.killed = int(text)
                os.kill(self.killed, signal.SIGKILL)
                return
            time.sleep(0.01)


def announce_and_wait(flag: Path) -> None:
    """Inside a worker: the first time (no flag yet), write this pid to `flag` and wait to be
    killed mid-job; every later call (the retry on a restarted worker) returns at once."""
    if flag.exists():
        return
    tmp = flag.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, flag)
    time.sleep(60)
    raise RuntimeError("the fault was not injected: nobody killed this worker")
