"""S3 end to end (moto on 127.0.0.1 behind a fault-injecting proxy): read the base corpus from and
write the dataset to s3://, through transient errors, a half-uploaded object, permanent 403/404s,
and with credentials in storage_options that must never reach a file or a log.

Client-side retries are switched off in the storage options (`config_kwargs.retries`), so every
injected error reaches the pipeline's own retry layer (retry.py) instead of being absorbed by
botocore; in production both layers are on.
"""

from __future__ import annotations

import http.client
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
import pytest

from dr_pipeline.cli import main as dr
from dr_pipeline.config import load_job
from dr_pipeline.execute.runner import plan_job, resolve_ensemble
from dr_pipeline.shards.dataset import ReinforcedDataset
from dr_pipeline.storage.folder import Folder
from dr_pipeline.train.sources import _dataset_dir
from dr_pipeline.validate import validate_dataset
from tests.test_faults import SHARDS, assert_same_dataset, corpus, job_file, one_torch_thread, reference  # noqa: F401 (fixtures)

KEY_ID = "AKIADRTESTKEY0000042"
SECRET = "dr-test-secret/wJalrXUtnFEMI+K7MDENG"

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "expect"}


class FaultProxy:
    """Forwards every request to ``upstream``; a request matching a rule gets the rule's error
    instead (``times`` times, then it passes). ``log`` records (method, path, status)."""

    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.rules: list[dict] = []
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self) -> None:
                body = self._body()
                rule = proxy._match(self.command, self.path)
                if rule is not None:
                    status, code = rule["status"], rule["code"]
                    data = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected by the test</Message><RequestId>t</RequestId></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    proxy._record(self.command, self.path, status)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in HOP or (k.lower() == "content-length" and self.command != "HEAD"):
                        continue
                    self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                proxy._record(self.command, self.path, resp.status)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail(
        self, method: str, path_regex: str, status: int = 503, code: str = "ServiceUnavailable", times: int | None = 1
    ) -> dict:
        rule = {
            "method": method,
            "re": re.compile(path_regex),
            "status": status,
            "code": code,
            "times": times,
            "hits": 0,
        }
        with self.lock:
            self.rules.append(rule)
        return rule

    def _match(self, method: str, path: str) -> dict | None:
        with self.lock:
            for r in self.rules:
                if (
                    r["method"] in (method, "*")
                    and r["re"].search(path)
                    and (r["times"] is None or r["hits"] < r["times"])
                ):
                    r["hits"] += 1
                    return r
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.log.append((method, path, status))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def proxy(s3_endpoint):
    p = FaultProxy(s3_endpoint)
    try:
        yield p
    finally:
        p.close()


def creds_options(proxy: FaultProxy) -> dict:
    """Options with a (dummy) access key and secret, as a production job might carry them."""
    return {
        "endpoint_url": proxy.url,
        "key": KEY_ID,
        "secret": SECRET,
        "skip_instance_cache": True,
        "config_kwargs": {"retries": {"total_max_attempts": 1}},
    }


def upload_corpus(corpus: Path, bucket: str, prefix: str, so: dict, shards=SHARDS) -> None:
    fs = fsspec.filesystem("s3", **so)
    for n in shards:
        fs.put_file(f"{corpus}/tar/{n}.tar", f"{bucket}/{prefix}/{n}.tar")


def hits(proxy: FaultProxy, path_regex: str) -> list[int]:
    return [status for _, path, status in proxy.log if re.search(path_regex, path)]


