"""Config and CLI errors fail fast: one line naming the problem and the fix, exit 2, before any
model is loaded or anything is written."""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import pytest
import yaml

from dr_pipeline.cli import main as dr
from dr_pipeline.corpus.synthetic import make_corpus
from tests.conftest import write_job

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("corpus")
    make_corpus(str(d), n_shards=1, per_shard=2, seed=0, formats=("tar",))
    return f"{d}/tar/shard-00000.tar"


@pytest.fixture(autouse=True)
def no_models(monkeypatch):
    """Loading a model (or starting an executor) at all is a failure of these tests."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded / an executor started before the config error")

    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.setattr("dr_pipeline.execute.runner.run_local", refuse)
    monkeypatch.setattr("dr_pipeline.execute.runner.run_ray", refuse)


def ensemble_variant(tiny_ensemble: str, name: str, edit) -> str:
    """A copy of the tiny ensemble, edited, beside the original (relative paths still resolve)."""
    ens = yaml.safe_load(Path(tiny_ensemble).read_text())
    ens = copy.deepcopy(ens)
    edit(ens)
    path = Path(tiny_ensemble).with_name(f"variant-{name}.yaml")
    path.write_text(yaml.safe_dump(ens, sort_keys=False))
    return str(path)


def run_error(capsys, args: list[str]) -> str:
    assert dr(args) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    return lines[0]


def _set(path: str, value):
    def edit(ens):
        node = ens
        *head, last = path.split(".")
        for p in head:
            node = node[int(p)] if p.isdigit() else node[p]
        node[last] = value

    return edit


ENSEMBLE_CASES = {
    "unknown_model": (
        _set("teachers.0.model", "dr-tiny-vit-aa"),
        ["teacher 'tiny-vit-a'", "unknown open_clip model 'dr-tiny-vit-aa'", "did you mean 'dr-tiny-vit-a'"],
    ),
    "missing_checkpoint": (
        _set("teachers.1.pretrained", "checkpoints/nope.safetensors"),
        ["teacher 'tiny-vit-b'", "checkpoint not found", "nope.safetensors", "dr make-teachers"],
    ),
    "image_size_mismatch": (
        _set("teachers.0.image_size", 64),
        ["teacher 'tiny-vit-a'", "image_size 64 but 'dr-tiny-vit-a' takes 32", "set image_size: 32"],
    ),
    "context_mismatch": (
        _set("teachers.1.context_length", 77),
        ["teacher 'tiny-vit-b'", "context_length 77", "set context_length: 24 or omit it"],
    ),
    "swapped_checkpoint": (
        _set("teachers.0.pretrained", "checkpoints/tiny-vit-b.safetensors"),
        ["teacher 'tiny-vit-a'", "tiny-vit-b.safetensors", "belongs to another model", "fix model: or pretrained:"],
    ),
    "interpolation_typo": (
        _set("teachers.0.interpolation", "bicubik"),
        [
            "teacher 'tiny-vit-a'",
            "unknown interpolation 'bicubik'",
            "set interpolation: to one of bicubic, bilinear, nearest",
        ],
    ),
    "zero_std": (_set("teachers.1.std", [1.0, 0.0, 1.0]), ["teacher 'tiny-vit-b'", "std", "must be > 0"]),
    "captioner_not_coca": (
        lambda e: (_set("captioners.0.model", "dr-tiny-vit-a")(e), _set("captioners.0.image_size", 32)(e)),
        ["captioner 'tiny-coca'", "not a CoCa model", "pick a coca_* model"],
    ),
    "duplicate_ids": (_set("teachers.1.id", "tiny-vit-a"), ["duplicate ids ['tiny-vit-a']", "unique id"]),
    "ensemble_unknown_key": (
        lambda e: e["teachers"][0].update(pretrianed="x"),
        ["variant-ensemble_unknown_key.yaml: teachers[0]: unknown key 'pretrianed'", "did you mean 'pretrained'?"],
    ),
}


@pytest.mark.parametrize("case", list(ENSEMBLE_CASES))
def test_ensemble_errors(case, tiny_ensemble, corpus, tmp_path, capsys):
    edit, expected = ENSEMBLE_CASES[case]
    ens = ensemble_variant(tiny_ensemble, case, edit)
    cfg = write_job(tmp_path / "job.yaml", input={"urls": corpus}, output={"path": str(tmp_path / "out")}, teachers=ens)
    line = run_error(capsys, ["reinforce", "--config", cfg, "--local"])
    for s in expected:
        assert s in line, (s, line)
    assert not (tmp_path / "out").exists()


JOB_CASES = {
    "n_aug_zero": (dict(aug={"n_aug": 0}), ["aug.n_aug must be >= 1 (got 0)", "set aug.n_aug to 1 or more"]),
    "n_aug_not_int": (dict(aug={"n_aug": "four"}), ["job.yaml: aug.n_aug: expected an integer, got 'four'"]),
    "unknown_top_key": (
        dict(exectuion={"batch_size": 2}),
        ["job.yaml: unknown key 'exectuion'", "did you mean 'execution'?"],
    ),
    "unknown_nested_key": (
        dict(execution={"batchsize": 2}),
        ["job.yaml: execution: unknown key 'batchsize'", "did you mean 'batch_size'?"],
    ),
    "input_matches_nothing": (
        dict(input={"urls": "{tmp}/nothing-*.tar"}),
        ["input:", "nothing-*.tar", "pattern matches no files", "fix input.urls"],
    ),
    "input_dir_empty": (
        dict(input={"urls": "{tmp}/emptydir"}),
        ["input:", "emptydir", "no .tar or .parquet", "fix input.urls"],
    ),
    "input_empty": (dict(input={"urls": []}), ["input.urls is empty", "set input.urls"]),
    "output_empty": (dict(output={"path": ""}), ["output.path is empty", "set output.path"]),
    "output_not_writable": (
        dict(output={"path": "/sys/dr-not-writable-test/out"}),
        ["output location not writable", "/sys/dr-not-writable-test/out", "choose another output.path"],
    ),
    "teachers_file_missing": (
        dict(teachers="{tmp}/no-such-ensemble.yaml"),
        ["teachers file not found", "no-such-ensemble.yaml", "set 'teachers:'"],
    ),
}


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_job_errors(case, tiny_ensemble, corpus, tmp_path, capsys):
    overrides, expected = JOB_CASES[case]
    (tmp_path / "emptydir").mkdir()
    fill = {
        k: (
            v.replace("{tmp}", str(tmp_path))
            if isinstance(v, str)
            else {kk: vv.replace("{tmp}", str(tmp_path)) if isinstance(vv, str) else vv for kk, vv in v.items()}
            if isinstance(v, dict)
            else v
        )
        for k, v in overrides.items()
    }
    base = {"input": {"urls": corpus}, "output": {"path": str(tmp_path / "out")}, "teachers": tiny_ensemble}
    for k, v in fill.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    cfg = write_job(tmp_path / "job.yaml", **base)
    line = run_error(capsys, ["reinforce", "--config", cfg, "--local"])
    for s in [s.replace("{tmp}", str(tmp_path)) for s in expected]:
        assert s in line, (s, line)
    assert not (tmp_path / "out").exists()
    assert not Path("/sys/dr-not-writable-test").exists()


def test_yaml_syntax_and_python_tags_are_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input:\n  urls: [a, b\noutput: {path: o}\n")
    line = run_error(capsys, ["reinforce", "--config", str(bad), "--local"])
    assert f"{bad}: not valid YAML at line" in line and "fix the file" in line
    sentinel = tmp_path / "EXECUTED"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"input: !!python/object/apply:builtins.open [{str(sentinel)!r}, w]\noutput: {{path: o}}\n")
    line = run_error(capsys, ["reinforce", "--config", str(evil), "--local"])
    assert "not valid YAML" in line and "python/object/apply" in line and "no !!python tags" in line
    assert not sentinel.exists()


def test_missing_config_file(tmp_path, capsys):
    line = run_error(capsys, ["reinforce", "--config", str(tmp_path / "nope.yaml"), "--local"])
    assert "config file not found" in line and "nope.yaml" in line and "check the path" in line


def test_changed_config_on_existing_output_is_refused(tiny_ensemble, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset.json").write_text('{"config_hash": "0123456789abcdef", "schema_version": 1}')
    cfg = write_job(tmp_path / "job.yaml", input={"urls": corpus}, output={"path": str(out)}, teachers=tiny_ensemble)
    line = run_error(capsys, ["reinforce", "--config", cfg, "--local"])
    assert "was made by a different config" in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json"]


# --------------------------------------------------------------------------- issue 18: hostile configs


def _job_text(corpus: str, tmp_path, tiny_ensemble: str, extra: str = "") -> str:
    return f"input: {{urls: '{corpus}'}}\noutput: {{path: '{tmp_path / 'out'}'}}\nteachers: '{tiny_ensemble}'\n" + extra


def test_duplicate_yaml_keys_are_refused(tiny_ensemble, corpus, tmp_path, capsys):
    # Old loader: the last `output:` / `aug:` silently won.
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        _job_text(corpus, tmp_path, tiny_ensemble, "aug: {n_aug: 2}\noutput: {path: elsewhere}\naug: {n_aug: 3}\n")
    )
    line = run_error(capsys, ["reinforce", "--config", str(cfg), "--local"])
    assert f"{cfg}: duplicate key 'output' at line 5 (first at line 2)" in line and "keep one" in line
    cfg.write_text(_job_text(corpus, tmp_path, tiny_ensemble, "aug:\n  n_aug: 2\n  n_aug: 3\n"))
    line = run_error(capsys, ["reinforce", "--config", str(cfg), "--local"])
    assert "duplicate key 'n_aug' at line 6 (first at line 5)" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options",
    [
        "[key, AKIA-VERY-SECRET]",  # a list: old message echoed it
        "{config_kwargs: 7, secret: AKIA-VERY-SECRET}",  # old: a 58-line traceback from s3fs
        "{client_kwargs: [AKIA-VERY-SECRET]}",
        "{1: AKIA-VERY-SECRET}",
        "{key: !!binary QUtJQS1WRVJZLVNFQ1JFVA==}",
        "AKIA-VERY-SECRET",
    ],
)
def test_malformed_storage_options_one_line_no_secret(options, tiny_ensemble, corpus, tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"input: {{urls: 's3://bucket/x/*.tar', storage_options: {options}}}\n"
        f"output: {{path: '{tmp_path / 'out'}'}}\nteachers: '{tiny_ensemble}'\n"
    )
    line = run_error(capsys, ["reinforce", "--config", str(cfg), "--local"])
    assert "input.storage_options" in line and "AKIA" not in line and "SECRET" not in line, line


def test_output_storage_options_are_checked_too(tiny_ensemble, corpus, tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"input: {{urls: '{corpus}'}}\noutput: {{path: 's3://b/o', storage_options: {{config_kwargs: x}}}}\n"
        f"teachers: '{tiny_ensemble}'\n"
    )
    line = run_error(capsys, ["reinforce", "--config", str(cfg), "--local"])
    assert "output.storage_options.config_kwargs: expected a mapping, got a str" in line


BOMB = """input:
  urls: '{corpus}'
  storage_options:
    a: &a [x, x, x, x, x, x, x, x, x, x]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
