"""A real two-node Ray cluster on this machine; the second node is SIGKILLed mid-job.

The test starts its own cluster (never `ray stop`, never the default /tmp/ray): `ray start --head`
with 1 CPU and resource ``node_a``, and `ray start --address` for a second node with 1 CPU and
``node_b``, each with its own free ports and in its own process session, so every process of a
node (gcs, raylet, agents, workers, actors) is found by session id and killed by PID. The job
(``execution.address`` = the head, 2 actors of 1 CPU: one per node) runs in a `run_job` driver
subprocess. As soon as actors on *both* nodes have been seen mid-shard (a worker's temporary
file ``_tmp/{shard}.{pid}.*.parquet`` names its PID, and the PID's session names its node), every
process of the second node is SIGKILLed while its actor is mid-shard. An actor seen while the
other node's actor is still loading is paused (SIGSTOP) until that one has a shard too, so the
test does not depend on which node starts faster (node_a's worker is prestarted, node_b's is
not). The job must finish on the first node, retry the lost shard, and produce a dataset
equal, column for column and row for row, to an undisturbed in-process run.

The nodes use a token of their own (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``): Ray 2.5x+
turns token auth on by itself wherever ``~/.ray/auth_token`` exists, which any local
``ray.init`` on the machine creates.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dr_pipeline.corpus.synthetic import make_corpus
from dr_pipeline.shards.dataset import ReinforcedDataset, deterministic
from dr_pipeline.validate import validate_dataset
from tests.conftest import REPO
from tests.test_faults import _session_pids as session_pids
from tests.test_faults import job_file, undisturbed_run

N_SHARDS, PER_SHARD = 4, 6
SHARDS = [f"shard-{i:05d}" for i in range(N_SHARDS)]
RAY = str(Path(sys.executable).with_name("ray"))
DEADLINE_S = 250  # the cluster part (~130 s on a loaded 2-core machine); pytest's timeout: hard stop

DRIVER = """
import json, sys
from dr_pipeline.config import load_job
from dr_pipeline.execute.runner import resolve_ensemble, run_job
job = load_job(sys.argv[1])
r = run_job(job, resolve_ensemble(job))
name = lambda s: s if isinstance(s, str) else s["shard"] if isinstance(s, dict) else s.shard
json.dump({"committed": sorted(map(name, r.committed)), "retried": r.retried,
           "failed": [str(f) for f in r.failed], "error": r.error}, open(sys.argv[2], "w"))
