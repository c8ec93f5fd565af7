"""Reap the local Ray cluster a driver started, when the driver dies without ``ray.shutdown()``.

A SIGKILLed (or OOM-killed) ``dr reinforce`` cannot clean up: Ray's GCS, raylet and their
agents (``DashboardAgent``, ``RuntimeEnvAgent``) outlive it. So right after starting a local
Ray the driver spawns this watchdog in a session of its own: it polls the driver's pid and,
once the driver is gone, SIGKILLs the Ray processes it was given and all their descendants.
It exits by itself when those processes are gone (a normal ``ray.shutdown()``). Linux /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _descendants(roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[-1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += children.get(pid, [])
    return out


def guard(ray_pids: list[int]) -> subprocess.Popen | None:
    """Start the watchdog for this process and ``ray_pids`` (no-op where /proc is missing)."""
    if not os.path.isdir("/proc") or not ray_pids:
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "dr_pipeline.execute.watchdog", str(os.getpid()), *map(str, ray_pids)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def local_ray_pids() -> list[int]:
    """The processes of the local Ray node this driver started (GCS, raylet, monitors)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return []
    return [p.pid for _, p in node.live_processes() if getattr(p, "pid", None)]


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[19]  # field 22: start time, tells a reused pid
    except (OSError, IndexError):
        return None


def main(argv: list[str]) -> int:
    driver, roots = int(argv[0]), {int(p) for p in argv[1:]}
    known: dict[int, str | None] = {}
    # Track the Ray processes and their descendants while the driver lives: once the raylet dies its
    # agents are re-parented to init and could no longer be found as its descendants.
    while _alive(driver):
        for p in _descendants(roots | set(known)):
            known.setdefault(p, _start_time(p))
        if not any(_alive(p) for p in known):
            return 0
        time.sleep(0.5)
    for _ in range(20):  # a few rounds: processes may fork while we kill
        victims = {p for p, t in known.items() if _alive(p) and _start_time(p) == t}
        victims |= {p for p in _descendants(victims) if _alive(p)}
        if not victims:
            return 0
        for p in victims:
            known.setdefault(p, _start_time(p))
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
