"""End to end: synthetic corpus -> dr reinforce (local Ray) -> validate / inspect / export / add-teacher."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dr_pipeline import augment
from dr_pipeline.cli import main as dr
from dr_pipeline.config import ConfigError, load_ensemble, load_job
from dr_pipeline.corpus.readers import iter_shard
from dr_pipeline.corpus.synthetic import make_corpus
from dr_pipeline.execute import add_teacher
from dr_pipeline.execute.runner import resolve_ensemble, run_job
from dr_pipeline.models.teachers import load_teacher
from dr_pipeline.shards.dataset import ReinforcedDataset
from dr_pipeline.shards.parquet_io import read_shard
from dr_pipeline.storage.folder import Folder
from tests.conftest import write_job

pytestmark = pytest.mark.timeout(600)
PER_SHARD = 12  # > batch_size 5: every shard spans several batches (the public pipeline's bug)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    make_corpus(str(d), n_shards=2, per_shard=PER_SHARD, seed=3)
    return d


@pytest.fixture(scope="module")
def ray_run(corpus, tiny_ensemble, tmp_path_factory, ray_local):
    """The reference run: 2 shards on 2 Ray actors, batch size 5."""
    d = tmp_path_factory.mktemp("run")
    job = load_job(
        write_job(
            d / "job.yaml",
            input={"urls": f"{corpus}/tar/shard-{{00000..00001}}.tar"},
            output={"path": str(d / "ds")},
            teachers=tiny_ensemble,
        )
    )
    report = run_job(job, resolve_ensemble(job))
    assert report.ok and len(report.committed) == 2
    return job, str(d / "ds")


def all_rows(root: str) -> dict:
    ds = ReinforcedDataset(root)
    out = {}
    for name in ds.markers():
        rows, meta = read_shard(ds.shard_url(name))
        out[name] = rows
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint16)


def max_ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((bits(a).to(torch.int32) - bits(b).to(torch.int32)).abs().max()) if a.numel() else 0


def test_every_input_key_is_written_or_rejected(ray_run, corpus):
    job, root = ray_run
    ds = ReinforcedDataset(root)
    markers = ds.markers()
    assert sorted(markers) == ["shard-00000", "shard-00001"]
    for name, m in markers.items():
        base = [s.key for s in iter_shard(f"{corpus}/tar/{name}.tar")]
        rows, meta = read_shard(ds.shard_url(name))
        assert rows.keys == base  # same order, nothing lost, nothing added
        assert m.n_read == PER_SHARD == m.n_written + m.n_rejected
        assert meta["shard"] == name and meta["seed"] == 0 and meta["schema_version"] == 1
        assert [t["id"] for t in meta["teachers"]] == ["tiny-vit-a", "tiny-vit-b"]
    manifest = ds.folder.read_json("manifest.json")
    assert manifest["complete"] and manifest["n_written"] == 2 * PER_SHARD
    assert manifest["shards"]["shard-00001"]["sha256"] == markers["shard-00001"].sha256


def test_params_are_the_counter_rng_and_embeddings_match_the_replayed_view(ray_run, corpus, tiny_ensemble):
    """Stored params == sample_all(seed, key) (batch-independent) and every row's embeddings are
    the teachers' embeddings of exactly its replayed views and its own caption (no misalignment)."""
    job, root = ray_run
    ens = load_ensemble(tiny_ensemble)
    teachers = [load_teacher(t, ens) for t in ens.teachers]
    rows = all_rows(root)["shard-00001"]
    samples = {s.key: s for s in iter_shard(f"{corpus}/tar/shard-00001.tar")}
    for i in [0, 4, 5, 11]:  # first/last of batch 1, first of batch 2, last row
        s = samples[rows.keys[i]]
        img = Image.open(io.BytesIO(s.image)).convert("RGB")
        params = augment.sample_all(job.aug, job.seed, s.key, *img.size)
        np.testing.assert_array_equal(rows.aug_params[i], augment.pack(params))
        assert rows.captions[i] == s.caption and (rows.widths[i], rows.heights[i]) == img.size
        for t in teachers:
            views = torch.stack(
                [augment.replay(img, p, t.image_size, job.aug) for p in augment.unpack(rows.aug_params[i])]
            )
            want = t.encode_images(views).bfloat16()
            assert max_ulp_diff(rows.image_emb[t.id][i], want) <= 1
            assert max_ulp_diff(rows.text_emb[t.id][i], t.encode_texts([s.caption]).bfloat16()[0]) <= 1
            syn = rows.syn["tiny-coca"][i]
            if syn:
                assert max_ulp_diff(rows.syn_emb[t.id]["tiny-coca"][i], t.encode_texts(syn).bfloat16()) <= 1


