"""Faults really inflicted on a local Ray (2 CPUs), each run compared with an undisturbed one.

- an actor SIGKILLed mid-shard: the job completes, the dataset equals the undisturbed run;
- a poison shard (its actor is killed on every attempt): bounded retries, the rest completes,
  the failure is reported (shard, error, attempts) and `dr reinforce` exits 1;
- the driver (`dr reinforce` in its own process group, with its own local Ray) SIGKILLed after
  the first commit, then rerun: it resumes, and dataset + manifest equal the undisturbed run;
- actors that cannot be placed (a GPU asked for on a CPU-only cluster): bounded wait, clear error;
- the retry policy itself (backoff with jitter, permanent vs transient errors), without I/O.

Every "undisturbed run" is the in-process executor with one torch thread, as the actors have:
the bytes come out identical, so markers (except timings) and manifests compare exactly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dr_pipeline.cli import main as dr
from dr_pipeline.config import load_job
from dr_pipeline.corpus.readers import ShardReadError
from dr_pipeline.corpus.synthetic import make_corpus
from dr_pipeline.execute.runner import resolve_ensemble, run_job
from dr_pipeline.shards.dataset import ReinforcedDataset, deterministic
from dr_pipeline.shards.parquet_io import read_shard
from dr_pipeline.storage.folder import Folder
from dr_pipeline.storage.retry import PermanentError, RetriesExhausted, RetryPolicy, classify, redact_url, retry_call
from dr_pipeline.validate import validate_dataset
from tests.conftest import REPO, write_job

N_SHARDS, PER_SHARD = 3, 6
SHARDS = [f"shard-{i:05d}" for i in range(N_SHARDS)]


# --------------------------------------------------------------------------- helpers (also used by test_s3)


def job_file(
    path: Path, urls, ensemble: str, out: str, input_so: dict | None = None, output_so: dict | None = None, **execution
) -> str:
    """The tiny job every fault test runs: 2 augmentations, 1 synthetic caption, batches of 4."""
    ex = {
        "min_actors": 1,
        "max_actors": 2,
        "cpus_per_actor": 1,
        "batch_size": 4,
        "max_attempts": 3,
        "device": "cpu",
        "decode_threads": 1,
        "io_backoff_s": 0.05,
        **execution,
    }
    return write_job(
        path,
        input={"urls": urls, "storage_options": input_so or {}},
        output={"path": str(out), "storage_options": output_so or {}},
        teachers=ensemble,
        aug={"n_aug": 2, "size": 64},
        captions={"k": 1},
        execution=ex,
    )


@contextlib.contextmanager
def one_torch_thread():
    """As each 1-CPU actor runs (and far faster than 2 threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def undisturbed_run(cfg: str) -> str:
    """Run in process with one torch thread, as the actors have: the reference dataset."""
    job = load_job(cfg)
    with one_torch_thread():
        assert run_job(job, resolve_ensemble(job), executor="local").ok
    return job.output.path


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    if a.numel() == 0 and b.numel() == 0:
        return 0
    return int((a.view(torch.uint16).to(torch.int32) - b.view(torch.uint16).to(torch.int32)).abs().max())


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def assert_same_dataset(
    ref: str, got: str, so: dict | None = None, names: list[str] | None = None, exact: bool = True
) -> None:
    """``got`` holds the same committed shards as ``ref`` (or just ``names``): keys, params and
    captions identical, embeddings within 1 bf16 ulp. ``exact`` (same config): markers equal
    except timings, and manifests equal when all shards are compared."""
    a, b = ReinforcedDataset(ref), ReinforcedDataset(got, so)
    ma = {n: m.to_json() for n, m in a.markers().items()}
    mb = {n: m.to_json() for n, m in b.markers().items()}
    names = sorted(ma) if names is None else names
    assert sorted(mb) == names
    for n in names:
        ra, _ = read_shard(a.shard_url(n))
        rb, _ = read_shard(b.shard_url(n), so)
        assert ra.keys == rb.keys and ra.captions == rb.captions and ra.syn == rb.syn, n
        np.testing.assert_array_equal(ra.aug_params, rb.aug_params)
        for t in ra.image_emb:
            assert ulps(ra.image_emb[t], rb.image_emb[t]) <= 1 and ulps(ra.text_emb[t], rb.text_emb[t]) <= 1
            for cap, rows in ra.syn_emb[t].items():
                for x, y in zip(rows, rb.syn_emb[t][cap]):
                    assert ulps(x, y) <= 1
        same = ("n_read", "n_written", "n_rejected", "rejected_by_reason", "rejected_keys", "teachers")
        assert {k: ma[n][k] for k in same} == {k: mb[n][k] for k in same}
        if exact:  # same config, same bytes: the markers differ in timings only
            timing = {"seconds", "stage_s", "started_at", "finished_at", "host", "pid", "peak_rss"}
            diff = {k for k in set(ma[n]) | set(mb[n]) if ma[n].get(k) != mb[n].get(k)} - timing
            assert not diff, f"{n}: markers differ in {sorted(diff)}"
    if exact and names == sorted(ma):
        assert deterministic(a.folder.read_json("manifest.json")) == deterministic(b.folder.read_json("manifest.json"))


class ShardKiller(threading.Thread):
    """SIGKILLs the process working on ``shard`` of a local dataset, up to ``times`` times.

    A worker's temporary data file is ``_tmp/{shard}.{pid}.{random}.parquet`` and exists from
    the shard's start to its commit, so seeing it means: that process is mid-shard."""

    def __init__(self, root: Path, shard: str, times: int, sig: int = signal.SIGKILL):
        super().__init__(daemon=True)
        self.tmp, self.shard, self.times, self.sig = root / "_tmp", shard, times, sig
        self.killed: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        seen: set[str] = set()
        while not self.halt.is_set() and len(self.killed) < self.times:
            for f in self.tmp.glob(f"{self.shard}.*.parquet") if self.tmp.is_dir() else []:
                if f.name not in seen:
                    seen.add(f.name)
                    pid = int(f.name.split(".")[1])
                    assert pid != os.getpid()
                    os.kill(pid, self.sig)
                    self.killed.append(pid)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.halt.set()
        self.join(5)

    def __enter__(self) -> ShardKiller:
        self.start()
        return self


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fault-corpus")
    make_corpus(str(d), n_shards=N_SHARDS, per_shard=PER_SHARD, seed=5, formats=("tar",))
    return d


def urls_of(corpus: Path) -> str:
    return f"{corpus}/tar/shard-{{00000..{N_SHARDS - 1:05d}}}.tar"


@pytest.fixture(scope="module")
def reference(corpus, tiny_ensemble, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("reference")
    return undisturbed_run(job_file(d / "job.yaml", urls_of(corpus), tiny_ensemble, d / "ds"))


# --------------------------------------------------------------------------- retry policy (no I/O)


def _client_error(status: int, code: str):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


def test_retry_backoff_jitter_and_error_kinds():
    policy = RetryPolicy(attempts=5, base_s=1.0, cap_s=3.0)
    sleeps: list[float] = []
    errors = [
        OSError(errno.EIO, "io"),
        ConnectionResetError("reset"),
        _client_error(503, "SlowDown"),
        TimeoutError("slow"),
    ]
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "ok"

    assert retry_call(flaky, "put x", policy, sleep=sleeps.append, rng=random.Random(0)) == "ok"
    assert len(calls) == 5 and len(sleeps) == 4
    assert all(0 <= s <= min(3.0, 2**i) for i, s in enumerate(sleeps))  # full jitter under a doubling cap
    assert len(set(sleeps)) == 4  # jittered, not fixed

    for permanent in (
        FileNotFoundError("gone"),
        PermissionError("denied"),
        _client_error(403, "AccessDenied"),
        _client_error(404, "NoSuchKey"),
    ):
        calls.clear()

        def fails(e=permanent):
            calls.append(1)
            raise e

        with pytest.raises(PermanentError, match=r"^get s3://b/k: "):
            retry_call(fails, "get s3://b/k", policy, sleep=sleeps.append)
        assert len(calls) == 1  # fail fast, no retry

    def always_503():
        raise _client_error(503, "ServiceUnavailable")

    with pytest.raises(RetriesExhausted, match=r"still failing after 5 attempts.*HTTP 503"):
        retry_call(always_503, "put y", policy, sleep=lambda s: None)

    def bug():
        calls.append(1)
        raise ValueError("not an I/O problem")

    calls.clear()
    with pytest.raises(ValueError):
        retry_call(bug, "read z", policy, sleep=lambda s: None)
    assert len(calls) == 1

    # the kind is read along the exception chain; a permanent link wins
    def chained(inner: BaseException) -> BaseException:
        try:
            raise inner
        except BaseException as e:
            try:
                raise ShardReadError("s3://b/x.tar: cannot open") from e
            except ShardReadError as outer:
                return outer

    assert classify(chained(FileNotFoundError("x"))) == "permanent"
    assert classify(chained(OSError(errno.EREMOTEIO, "InternalError"))) == "transient"
    assert classify(chained(OSError("Couldn't deserialize thrift"))) is None  # a decoder's OSError: not I/O
    assert redact_url("s3://AKIA:sekrit@bucket/x.tar?X-Amz-Signature=abc") == "s3://bucket/x.tar"


# --------------------------------------------------------------------------- faults on Ray


@pytest.mark.timeout(180)
def test_actor_sigkilled_mid_shard_job_completes_and_equals_undisturbed_run(
    ray_local, corpus, tiny_ensemble, reference, tmp_path
):
    # max_actors 3 on 2 CPUs: one actor can never be placed and must not hold any work
    cfg = job_file(tmp_path / "job.yaml", urls_of(corpus), tiny_ensemble, tmp_path / "ds", max_actors=3)
    job = load_job(cfg)
    with ShardKiller(tmp_path / "ds", "shard-00001", times=1) as killer:
        report = run_job(job, resolve_ensemble(job))
    assert len(killer.killed) == 1
    assert report.ok and sorted(report.committed) == SHARDS
    assert [(r["shard"], r["attempt"]) for r in report.retried] == [("shard-00001", 1)]
    assert report.retried[0]["error"].startswith("actor died")
    assert_same_dataset(reference, str(tmp_path / "ds"))
    assert validate_dataset(str(tmp_path / "ds")).ok
    # the killed actor's half-written file was invisible meanwhile and is swept when the job ends
    assert not list((tmp_path / "ds" / "_tmp").glob("*.parquet"))
    assert sorted(ReinforcedDataset(str(tmp_path / "ds")).listing().data) == SHARDS


@pytest.mark.timeout(240)
def test_hung_actor_is_killed_and_its_shard_retried_elsewhere(ray_local, corpus, tiny_ensemble, reference, tmp_path):
    """An actor SIGSTOPped mid-shard (a stuck NFS/S3 read, a deadlock, a wedged GPU look the same):
    past the shard deadline the driver kills it, starts a replacement and retries the shard."""
    cfg = job_file(tmp_path / "job.yaml", urls_of(corpus), tiny_ensemble, tmp_path / "ds", shard_timeout_s=25)
    job = load_job(cfg)
    with ShardKiller(tmp_path / "ds", "shard-00001", times=1, sig=signal.SIGSTOP) as stopper:
        report = run_job(job, resolve_ensemble(job))
    [pid] = stopper.killed
    assert report.ok and sorted(report.committed) == SHARDS
    assert [(r["shard"], r["attempt"]) for r in report.retried] == [("shard-00001", 1)]
    assert report.retried[0]["error"].startswith("hung: no result after")
    deadline = time.time() + 30
    while _alive(pid) and time.time() < deadline:  # ray.kill of a stopped process: SIGKILL works
        time.sleep(0.2)
    assert not _alive(pid)
    assert_same_dataset(reference, str(tmp_path / "ds"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(180)
def test_poison_shard_is_retried_a_bounded_number_of_times_and_reported(
    ray_local, corpus, tiny_ensemble, reference, tmp_path, capsys
):
    """shard-00002 kills its actor on every attempt (as an OOM or a crashing decoder would)."""
    root = tmp_path / "ds"
    cfg = job_file(tmp_path / "job.yaml", urls_of(corpus), tiny_ensemble, root, max_attempts=2)
    with ShardKiller(root, "shard-00002", times=99) as killer:
        rc = dr(["reinforce", "--config", cfg])
    err = capsys.readouterr().err
    assert rc == 1
    assert len(killer.killed) == 2  # exactly max_attempts attempts
    manifest = Folder(str(root)).read_json("manifest.json")
    [failed] = manifest["failed"]
    assert (failed["shard"], failed["attempts"], failed["permanent"]) == ("shard-00002", 2, False)
    assert failed["error"].startswith("actor died")
    assert "shard-00002: actor died" in err and "(2 attempt(s))" in err and "rerun the same command" in err
    assert not manifest["complete"] and manifest["n_shards"] == 2
    assert_same_dataset(reference, str(root), names=["shard-00000", "shard-00001"])
    assert sorted(manifest["shards"]) == ["shard-00000", "shard-00001"]


@pytest.mark.timeout(60)
def test_actors_that_cannot_be_placed_fail_the_job_after_a_bounded_wait(ray_local, corpus, tiny_ensemble, tmp_path):
    cfg = job_file(
        tmp_path / "job.yaml",
        urls_of(corpus),
        tiny_ensemble,
        tmp_path / "ds",
        gpus_per_actor=1,
        actor_start_timeout_s=3,
    )
    job = load_job(cfg)
    t0 = time.time()
    report = run_job(job, resolve_ensemble(job))
    assert time.time() - t0 < 30
    assert not report.ok and not report.committed
    assert "0 of min_actors=1 actor(s) ready after 3s" in report.error and "1 GPU" in report.error
    assert "GPU 0 free of 0" in report.error
    assert Folder(str(tmp_path / "ds")).read_json("manifest.json")["complete"] is False


# --------------------------------------------------------------------------- the driver killed


def _session_pids(sid: int) -> list[int]:
    """Processes in session ``sid`` (the `dr reinforce` we started and everything it started:
    its Ray head, raylet, workers, actors)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(d))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _kill_session(sid: int) -> None:
    for _ in range(100):
        pids = _session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes of session {sid} survive SIGKILL: {_session_pids(sid)}")


def _dr_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.timeout(300)
def test_driver_killed_mid_job_then_rerun_resumes_to_the_undisturbed_dataset(
    ray_local, corpus, tiny_ensemble, reference, tmp_path, capsys
):
    """`dr reinforce` runs in its own session with its own local Ray (execution.address unset:
    a new local instance, never the test's Ray found via /tmp/ray/ray_current_cluster)."""
    root = tmp_path / "ds"
    cfg = job_file(tmp_path / "job.yaml", urls_of(corpus), tiny_ensemble, root, num_cpus=2)
    cmd = [sys.executable, "-m", "dr_pipeline.cli", "reinforce", "--config", cfg]
    log = open(tmp_path / "first.log", "w+")
    p = subprocess.Popen(cmd, cwd=REPO, env=_dr_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 200
        while not list((root / "_markers").glob("*.json")):
            assert p.poll() is None, f"dr reinforce ended early:\n{Path(log.name).read_text()}"
            assert time.time() < deadline, "no shard committed in time"
            time.sleep(0.02)
        own_raylet = [q for q in _session_pids(p.pid) if b"raylet" in _cmdline(q)]
        os.kill(p.pid, signal.SIGKILL)  # the driver alone, mid-job, as the OOM killer would
        assert own_raylet, "dr reinforce attached to another Ray instead of starting its own"
        committed_at_kill = len(list((root / "_markers").glob("*.json")))
        deadline = time.time() + 60  # its watchdog reaps Ray's GCS, raylet, agents and actors
        while _session_pids(p.pid) and time.time() < deadline:
            time.sleep(0.2)
        left = [_cmdline(q)[:60] for q in _session_pids(p.pid)]
        assert not left, f"processes of the killed driver's Ray survive: {left}"
    finally:
        p.kill()
        p.wait()
        _kill_session(p.pid)
        log.close()
    assert 1 <= committed_at_kill < N_SHARDS
    checkpoint = Folder(str(root)).read_json("manifest.json")  # written at plan time, not since
    assert checkpoint is not None and not checkpoint["complete"] and checkpoint["n_shards"] == 0

    # The same command again (in this process, on the test's Ray: a fresh driver process would
    # only add start-up time; all it can know of the first run is what storage holds).
    capsys.readouterr()
    assert dr(cmd[3:]) == 0
    err = capsys.readouterr().err
    skipped = int(err.split(" shard(s) already committed")[0].rsplit("; ", 1)[-1])
    assert skipped >= committed_at_kill
    assert_same_dataset(reference, str(root))
    assert validate_dataset(str(root)).ok
    assert not list((root / "_tmp").glob("*.parquet"))  # leftovers of the killed run swept
    assert json.loads((root / "manifest.json").read_text())["complete"]


# --------------------------------------------------------------------------- cluster entrypoint and job files


def test_cluster_job_files_are_valid_and_the_entrypoint_connects_to_the_running_cluster(tmp_path, monkeypatch):
    import importlib.util

    import yaml

    from dr_pipeline.models.teachers import check_ensemble

    for name, n_aug, ensemble in [("datacompdr-12m", 30, "datacompdr"), ("dfndr-2b", 2, "dfndr2b")]:
        job = load_job(REPO / "jobs" / "configs" / f"{name}.yaml")
        ens = resolve_ensemble(job)
        check_ensemble(ens)  # structure + ids, no download
        assert (job.aug.n_aug, job.captions.k, ens.name) == (n_aug, 5, ensemble)
        assert job.input.urls.startswith("s3://") and job.output.path.startswith("s3://")
        assert job.execution.gpus_per_actor == 1 and job.execution.device == "cuda"
        assert not job.input.storage_options and not job.output.storage_options  # no keys in files
    cluster = yaml.safe_load((REPO / "jobs" / "cluster.yaml").read_text())
    assert cluster["provider"]["type"] == "aws" and cluster["available_node_types"]["head"]["resources"] == {"CPU": 0}
    rayjob = yaml.safe_load((REPO / "jobs" / "kuberay-rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob" and "jobs/reinforce.py --config" in rayjob["spec"]["entrypoint"]
    gpu = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1

    spec = importlib.util.spec_from_file_location("jobs_reinforce", REPO / "jobs" / "reinforce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seen: list[list[str]] = []
    monkeypatch.setattr(mod, "main", lambda argv: seen.append(argv) or 0)
    no_address = write_job(
        tmp_path / "a.yaml", input={"urls": "x.tar"}, output={"path": str(tmp_path / "o")}, teachers="t.yaml"
    )
    mod.entry(["--config", no_address])
    mod.entry(["--config", no_address, "--address", "ray://head:10001"])
    mod.entry(["--config", str(REPO / "jobs" / "configs" / "dfndr-2b.yaml")])
    assert seen == [
        ["reinforce", "--config", no_address, "--address", "auto"],
        ["reinforce", "--config", no_address, "--address", "ray://head:10001"],
        ["reinforce", "--config", str(REPO / "jobs" / "configs" / "dfndr-2b.yaml")],
    ]