"""


# --------------------------------------------------------------------------- processes


def session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[3])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_session(sid: int, deadline_s: float = 20) -> None:
    """SIGKILL every process of session ``sid`` (what `ray start` in that session spawned)."""
    end = time.monotonic() + deadline_s
    while pids := session_pids(sid):
        assert time.monotonic() < end, f"processes of session {sid} survive SIGKILL: {pids}"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Two Ray nodes started with `ray start`, each in its own session (its id = the `ray start` PID)."""

    def __init__(self) -> None:
        # short: Ray's unix socket paths live under it (~107 characters at most)
        self.temp = tempfile.mkdtemp(prefix="drt-", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.sessions: dict[str, int] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # a dead node is noticed after ~2 s instead of the default ~30 s (read by the head's GCS)
        self.env.update(
            RAY_health_check_initial_delay_ms="0",
            RAY_health_check_period_ms="500",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="4",
            RAY_USAGE_STATS_ENABLED="0",
        )
        # Ray 2.5x+ turns token auth on when ~/.ray/auth_token exists (any local ray.init writes it):
        # the nodes and the driver share a token of their own, independent of that file.
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env.update(self.auth)

    def _start(self, name: str, args: list[str], worker_ports: int) -> subprocess.Popen:
        # every port chosen here, none of Ray's fixed defaults (another Ray may hold them)
        cmd = [
            RAY,
            "start",
            *args,
            "--num-cpus=1",
            "--num-gpus=0",
            f"--resources={json.dumps({name: 1})}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--min-worker-port={worker_ports}",
            f"--max-worker-port={worker_ports + 199}",
            "--object-store-memory=80000000",
            "--include-log-monitor=false",
            "--disable-usage-stats",
        ]
        log = open(Path(self.temp) / f"{name}.log", "w")
        p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.sessions[name] = p.pid
        return p

    def wait(self, name: str, p: subprocess.Popen, deadline: float) -> None:
        while p.poll() is None:
            assert time.monotonic() < deadline, f"`ray start` for {name} did not return in time:\n{self.log(name)}"
            time.sleep(0.05)
        assert p.returncode == 0, f"`ray start` for {name} failed:\n{self.log(name)}"

    def start_head(self) -> subprocess.Popen:
        # worker ports: two disjoint windows below Linux's ephemeral range, away from Ray's default 10002-19999
        self.worker_ports = 20000 + (os.getpid() * 7919) % 5000
        return self._start(
            "node_a",
            ["--head", f"--port={self.port}", f"--temp-dir={self.temp}", "--include-dashboard=false"],
            self.worker_ports,
        )

    def start_worker(self, head: subprocess.Popen, deadline: float) -> subprocess.Popen:
        """Wait for the head (``start_head``), then start the second node (``wait`` for it)."""
        self.wait("node_a", head, deadline)
        return self._start("node_b", [f"--address={self.address}"], self.worker_ports + 400)

    def log(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (Path(self.temp) / f"{name}.log").read_text()[-3000:]
        return ""

    def node_of(self, pid: int) -> str | None:
        sid = session_of(pid)
        return next((n for n, s in self.sessions.items() if s == sid), None)

    def raylet_alive(self, name: str) -> bool:
        return any("raylet/raylet" in cmdline(p) for p in session_pids(self.sessions[name]))

    def kill(self, name: str) -> None:
        kill_session(self.sessions[name])

    def close(self) -> None:
        for name in reversed(list(self.sessions)):
            with contextlib.suppress(AssertionError):
                self.kill(name)
        shutil.rmtree(self.temp, ignore_errors=True)


# --------------------------------------------------------------------------- dataset comparison


def assert_same_tables(ref: str, got: str) -> None:
    """Every committed shard: same columns, same rows, value for value (Arrow equality per column,
    so every embedding's bf16 bits, every caption, every aug param), and the same file metadata;
    markers and manifests equal but for timings and who wrote them."""
    a, b = ReinforcedDataset(ref), ReinforcedDataset(got)
    ma, mb = a.markers(), b.markers()
    assert sorted(ma) == sorted(mb) == SHARDS
    for n in SHARDS:
        ta, tb = pq.read_table(a.shard_url(n)), pq.read_table(b.shard_url(n))
        assert ta.column_names == tb.column_names, n
        assert ta.num_rows == tb.num_rows == PER_SHARD, n
        for col in ta.column_names:
            assert ta.column(col).equals(tb.column(col)), f"{n}: column {col} differs"
        assert ta.schema.metadata == tb.schema.metadata, n
        who = {"seconds", "stage_s", "started_at", "finished_at", "host", "pid", "peak_rss"}
        ja, jb = ma[n].to_json(), mb[n].to_json()
        assert {k: v for k, v in ja.items() if k not in who} == {k: v for k, v in jb.items() if k not in who}, n
    assert deterministic(a.folder.read_json("manifest.json")) == deterministic(b.folder.read_json("manifest.json"))


# --------------------------------------------------------------------------- the test


@pytest.mark.timeout(300)
def test_second_node_killed_mid_job_finishes_on_the_first_and_equals_undisturbed_run(tiny_ensemble, tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(str(corpus), n_shards=N_SHARDS, per_shard=PER_SHARD, seed=11, formats=("tar",))
    urls = f"{corpus}/tar/shard-{{00000..{N_SHARDS - 1:05d}}}.tar"
    cluster = Cluster()
    driver = None
    driver_log = tmp_path / "driver.log"
    try:
        t0 = time.monotonic()
        deadline = t0 + DEADLINE_S
        head = cluster.start_head()
        # the undisturbed run (in process, one torch thread like each 1-CPU actor) while the head boots
        ref = undisturbed_run(job_file(tmp_path / "ref.yaml", urls, tiny_ensemble, tmp_path / "ref"))
        t_ref = time.monotonic() - t0
        worker = cluster.start_worker(head, deadline)
        root = tmp_path / "ds"
        cfg = job_file(
            tmp_path / "job.yaml",
            urls,
            tiny_ensemble,
            root,
            address=cluster.address,
            min_actors=1,
            max_actors=2,
            cpus_per_actor=1,
            max_attempts=3,
            actor_start_timeout_s=120,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(cluster.auth, PYTHONPATH=str(REPO))
        with open(driver_log, "w") as log:
            driver = subprocess.Popen(
                [sys.executable, "-c", DRIVER, cfg, str(tmp_path / "report.json")],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        cluster.wait("node_b", worker, deadline)  # meanwhile the driver starts and its node_a actor loads
        t_cluster = time.monotonic() - t0

        # Watch the workers' temporary files (PID -> node). An actor seen mid-shard while the other
        # node has not been seen yet is paused (SIGSTOP), so the other node's actor, however slow
        # to start, gets a shard too; once both are seen mid-shard node_b dies and node_a resumes.
        seen: dict[int, str | None] = {}
        paused: set[int] = set()
        killed_shard = None
        while killed_shard is None:
            assert driver.poll() is None, f"the job ended before node_b was killed:\n{driver_log.read_text()}"
            assert time.monotonic() < deadline, (
                f"no actor on each node mid-shard in time (seen {seen}):\n{driver_log.read_text()}"
            )
            for f in sorted((root / "_tmp").glob("shard-*.parquet")) if (root / "_tmp").is_dir() else []:
                pid = int(f.name.split(".")[1])
                if pid not in seen:
                    seen[pid] = cluster.node_of(pid)
                    assert seen[pid] in ("node_a", "node_b"), f"worker {pid} is on no node of ours: {cmdline(pid)}"
                nodes = set(seen.values())
                if seen[pid] == "node_b" and "node_a" in nodes:
                    cluster.kill("node_b")  # raylet, agents, workers, the actor mid-shard: SIGKILL
                    killed_shard = f.name.split(".")[0]
                    break
                if len(nodes) == 1 and pid not in paused:
                    os.kill(pid, signal.SIGSTOP)
                    paused.add(pid)
            time.sleep(0.01)
        for pid in paused:
            if seen[pid] == "node_a":
                os.kill(pid, signal.SIGCONT)
        t_kill = time.monotonic() - t0
        assert not session_pids(cluster.sessions["node_b"])

        while driver.poll() is None:
            assert time.monotonic() < deadline, f"the job did not finish after node_b died:\n{driver_log.read_text()}"
            time.sleep(0.1)
        assert driver.returncode == 0, driver_log.read_text()
        t_job = time.monotonic() - t0
        assert cluster.raylet_alive("node_a")  # it finished on the first node
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        if driver is not None:
            kill_session(driver.pid)
        cluster.close()

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["error"] is None and not report["failed"], report
    assert report["committed"] == SHARDS
    # the shard node_b's actor was working on was lost with it and retried (on node_a)
    lost = [r for r in report["retried"] if r["shard"] == killed_shard]
    assert lost and lost[0]["error"].startswith(("actor died", "ray error")), report["retried"]
    assert set(seen.values()) == {"node_a", "node_b"}, seen  # actors worked on both nodes
    # every shard was committed by an actor of node_a (markers name their writer's PID)
    writers = {m.pid for m in ReinforcedDataset(str(root)).markers().values()}
    assert writers <= {pid for pid, n in seen.items() if n == "node_a"}, (writers, seen)

    assert_same_tables(ref, str(root))
    assert validate_dataset(str(root)).ok
    print(
        f"reference run {t_ref:.1f}s, cluster up {t_cluster:.1f}s, node_b killed at {t_kill:.1f}s (mid {killed_shard}), "
        f"job done at {t_job:.1f}s; worker pids by node {seen}"
    )