def test_same_seed_other_batch_size_and_workers_gives_the_same_dataset(ray_run, corpus, tiny_ensemble, tmp_path):
    job, root = ray_run
    other = dataclasses.replace(
        job,
        output=dataclasses.replace(job.output, path=str(tmp_path / "ds")),
        execution=dataclasses.replace(job.execution, batch_size=7, max_actors=1),
    )
    assert other.output_hash(resolve_ensemble(other)) == job.output_hash(resolve_ensemble(job))
    assert run_job(other, resolve_ensemble(other), executor="local").ok
    a, b = all_rows(root), all_rows(str(tmp_path / "ds"))
    for name in a:
        assert a[name].keys == b[name].keys
        np.testing.assert_array_equal(a[name].aug_params, b[name].aug_params)
        assert a[name].syn == b[name].syn  # captions seeded per (seed, key, index)
        for t in a[name].image_emb:
            assert max_ulp_diff(a[name].image_emb[t], b[name].image_emb[t]) <= 1
            assert max_ulp_diff(a[name].text_emb[t], b[name].text_emb[t]) <= 1


def test_rerun_skips_committed_shards_and_changed_config_is_refused(ray_run, capsys):
    job, root = ray_run
    before = {n: m.sha256 for n, m in ReinforcedDataset(root).markers().items()}
    report = run_job(job, resolve_ensemble(job), executor="local")
    assert report.skipped == ["shard-00000", "shard-00001"] and not report.committed
    assert {n: m.sha256 for n, m in ReinforcedDataset(root).markers().items()} == before
    changed = dataclasses.replace(job, seed=1)
    with pytest.raises(ConfigError, match="different config.*--force"):
        run_job(changed, resolve_ensemble(changed), executor="local")


def test_cli_validate_inspect_and_corruption(ray_run, tmp_path, capsys):
    job, root = ray_run
    assert dr(["validate", root]) == 0
    assert "2 committed shard(s), 24 samples checked" in capsys.readouterr().out
    png = tmp_path / "sheet.png"
    assert dr(["inspect", root, "--out", str(png), "--images", "3"]) == 0
    out = capsys.readouterr().out
    assert "samples: 24" in out and "tiny-vit-b" in out and "captions_per_image" in out
    with Image.open(png) as im:
        assert im.size[1] == 3 * 128  # 3 rows of tiles
    # a flipped byte in a copy of the dataset is caught and the shard named
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    f = bad / "shards" / "shard-00001.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert dr(["validate", str(bad)]) == 1
    assert "shard-00001: checksum mismatch" in capsys.readouterr().out


def test_datacompdr_export_read_by_an_independent_reader(ray_run, tmp_path):
    job, root = ray_run
    assert dr(["export", root, "--format", "datacompdr", "--out", str(tmp_path / "dcdr")]) == 0
    rows = all_rows(root)["shard-00000"]
    with tarfile.open(tmp_path / "dcdr" / "shard-00000.tar") as tar:
        names = tar.getnames()
        members = {n: tar.extractfile(n).read() for n in names}
    keys = list(dict.fromkeys(n.split(".", 1)[0] for n in names))
    assert keys == rows.keys
    exts = sorted(n.split(".", 1)[1] for n in names if n.startswith(keys[0] + "."))
    assert exts == ["json", "npz", "paug.json", "syn.json", "url.txt"]
    for i, k in enumerate(keys):
        with np.load(io.BytesIO(members[f"{k}.npz"]), allow_pickle=False) as z:
            img, txt = z["image_emb"], z["text_emb"]
        syn = json.loads(members[f"{k}.syn.json"])["syn_text"]
        paug = json.loads(members[f"{k}.paug.json"])["param_aug"]
        assert img.dtype == np.float32 and img.shape == (2, 32 + 48)
        assert txt.shape == (1 + len(syn), 32 + 48) and syn == rows.syn["tiny-coca"][i]
        assert len(paug) == img.shape[0] and len(paug[0]) == 2 and len(paug[0][0]) == 4
        np.testing.assert_array_equal(txt[0, :32], rows.text_emb["tiny-vit-a"][i].float().numpy())  # GT first
        np.testing.assert_array_equal(txt[0, 32:], rows.text_emb["tiny-vit-b"][i].float().numpy())
        np.testing.assert_array_equal(img[:, 32:], rows.image_emb["tiny-vit-b"][i].float().numpy())
        i_, j_, h_, w_ = paug[0][0]
        assert 0 <= i_ and 0 <= j_ and i_ + h_ <= rows.heights[i] and j_ + w_ <= rows.widths[i]
        assert json.loads(members[f"{k}.json"])["sha256"] == rows.image_sha256[i]