@pytest.mark.timeout(240)
def test_s3_on_ray_survives_transient_errors_ignores_half_uploads_and_never_leaks_credentials(
    ray_local, corpus, reference, tiny_ensemble, s3_bucket, proxy, tmp_path, capfd
):
    bucket, direct = s3_bucket
    upload_corpus(corpus, bucket, "corpus", direct)
    so = creds_options(proxy)
    root = f"s3://{bucket}/ds"
    cfg = job_file(tmp_path / "job.yaml", f"s3://{bucket}/corpus/*.tar", tiny_ensemble, root, input_so=so, output_so=so)
    job = load_job(cfg)

    # An earlier attempt died mid-upload: half of shard-00001 sits at its final name, no marker.
    plan_job(job, resolve_ensemble(job))
    ref_bytes = (Path(reference) / "shards" / "shard-00001.parquet").read_bytes()
    fsspec.filesystem("s3", **direct).pipe_file(
        f"{bucket}/ds/shards/shard-00001.parquet", ref_bytes[: len(ref_bytes) // 2]
    )
    ds = ReinforcedDataset(root, so)
    assert sorted(ds.listing().data) == ["shard-00001"] and ds.markers() == {}
    assert _dataset_dir(root, so)[0] == []  # the trainer's reader ignores it
    rep = validate_dataset(root, so)  # dr validate: missing, not "corrupt"
    assert sorted(rep.problems) == [(n, "missing: input shard has no committed output shard") for n in SHARDS]

    # Transient errors everywhere the pipeline touches storage, each once (twice for the input open).
    rules = [
        proxy.fail("GET", rf"/{bucket}/ds/dataset\.json", 503, "ServiceUnavailable"),  # driver
        proxy.fail("GET", rf"/{bucket}\?.*prefix=ds%2F_markers", 500, "InternalError"),  # driver list
        proxy.fail("*", rf"/{bucket}/corpus/shard-00000\.tar", 500, "InternalError", times=2),  # actor read
        proxy.fail("PUT", rf"/{bucket}/ds/shards/shard-00001\.parquet", 503, "ServiceUnavailable"),  # upload
        proxy.fail("PUT", rf"/{bucket}/ds/_markers/shard-00002\.json", 500, "InternalError"),
    ]  # marker
    capfd.readouterr()
    assert dr(["reinforce", "--config", cfg]) == 0
    out, err = capfd.readouterr()
    assert [r["hits"] for r in rules] == [r["times"] for r in rules]
    for r in rules:  # each failure was followed by a success
        statuses = hits(proxy, r["re"].pattern)
        assert r["status"] in statuses and statuses[-1] < 300, (r["re"].pattern, statuses)
    assert "0 attempt(s) retried" in err  # retried in place, no shard attempt lost

    assert_same_dataset(reference, root, so, exact=False)
    assert validate_dataset(root, so).ok  # the half upload was overwritten
    manifest = ds.folder.read_json("manifest.json")
    assert manifest["complete"] and sorted(manifest["shards"]) == SHARDS

    # Credentials: in no file of the dataset (configs, markers, manifest, Parquet metadata), in no output.
    fs = fsspec.filesystem("s3", **direct)
    files = fs.find(f"{bucket}/ds")
    assert {f"{bucket}/ds/{p}" for p in ("job.yaml", "ensemble.yaml", "manifest.json", "dataset.json")} <= set(files)
    for f in files:
        data = fs.cat_file(f)
        assert SECRET.encode() not in data and KEY_ID.encode() not in data, f
    assert "***" in fs.cat_file(f"{bucket}/ds/job.yaml").decode()
    assert SECRET not in out + err and KEY_ID not in out + err


@pytest.mark.timeout(120)
def test_s3_permanent_errors_fail_fast_with_a_clear_message(corpus, tiny_ensemble, s3_bucket, proxy, tmp_path, capfd):
    bucket, direct = s3_bucket
    upload_corpus(corpus, bucket, "corpus", direct, shards=SHARDS[:2])  # shard-00002 does not exist: 404
    proxy.fail("*", rf"/{bucket}/corpus/shard-00001\.tar", 403, "AccessDenied", times=None)  # no read access
    so = creds_options(proxy)
    cfg = job_file(
        tmp_path / "job.yaml",
        f"s3://{bucket}/corpus/shard-{{00000..00002}}.tar",
        tiny_ensemble,
        f"s3://{bucket}/ds",
        input_so=so,
        output_so=so,
        max_attempts=3,
        io_attempts=6,
    )
    capfd.readouterr()
    with one_torch_thread():
        assert dr(["reinforce", "--config", cfg, "--local"]) == 1
    err = capfd.readouterr().err
    failed = {f["shard"]: f for f in Folder(f"s3://{bucket}/ds", so).read_json("manifest.json")["failed"]}
    assert sorted(failed) == ["shard-00001", "shard-00002"]
    assert all(f["attempts"] == 1 and f["permanent"] for f in failed.values())
    assert "HTTP 403" in failed["shard-00001"]["error"] and "corpus/shard-00001.tar" in failed["shard-00001"]["error"]
    assert "file not found" in failed["shard-00002"]["error"]
    assert len(hits(proxy, rf"/{bucket}/corpus/shard-00001\.tar")) == 1  # one request, no retry
    assert "shard-00001: " in err and "(1 attempt(s), permanent: not retried)" in err
    assert ReinforcedDataset(f"s3://{bucket}/ds", so).markers().keys() == {"shard-00000"}

    # an output location we may not write to: refused before any model loads, exit 2
    proxy.fail("PUT", rf"/{bucket}/locked/", 403, "AccessDenied", times=None)
    cfg = job_file(
        tmp_path / "locked.yaml",
        f"s3://{bucket}/corpus/shard-00000.tar",
        tiny_ensemble,
        f"s3://{bucket}/locked",
        input_so=so,
        output_so=so,
    )
    assert dr(["reinforce", "--config", cfg, "--local"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: output location not writable: s3://") and "AccessDenied" in err
    assert SECRET not in err and KEY_ID not in err