output: {{path: '{out}'}}
teachers: '{teachers}'
"""

RSS_CHILD = """
import sys, time
from dr_pipeline.memory import peak_rss_bytes
from dr_pipeline.cli import main
before = peak_rss_bytes() // 1024
t0 = time.time()
code = main(["reinforce", "--config", sys.argv[1], "--local"])
print("RESULT", code, peak_rss_bytes() // 1024 - before, round(time.time() - t0, 2))
"""


def test_yaml_alias_bomb_is_refused_with_flat_memory(tiny_ensemble, corpus, tmp_path):
    # Old: a ~750-byte file like this one (10^9 values once expanded) ran for minutes and took >1 GB
    # in to_dict/redact. A fresh process, so its peak RSS is its own.
    import subprocess
    import sys

    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB.format(corpus=corpus, out=tmp_path / "out", teachers=tiny_ensemble))
    assert cfg.stat().st_size < 1000
    p = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    code, grown_kb, secs = p.stdout.split("RESULT")[1].split()
    lines = p.stderr.strip().splitlines()
    assert code == "2" and len(lines) == 1 and "expands to" in lines[0] and "alias bomb" in lines[0], p.stderr
    assert int(grown_kb) < 30 * 1024 and float(secs) < 5, (grown_kb, secs)


def test_oversized_config_is_refused(tmp_path, capsys):
    cfg = tmp_path / "big.yaml"
    cfg.write_text("input: {urls: x}\n# " + "x" * (2 << 20) + "\n")
    line = run_error(capsys, ["reinforce", "--config", str(cfg), "--local"])
    assert "larger than the 1 MiB a config may have" in line