def test_adding_a_teacher_equals_a_full_run(ray_run, corpus, tiny_ensemble, tmp_path, capsys):
    job, root = ray_run
    ens = yaml.safe_load(open(tiny_ensemble))
    only_a = Path(tiny_ensemble).with_name("only_a.yaml")  # beside tiny.yaml: relative paths resolve
    only_a.write_text(yaml.safe_dump({**ens, "teachers": ens["teachers"][:1]}))
    partial = dataclasses.replace(
        job, teachers=str(only_a), output=dataclasses.replace(job.output, path=str(tmp_path / "ds"))
    )
    assert run_job(partial, resolve_ensemble(partial), executor="local").ok
    assert set(all_rows(str(tmp_path / "ds"))["shard-00000"].image_emb) == {"tiny-vit-a"}
    # a first attempt fails on shard-00001 (in-process): shard-00000 is committed with the new config
    real = add_teacher.TeacherAdder.process

    def flaky(self, url, dataset, config_hash):
        if "shard-00001" in url:
            raise RuntimeError("injected: node lost")
        return real(self, url, dataset, config_hash)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(add_teacher.TeacherAdder, "process", flaky)
        first = add_teacher.add_teachers(str(tmp_path / "ds"), tiny_ensemble, ["tiny-vit-b"], executor="local")
    assert first.committed == ["shard-00000"] and [f.shard for f in first.failed] == ["shard-00001"]
    capsys.readouterr()
    # the rerun (on Ray, as users run it) resumes: only shard-00001 is computed
    assert dr(["add-teacher", str(tmp_path / "ds"), "--teachers", tiny_ensemble, "--teacher", "tiny-vit-b"]) == 0
    assert "to 1 shard(s) (1 already had it)" in capsys.readouterr().out
    full, added = all_rows(root), all_rows(str(tmp_path / "ds"))
    for name in full:
        f, a = full[name], added[name]
        assert f.keys == a.keys and f.syn == a.syn
        np.testing.assert_array_equal(f.aug_params, a.aug_params)
        for t in ("tiny-vit-a", "tiny-vit-b"):
            assert max_ulp_diff(f.image_emb[t], a.image_emb[t]) <= 1
            assert max_ulp_diff(f.text_emb[t], a.text_emb[t]) <= 1
    assert dr(["validate", str(tmp_path / "ds")]) == 0
    assert (
        Folder(str(tmp_path / "ds")).read_json("dataset.json")["config_hash"]
        == Folder(root).read_json("dataset.json")["config_hash"]
    )
    # per-shard commits: every marker has the new hash; the manifest is complete
    ds = ReinforcedDataset(str(tmp_path / "ds"))
    new_hash = ds.config_hash()
    assert {m.config_hash for m in ds.markers().values()} == {new_hash}
    assert ds.read_manifest().complete and ds.read_manifest().config_hash == new_hash


def test_parquet_corpus_gives_the_same_dataset_as_tar(ray_run, corpus, tmp_path):
    job, root = ray_run
    pq_job = dataclasses.replace(
        job,
        input=dataclasses.replace(job.input, urls=f"{corpus}/parquet/shard-00000.parquet"),
        output=dataclasses.replace(job.output, path=str(tmp_path / "ds")),
    )
    assert run_job(pq_job, resolve_ensemble(pq_job), executor="local").ok
    a, b = all_rows(root)["shard-00000"], all_rows(str(tmp_path / "ds"))["shard-00000"]
    assert a.keys == b.keys and a.syn == b.syn and a.image_sha256 == b.image_sha256
    np.testing.assert_array_equal(a.aug_params, b.aug_params)


def test_s3_in_and_out(corpus, tiny_ensemble, s3_bucket, tmp_path):
    bucket, so = s3_bucket
    import fsspec

    fs = fsspec.filesystem("s3", **so)
    fs.put(f"{corpus}/tar/shard-00000.tar", f"{bucket}/corpus/shard-00000.tar")
    job = load_job(
        write_job(
            tmp_path / "job.yaml",
            input={"urls": f"s3://{bucket}/corpus/*.tar", "storage_options": so},
            output={"path": f"s3://{bucket}/ds", "storage_options": so},
            teachers=tiny_ensemble,
        )
    )
    assert run_job(job, resolve_ensemble(job), executor="local").ok
    assert fs.exists(f"{bucket}/ds/_markers/shard-00000.json") and fs.exists(f"{bucket}/ds/manifest.json")
    rows, _ = read_shard(f"s3://{bucket}/ds/shards/shard-00000.parquet", so)
    assert len(rows) == PER_SHARD


def test_cli_config_errors_fail_fast(tmp_path, corpus, tiny_ensemble, capsys):
    cfg = write_job(
        tmp_path / "j.yaml",
        input={"urls": f"{corpus}/tar/nothing-*.tar"},
        output={"path": str(tmp_path / "o")},
        teachers=tiny_ensemble,
    )
    assert dr(["reinforce", "--config", cfg, "--local"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: input:") and "nothing-*.tar" in err and len(err.strip().splitlines()) == 1
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"input": {"urls": "x"}, "output": {"path": "o"}, "teachers": tiny_ensemble, "aug": {"n_augs": 3}}
        )
    )
    assert dr(["reinforce", "--config", str(cfg), "--local"]) == 2
    assert "unknown key 'n_augs' (did you mean 'n_aug'?)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
