"""The path rule (docs/cluster.md "Paths") and the interop fixes of issue 17: img2dataset output
folders as input, `dr eval` on unlabelled shards (retrieval only), `dr inspect` on a non-dataset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dr_pipeline import cli
from dr_pipeline.config import ConfigError, load_ensemble, load_job, load_job_ensemble, resolve_path
from dr_pipeline.corpus.readers import expand_urls

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the path rule


def test_resolve_path_rule(tmp_path):
    assert resolve_path("s3://b/x/{0..3}.tar", tmp_path) == "s3://b/x/{0..3}.tar"
    assert resolve_path("/abs/x.tar", tmp_path) == "/abs/x.tar"
    assert resolve_path("../data/x-{00..09}.tar", tmp_path / "jobs") == str(tmp_path / "data" / "x-{00..09}.tar")
    assert resolve_path("~/x", tmp_path) == str(Path.home() / "x")
    assert resolve_path("pkg:teachers/dfndr2b.yaml", tmp_path) == str(REPO / "teachers" / "dfndr2b.yaml")
    with pytest.raises(ConfigError, match="pkg:teachers/tiny.yaml"):  # names what is shipped
        resolve_path("pkg:teachers/nope.yaml", tmp_path)


def test_job_paths_are_relative_to_the_job_file_not_the_current_folder(tmp_path, monkeypatch):
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "input": {"urls": ["a/{0..1}.tar", "s3://b/c.tar"]},
                "output": {"path": "../ds"},
                "teachers": "pkg:teachers/tiny.yaml",
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    job = load_job("cfg/job.yaml")
    assert job.input.urls == (str(d / "a" / "{0..1}.tar"), "s3://b/c.tar")
    assert job.output.path == str(tmp_path / "ds")
    assert load_job_ensemble(job).name == "tiny"
    for shipped in ("demo", "datacompdr-12m", "dfndr-2b"):  # every shipped job config
        j = load_job(REPO / "jobs" / "configs" / f"{shipped}.yaml")
        assert load_job_ensemble(j).teachers
    demo = load_job(REPO / "jobs" / "configs" / "demo.yaml")
    assert demo.output.path == str(REPO / "out" / "demo" / "dataset")  # where `make demo` looks


def test_missing_teachers_names_the_rule(tmp_path):
    (tmp_path / "job.yaml").write_text(
        yaml.safe_dump({"input": {"urls": "x.tar"}, "output": {"path": "o"}, "teachers": "teachers/tiny.yaml"})
    )
    with pytest.raises(ConfigError, match="relative to the job file's folder.*pkg:teachers/NAME.yaml"):
        load_job_ensemble(load_job(tmp_path / "job.yaml"))


def test_output_inside_a_ray_working_dir_copy_is_refused(tmp_path):
    pkg = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd" / "jobs" / "configs"
    pkg.mkdir(parents=True)
    (pkg / "demo.yaml").write_text(
        yaml.safe_dump(
            {
                "input": {"urls": "../../out/x.tar"},
                "output": {"path": "../../out/ds"},
                "teachers": "pkg:teachers/tiny.yaml",
            }
        )
    )
    with pytest.raises(ConfigError, match=r"--working-dir copy Ray uploaded.*\$PWD/jobs/configs"):
        load_job(pkg / "demo.yaml")
    (pkg / "s3.yaml").write_text(
        yaml.safe_dump(
            {"input": {"urls": "s3://b/x.tar"}, "output": {"path": "s3://b/ds"}, "teachers": "pkg:teachers/tiny.yaml"}
        )
    )
    assert load_job(pkg / "s3.yaml").output.path == "s3://b/ds"  # URLs are fine from anywhere


def test_ensemble_checkpoint_paths_follow_the_rule(tmp_path):
    ens = load_ensemble(REPO / "teachers" / "tiny.yaml")
    assert ens.resolve("checkpoints/a.safetensors") == str(REPO / "teachers" / "checkpoints" / "a.safetensors")
    assert ens.resolve("openai") == "openai" and ens.resolve("hf-hub:org/repo") == "hf-hub:org/repo"
    assert ens.resolve("local-dir:ckpt/x") == f"local-dir:{REPO / 'teachers' / 'ckpt' / 'x'}"
    assert ens.resolve("pkg:teachers/synthetic/syn-coca.safetensors") == str(
        REPO / "teachers" / "synthetic" / "syn-coca.safetensors"
    )


# --------------------------------------------------------------------------- img2dataset output folders


def _img2dataset_folder(root: Path, mode: str) -> None:
    """What img2dataset 1.4x writes: per shard {n}.tar (webdataset) or {n}.parquet (parquet mode,
    with a jpg column), a metadata {n}.parquet beside each tar (no image column), {n}_stats.json."""
    import webdataset as wds

    root.mkdir(parents=True)
    for n in ("00000", "00001"):
        meta = pa.table(
            {
                "key": [f"{n}0001"],
                "url": ["http://x/a.jpg"],
                "caption": ["a dog"],
                "status": ["success"],
                "width": [8],
                "height": [8],
            }
        )
        if mode == "webdataset":
            with wds.TarWriter(str(root / f"{n}.tar")) as w:
                w.write({"__key__": f"{n}0001", "jpg": _jpeg(), "txt": "a dog", "json": {"caption": "a dog"}})
            pq.write_table(meta, root / f"{n}.parquet")
        else:
            pq.write_table(meta.append_column("jpg", pa.array([_jpeg()], pa.binary())), root / f"{n}.parquet")
        (root / f"{n}_stats.json").write_text(json.dumps({"count": 1, "successes": 1}))


def _jpeg() -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(b, "JPEG")
    return b.getvalue()


def test_img2dataset_output_folders_are_accepted(tmp_path):
    _img2dataset_folder(tmp_path / "wds", "webdataset")
    _img2dataset_folder(tmp_path / "pq", "parquet")
    assert expand_urls(str(tmp_path / "wds")) == [str(tmp_path / "wds" / f"{n}.tar") for n in ("00000", "00001")]
    assert expand_urls(str(tmp_path / "wds" / "*")) == expand_urls(str(tmp_path / "wds"))  # globs too
    assert expand_urls(str(tmp_path / "pq")) == [str(tmp_path / "pq" / f"{n}.parquet") for n in ("00000", "00001")]


# --------------------------------------------------------------------------- dr eval / dr inspect


def test_dr_eval_on_unlabelled_shards_is_retrieval_only(tmp_path, capsys):
    import webdataset as wds

    from dr_pipeline.storage.folder import Folder
    from dr_pipeline.train.checkpoint import save_checkpoint
    from dr_pipeline.train.config import StudentConfig
    from dr_pipeline.train.students import build_student, resolve_spec

    spec = resolve_spec(StudentConfig(arch="tiny"))
    save_checkpoint(
        Folder(str(tmp_path / "run")), 0, {"student": spec.to_dict(), "model": build_student(spec, seed=0).state_dict()}
    )
    shard = tmp_path / "real-00000.tar"  # a web shard: image, caption, img2dataset json, no labels
    with wds.TarWriter(str(shard)) as w:
        for i in range(4):
            w.write(
                {
                    "__key__": f"{i:09d}",
                    "jpg": _jpeg(),
                    "txt": f"photo {i}",
                    "json": {"caption": f"photo {i}", "url": "http://x", "status": "success"},
                }
            )
    out = tmp_path / "m.json"
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(shard), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "image_to_text" in text and "retrieval only" in text
    res = json.loads(out.read_text())
    assert res["retrieval"]["n"] == 4 and res["zeroshot"] == {} and "retrieval only" in res["note"]


@pytest.mark.parametrize("what", ["folder", "missing", "file"])
def test_dr_inspect_on_a_non_dataset_is_one_line(tmp_path, capsys, what):
    target = {"folder": tmp_path, "missing": tmp_path / "nope", "file": tmp_path / "x.txt"}[what]
    if what == "file":
        target.write_text("hello")
    assert cli.main(["inspect", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "not a dr_pipeline dataset" in err
