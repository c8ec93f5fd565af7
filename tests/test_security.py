"""No pickle out, no pickle in, no secrets anywhere: payloads are refused, not executed."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import pickle
import tarfile
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from dr_pipeline.cli import main as dr
from dr_pipeline.config import ConfigError, load_ensemble, load_job, redact, strip_redacted
from dr_pipeline.corpus.readers import Sample, iter_shard
from dr_pipeline.corpus.synthetic import make_corpus
from dr_pipeline.models.teachers import check_ensemble, load_teacher
from dr_pipeline.shards.datacompdr import UnsafeMemberError, iter_datacompdr_tar
from tests.conftest import write_job
from tests.nasty_corpus import (
    make_nasty_corpus,
    npz_payload,
    pickle_payload,
    torch_payload,
    write_malicious_datacompdr_tar,
)

pytestmark = pytest.mark.timeout(180)


# --------------------------------------------------------------------------- pickle in


def test_payloads_are_live(tmp_path):
    """Control: the payloads really execute when loaded unsafely (so the refusals below mean something)."""
    for i, (make, load) in enumerate(
        [
            (pickle_payload, pickle.loads),
            (torch_payload, lambda b: torch.load(io.BytesIO(b), weights_only=False)),
            (npz_payload, lambda b: dict(__import__("numpy").load(io.BytesIO(b), allow_pickle=True))),
        ]
    ):
        sentinel = tmp_path / f"control-{i}"
        obj = load(make(str(sentinel)))
        if isinstance(obj, dict):  # npz: the object array unpickles on access
            [v for v in obj.values()]
        assert sentinel.exists()


def test_datacompdr_reader_refuses_pickle_in_pth_gz_and_npz(tmp_path):
    sentinel = tmp_path / "EXECUTED"
    tar = write_malicious_datacompdr_tar(str(tmp_path / "evil.tar"), str(sentinel))
    with pytest.raises(UnsafeMemberError, match="pth.gz member refused by the safe loader"):
        next(iter_datacompdr_tar(tar))
    # the npz sample alone
    only_npz = tmp_path / "evil-npz.tar"
    with tarfile.open(tar) as src, tarfile.open(only_npz, "w") as dst:
        for m in src.getmembers():
            if m.name.startswith("b."):
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(UnsafeMemberError, match="npz member needs pickle, refused"):
        list(iter_datacompdr_tar(str(only_npz)))
    assert not sentinel.exists()


def test_base_reader_never_loads_pickled_members(tmp_path):
    corpus = make_nasty_corpus(str(tmp_path / "nasty"))
    recs = {r.key: r for r in iter_shard(corpus.shard("captions").url) if isinstance(r, Sample)}
    s = recs["pickled"]
    assert s.caption == "carries payloads" and s.meta == {}
    assert not Path(corpus.sentinel).exists()


def test_teacher_checkpoint_with_pickle_is_refused(tiny_ensemble, tmp_path):
    sentinel = tmp_path / "EXECUTED"
    evil = Path(tiny_ensemble).with_name("evil-ckpt.pt")
    evil.write_bytes(torch_payload(str(sentinel)))
    ens = yaml.safe_load(Path(tiny_ensemble).read_text())
    ens["teachers"][0]["pretrained"] = evil.name
    path = Path(tiny_ensemble).with_name("evil.yaml")
    path.write_text(yaml.safe_dump(ens))
    spec = load_ensemble(path)
    check_ensemble(spec)  # the file exists: only loading can tell
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        load_teacher(spec.teachers[0], spec)
    assert not sentinel.exists()


def test_yaml_python_tags_are_refused(tmp_path):
    sentinel = tmp_path / "EXECUTED"
    p = tmp_path / "job.yaml"
    p.write_text(f"input: {{urls: x}}\noutput: !!python/object/apply:builtins.open [{str(sentinel)!r}, w]\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(p)
    assert not sentinel.exists()


# --------------------------------------------------------------------------- no pickle out, no secrets

SECRETS = {
    "key": "AKIDSENTINELKEY0001",
    "secret": "SENTINEL-SECRET-VALUE-0002",
    "client_kwargs": {"aws_session_token": "SENTINEL-SESSION-0004"},
}


def test_redact_covers_storage_option_shapes():
    so = {
        "endpoint_url": "http://h",
        **SECRETS,
        "token": "SENTINEL-TOKEN-0003",
        "password": "p",
        "account_key": "a",
        "connection_string": "c",
        "nested": [{"api_key": "x"}],
        "anon": False,
    }
    r = redact(so)
    text = json.dumps(r)
    assert all(v not in text for v in ("AKIDSENTINELKEY0001", "SENTINEL", '"p"', '"a"', '"c"', '"x"'))
    assert r["endpoint_url"] == "http://h" and r["anon"] is False
    assert strip_redacted(r) == {"endpoint_url": "http://h", "client_kwargs": {}, "nested": [{}], "anon": False}


def _outputs_are_plain_data(fs, root: str) -> list[str]:
    """Every file is Parquet (JSON metadata), JSON or YAML - nothing that needs unpickling."""
    seen = []
    for path in fs.find(root):
        data = fs.cat_file(path)
        name = path.rsplit("/", 1)[-1]
        seen.append(name)
        if name.endswith(".parquet"):
            assert data[:4] == b"PAR1" and data[-4:] == b"PAR1", path
            meta = pq.read_metadata(io.BytesIO(data)).metadata or {}
            for k, v in meta.items():
                if k != b"ARROW:schema":
                    json.loads(v)
        elif name.endswith(".json"):
            json.loads(data)
        elif name.endswith(".yaml"):
            yaml.safe_load(data)
        elif name == "README.md":  # the dataset card: YAML front matter + text
            assert data.startswith(b"---\n") and yaml.safe_load(data.split(b"---\n")[1])["configs"]
        else:
            raise AssertionError(f"unexpected output file {path}")
        assert b"\x80\x04\x95" not in data[:64] and b"\x80\x05\x95" not in data[:64], path  # no pickle header
    return seen


def test_s3_job_outputs_no_pickle_and_no_secret_anywhere(tiny_ensemble, s3_bucket, tmp_path, capfd, caplog):
    bucket, so = s3_bucket
    so = {**so, **SECRETS}  # moto accepts any credentials
    local = tmp_path / "corpus"
    make_corpus(str(local), n_shards=1, per_shard=3, seed=1, formats=("tar",))
    fs = fsspec.filesystem("s3", **so)
    fs.put(f"{local}/tar/shard-00000.tar", f"{bucket}/in/shard-00000.tar")
    cfg = write_job(
        tmp_path / "job.yaml",
        input={
            "urls": [f"s3://{bucket}/in/shard-00000.tar", f"s3://{bucket}/in/shard-00009.tar"],
            "storage_options": so,
        },
        output={"path": f"s3://{bucket}/ds", "storage_options": so},
        teachers=tiny_ensemble,
        aug={"n_aug": 1, "size": 64},
        captions={"k": 0},
    )
    caplog.set_level(logging.INFO)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = dr(["-v", "reinforce", "--config", cfg, "--local"])
    assert code == 1  # shard-00009 does not exist
    files = _outputs_are_plain_data(fs, f"{bucket}/ds")
    assert {
        "job.yaml",
        "ensemble.yaml",
        "dataset.json",
        "manifest.json",
        "shard-00000.json",
        "shard-00000.parquet",
    } <= set(files)
    dumped = yaml.safe_load(fs.cat_file(f"{bucket}/ds/job.yaml"))
    assert dumped["input"]["storage_options"]["secret"] == "***" and dumped["output"]["storage_options"]["key"] == "***"
    # validate / inspect read the redacted job.yaml back and still work (credentials from the environment)
    assert dr(["validate", f"s3://{bucket}/ds"]) == 1  # the missing shard, nothing else
    texts = [err.getvalue(), capfd.readouterr().out, capfd.readouterr().err, caplog.text]
    texts += [fs.cat_file(p).decode("utf-8", "replace") for p in fs.find(f"{bucket}/ds") if not p.endswith(".parquet")]
    texts += [
        v.decode("utf-8", "replace")
        for p in fs.find(f"{bucket}/ds")
        if p.endswith(".parquet")
        for v in (pq.read_metadata(io.BytesIO(fs.cat_file(p))).metadata or {}).values()
    ]
    blob = "\n".join(texts)
    assert "shard-00009" in blob and "missing: input shard has no committed output shard" in blob
    for value in ("AKIDSENTINELKEY0001", "SENTINEL-SECRET-VALUE-0002", "SENTINEL-SESSION-0004"):
        assert value not in blob, value


def test_pth_gz_of_plain_tensors_still_loads(tmp_path):
    """The safe loader is not a blanket refusal: released DataCompDR bf16 tensors load."""
    buf = io.BytesIO()
    torch.save(torch.ones(2, 4, dtype=torch.bfloat16), buf)
    members = [("k.url.txt", b"u"), ("k.pth.gz", gzip.compress(buf.getvalue()))]
    path = tmp_path / "ok.tar"
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    (rec,) = iter_datacompdr_tar(str(path))
    assert rec["image_emb"].shape == (2, 4)


def test_dumped_configs_keep_schema_fields_and_load_back():
    """Config field names are the schema, never secrets: a dumped train config with ``join_key``
    and ``syn_key_regex`` loads back equal; its storage options are still redacted."""
    from dr_pipeline.config import from_dict
    from dr_pipeline.train.config import DataConfig

    cfg = DataConfig(reinforced="s3://b/ds", join_key="uid", syn_key_regex="^syn_text$", storage_options=dict(SECRETS))
    dumped = redact(cfg)
    assert dumped["join_key"] == "uid" and dumped["syn_key_regex"] == "^syn_text$"
    assert "SENTINEL" not in json.dumps(dumped) and "AKIDSENTINELKEY0001" not in json.dumps(dumped)
    back = from_dict(DataConfig, strip_redacted(dumped), "dumped")
    assert back == DataConfig(
        reinforced="s3://b/ds", join_key="uid", syn_key_regex="^syn_text$", storage_options={"client_kwargs": {}}
    )
