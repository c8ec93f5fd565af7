"""`make gpu-check` and the GPU bench section, as far as a machine without CUDA can take them.

- without CUDA both say so, exit 0 and write nothing;
- the check's whole path (corpus, two `run_job` runs, shard-by-shard comparison, report) runs
  CPU against CPU via the hidden `--device cpu`, and must pass exactly;
- the comparison catches each kind of difference it exists for (aug params, a greedy caption,
  an embedding vector turned away);
- the bench's `measure` (teachers, captioner, busy fraction of a real `ShardProcessor` run)
  runs on the CPU with the tiny ensemble and renders.
"""

from __future__ import annotations

import json

import pytest
import torch

from dr_pipeline import bench, bench_gpu, gpu_check
from dr_pipeline.config import load_ensemble, load_job
from dr_pipeline.corpus.synthetic import make_split
from dr_pipeline.shards.parquet_io import read_shard
from tests.conftest import write_job


def test_without_cuda_gpu_check_and_gpu_bench_say_so_and_exit_0(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert bench_gpu.run_section(str(tmp_path)) is None
    assert "skipped: no CUDA" in capsys.readouterr().err
    out = tmp_path / "B.md"
    assert bench.main(["--only", "gpu", "--out", str(out), "--costs-dir", str(tmp_path / "costs")]) == 0
    assert "skipped: no CUDA" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "costs").exists()  # records nothing


@pytest.mark.timeout(300)
def test_gpu_check_cpu_vs_cpu_passes_and_its_comparison_catches_each_difference(tiny_ensemble, tmp_path, capsys):
    cfg = write_job(
        tmp_path / "job.yaml",
        input={"urls": "replaced.tar"},
        output={"path": str(tmp_path / "x")},
        teachers=tiny_ensemble,
    )
    work = tmp_path / "work"
    rc = gpu_check.main(
        [
            "--device",
            "cpu",
            "--teachers",
            tiny_ensemble,
            "--config",
            cfg,
            "--shards",
            "1",
            "--per-shard",
            "4",
            "--workdir",
            str(work),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "gpu-check: PASSED" in printed
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["ok"] and res["rows"] == 4 and res["vectors"] > 0 and res["captions"] > 0
    assert res["rows_identical"] and res["aug_identical"] and res["caption_mismatches"] == 0
    assert set(res["min_cosine"]) >= {"tiny-vit-a:image", "tiny-vit-a:text", "tiny-vit-b:image", "tiny-vit-b:text"}
    assert min(res["min_cosine"].values()) > 0.9999  # same device, same bits

    # one shard of each run, then differences planted one kind at a time
    ref_file = next((work / "ref-cpu" / "shards").glob("*.parquet"))
    a, _ = read_shard(str(ref_file))
    assert gpu_check.compare_rows(a, read_shard(str(ref_file))[0])["problems"] == []

    b, _ = read_shard(str(ref_file))
    b.aug_params = b.aug_params.copy()
    b.aug_params[0, 0, 0] ^= 1
    r = gpu_check.compare_rows(a, b)
    assert not r["aug_identical"] and any("augmentation" in p for p in r["problems"])

    cap = next(iter(a.syn))
    row = next(i for i, caps in enumerate(a.syn[cap]) if caps)
    b, _ = read_shard(str(ref_file))
    b.syn[cap][row] = ["a different caption"] + b.syn[cap][row][1:]
    r = gpu_check.compare_rows(a, b)
    assert r["caption_mismatches"] == 1 and any("greedy captions differ" in p for p in r["problems"])

    t = next(iter(a.image_emb))
    b, _ = read_shard(str(ref_file))
    emb = b.image_emb[t].clone()
    emb[1, 0] = -emb[1, 0]  # one view's vector turned around
    b.image_emb[t] = emb
    r = gpu_check.compare_rows(a, b, min_cosine=0.99)
    assert r["below"] == 1 and r["min_cosine"][f"{t}:image"] < 0 and r["problems"]
    assert r["rows_identical"] and r["aug_identical"] and r["caption_mismatches"] == 0


@pytest.mark.timeout(300)
def test_gpu_bench_measure_runs_the_product_path_on_cpu_and_renders(tiny_ensemble, tmp_path):
    make_split("web", str(tmp_path / "corpus"), n_shards=2, per_shard=4, seed=0, formats=("tar",))
    urls = [str(tmp_path / "corpus" / "tar" / f"shard-{i:05d}.tar") for i in range(2)]
    job = load_job(
        write_job(
            tmp_path / "job.yaml",
            input={"urls": urls[0]},
            output={"path": str(tmp_path / "ds")},
            teachers=tiny_ensemble,
        )
    )
    d = bench_gpu.measure(
        job, load_ensemble(tiny_ensemble), urls, str(tmp_path / "ds"), n_images=4, n_caption_images=2, rounds=2
    )
    assert d["device"] == "cpu" and set(d["teachers"]) == {"tiny-vit-a", "tiny-vit-b"}
    assert all(v["images_per_s"] > 0 for v in d["teachers"].values())
    assert 0 < d["teacher_pair_images_per_s"] < min(v["images_per_s"] for v in d["teachers"].values())
    assert d["captioners"]["tiny-coca"]["captions_per_s"] > 0
    p = d["pipeline"]
    assert p["samples"] == 4 and p["wall_s"] > 0 and p["models_only_s"] > 0 and 0 < p["busy_fraction"] < 2
    text = "\n".join(bench_gpu.render_section(d))
    assert "accelerator busy fraction" in text and "captions/s" in text and "images/s" in text
