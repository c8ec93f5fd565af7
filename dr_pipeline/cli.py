"""The ``dr`` command. Each sub-command is a thin wrapper over one module.

Exit codes: 0 done; 1 some shards failed (one line each, then a summary; rerunning the same
command resumes and redoes only those); 2 a config or usage error, one line, before any model
is loaded or shard written; 3 storage or environment (disk full, read-only, permission denied,
403, a vanished folder, a refused file), one line saying what to fix; rerunning resumes; 4 an
unexpected error (a bug): one line, the traceback goes to a log file (``$DR_LOG_DIR`` or
``~/.cache/dr_pipeline/logs``), never to the terminal.

Start-up is kept cheap: this module imports only argparse and the config loader; torch,
open_clip, ray and transformers are imported inside a command, after its config is valid, so
``dr --help``, every ``--help``, config errors and ``dr plan`` answer at once
(tests/test_cli_fast.py checks that they import none of them).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from dr_pipeline.config import ConfigError, check_device, load_job_ensemble, resolve_path


def cli_path(p: str | None) -> str | None:
    """A path given on the command line: as given (relative to the current folder), a shipped
    ``pkg:`` name resolved."""
    return resolve_path(p, Path.cwd()) if p and p.startswith("pkg:") else p


def cmd_make_corpus(a: argparse.Namespace) -> int:
    from dr_pipeline.corpus.synthetic import ZEROSHOT_DIR, make_corpus, make_split, zeroshot_classes

    formats = tuple(a.formats.split(","))
    if a.split is None:
        urls = make_corpus(a.out, n_shards=a.shards, per_shard=a.per_shard, seed=a.seed, formats=formats)
    else:
        urls = make_split(
            a.split,
            a.out,
            n_shards=a.shards,
            per_shard=a.per_shard,
            seed=a.seed,
            formats=formats,
            per_class=a.per_class,
        )
    print(f"wrote {len(urls)} shard file(s) under {a.out}")
    if a.split == "test" and a.per_class > 0:
        print(
            f"wrote the zero-shot set ({a.per_class} images x {len(zeroshot_classes())} classes) under {a.out}/{ZEROSHOT_DIR}/"
        )
    return 0


def cmd_bootstrap(a: argparse.Namespace) -> int:
    import dataclasses as dc

    from dr_pipeline.bootstrap import BootstrapConfig, bootstrap, format_report, verify

    a.ensemble = cli_path(a.ensemble)
    if a.verify:
        problems = verify(a.ensemble)
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        if problems:
            print(
                f"the committed checkpoints of {a.ensemble} are missing or changed: restore them "
                f"(git checkout) or regenerate them with `dr bootstrap {a.ensemble}`",
                file=sys.stderr,
            )
            return 1
        print(f"{a.ensemble}: every checkpoint matches its SHA256SUMS entry")
        return 0
    overrides = {
        k: v
        for k, v in (
            ("seed", a.seed),
            ("n_train", a.n_train),
            ("per_shard", a.per_shard),
            ("clip_steps", a.clip_steps),
            ("coca_steps", a.coca_steps),
            ("batch_size", a.batch_size),
            ("jobs", a.jobs),
        )
        if v is not None
    }
    try:
        cfg = dc.replace(BootstrapConfig(), **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bootstrap: {e}") from None
    rep = bootstrap(a.ensemble, cfg, out_dir=a.out, only=a.only, evaluate=not a.no_eval)
    print(format_report(rep))
    return 0


def cmd_reproduce(a: argparse.Namespace) -> int:
    import dataclasses as dc

    from dr_pipeline.reproduce import load_reproduce_config, reproduce

    cfg = load_reproduce_config(a.config)
    if a.seeds:
        seeds = tuple(int(s) for s in a.seeds.split(","))
        cfg = dc.replace(
            cfg,
            train=dc.replace(
                cfg.train,
                seeds=seeds,
                ablation_seeds=tuple(s for s in cfg.train.ablation_seeds if s in seeds) or seeds[:1],
            ),
        )
    if a.ablation_seeds:
        cfg = dc.replace(
            cfg, train=dc.replace(cfg.train, ablation_seeds=tuple(int(s) for s in a.ablation_seeds.split(",")))
        )
    if a.results_dir:
        cfg = dc.replace(cfg, results_dir=a.results_dir)
    res = reproduce(cfg, only=a.only)
    return 0 if res["analysis"]["headline"]["ratio_mean"] is not None else 1


def cmd_make_teachers(a: argparse.Namespace) -> int:
    from dr_pipeline.models.tiny import make_tiny_checkpoints

    written = make_tiny_checkpoints(cli_path(a.ensemble), force=a.force)
    print("\n".join(f"wrote {p}" for p in written) or "all checkpoints present")
    return 0


def _job(a: argparse.Namespace):
    from dr_pipeline.config import load_job

    job = load_job(a.config)
    ex = job.execution
    if getattr(a, "address", None):
        ex = dataclasses.replace(ex, address=a.address)
    if getattr(a, "device", None):
        ex = dataclasses.replace(ex, device=a.device)
    job = dataclasses.replace(job, execution=ex)
    if getattr(a, "output", None):
        job = dataclasses.replace(job, output=dataclasses.replace(job.output, path=cli_path(a.output)))
    return job


def runs_on_this_machine(a: argparse.Namespace, job) -> bool:
    """--local, or a fresh local Ray (no address in flags, job or $RAY_ADDRESS): see runner.ray_address."""
    import os

    return a.local or (job.execution.address or os.environ.get("RAY_ADDRESS") or "local") == "local"


def cmd_reinforce(a: argparse.Namespace) -> int:
    job = _job(a)
    ensemble = load_job_ensemble(job)
    executor = "local" if a.local else "ray"
    check_device(job.execution, executor, runs_on_this_machine(a, job))
    from dr_pipeline.execute.runner import run_job  # torch, open_clip, ray: only once the config is valid

    report = run_job(job, ensemble, force=a.force, executor=executor)
    if report.failed:
        print(f"{len(report.failed)} shard(s) failed:", file=sys.stderr)
        for f in report.failed:
            kind = ", permanent: not retried" if f.permanent else ""
            print(f"  {f.shard}: {f.error} ({f.attempts} attempt(s){kind})", file=sys.stderr)
    if report.error:
        print(f"error: {report.error}", file=sys.stderr)
    if not report.ok:
        print("rerun the same command to retry what is missing (committed shards are kept)", file=sys.stderr)
        return 1
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    from dr_pipeline.validate import validate_dataset

    if a.deep is not None and not 0 < a.deep <= 1:
        raise ConfigError(f"--deep takes a fraction of rows in (0, 1], got {a.deep}")
    rep = validate_dataset(a.dataset, check_base_keys=not a.no_base, deep=a.deep)
    print(rep.render())
    return 0 if rep.ok else 1


def cmd_inspect(a: argparse.Namespace) -> int:
    from dr_pipeline.shards.dataset import ReinforcedDataset

    if not ReinforcedDataset(a.dataset).is_dataset():
        raise ConfigError(
            f"{a.dataset}: not a dr_pipeline dataset (no dataset.json or _markers/ there): "
            "give the folder `dr reinforce` wrote (the job's output.path)"
        )
    from dr_pipeline.inspect_dataset import contact_sheet, render_summary, summarize

    print(render_summary(summarize(a.dataset)))
    out = a.out or str(Path(a.dataset) / "contact_sheet.png")
    contact_sheet(a.dataset, out, n_images=a.images)
    print(f"{'contact sheet':>20}: {out}")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    import json

    from dr_pipeline.status import job_status

    st = job_status(a.dataset)
    print(json.dumps(st.to_json(), indent=1) if a.json else st.render())
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from dr_pipeline.shards.datacompdr import export_datacompdr

    paths = export_datacompdr(a.dataset, a.out)
    print(f"wrote {len(paths)} DataCompDR tar(s) under {a.out}")
    return 0


def cmd_add_teacher(a: argparse.Namespace) -> int:
    from dr_pipeline.config import ExecutionSpec

    if a.device:
        check_device(ExecutionSpec(device=a.device), "local", local_machine=True)
    from dr_pipeline.execute.add_teacher import add_teachers

    rep = add_teachers(
        a.dataset, cli_path(a.teachers), a.teacher, device=a.device, executor="local" if a.local else "ray"
    )
    if not rep.ok:
        for f in rep.failed:
            print(f"  {f.shard}: {f.error} ({f.attempts} attempt(s))", file=sys.stderr)
        print("rerun the same command: shards that have the teacher already are skipped", file=sys.stderr)
        return 1
    print(f"added {','.join(a.teacher)} to {len(rep.committed)} shard(s) ({len(rep.skipped)} already had it)")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from dr_pipeline.train.loop import train_main

    return train_main(a.config, a.resume)


def cmd_eval(a: argparse.Namespace) -> int:
    from dr_pipeline.train.evaluate import eval_main

    return eval_main(a.checkpoint, a.data, a.out)


def cmd_plan(a: argparse.Namespace) -> int:
    import json

    from dr_pipeline.plan import estimate, load_costs, render, spec_from_args

    if not (a.ensemble or a.teacher or a.captioner):
        raise ConfigError("plan: give --ensemble FILE or --teacher MODEL[:DIM] / --captioner MODEL")
    try:
        spec = spec_from_args(
            a.samples,
            a.teacher or [],
            a.captioner or [],
            cli_path(a.ensemble),
            a.n_aug,
            a.k,
            a.per_shard,
            gpus=a.gpus,
            mfu=a.mfu,
            batch_size=a.batch_size,
            text_tokens=a.text_tokens,
            caption_tokens=a.caption_tokens,
            draws_per_caption=a.draws_per_caption,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    plan = estimate(spec, load_costs(a.costs))
    print(json.dumps(plan.to_dict(), indent=2) if a.json else render(plan))
    return 0


EXAMPLES = {
    "make-corpus": "dr make-corpus out/demo/corpus --split web --shards 4 --per-shard 32",
    "bootstrap": "dr bootstrap teachers/synthetic.yaml --verify",
    "reproduce": "dr reproduce --config jobs/configs/reproduce.yaml --only reinforced",
    "make-teachers": "dr make-teachers teachers/tiny.yaml",
    "reinforce": "dr reinforce --config jobs/configs/demo.yaml          # a fresh local Ray\n"
    "  dr reinforce --config jobs/configs/dfndr-2b.yaml --address auto",
    "validate": "dr validate out/demo/dataset",
    "inspect": "dr inspect out/demo/dataset --out out/demo/contact_sheet.png",
    "export": "dr export out/demo/dataset --format datacompdr --out out/demo/datacompdr",
    "status": "dr status s3://bucket/dfndr-2b --json",
    "add-teacher": "dr add-teacher out/demo/dataset --teachers teachers/tiny.yaml --teacher tiny-vit-b",
    "train": "dr train --config jobs/configs/train-tiny.yaml --resume latest",
    "eval": "dr eval --checkpoint out/demo/train-tiny --data out/demo/corpus/tar/shard-00003.tar",
    "plan": "dr plan --samples 1.9B --ensemble teachers/dfndr2b.yaml --gpus 256",
}
PATHS_NOTE = (
    "paths: on the command line, relative to the current folder; inside a config file,\n"
    "relative to that file's folder; pkg:teachers/NAME.yaml names a shipped ensemble"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help (not for flags or options without a default);
    examples printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def _cmd(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A sub-command whose --help shows its defaults and one example."""
    return sub.add_parser(
        name,
        help=help,
        description=help,
        formatter_class=HelpFormatter,
        epilog=f"example:\n  {EXAMPLES[name]}\n\n{PATHS_NOTE}" if name in EXAMPLES else PATHS_NOTE,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dr",
        description="Dataset reinforcement for CLIP training (MobileCLIP-style).",
        formatter_class=HelpFormatter,
        epilog="example:\n  dr reinforce --config jobs/configs/demo.yaml\n\n"
        "`dr COMMAND --help` shows a command's options, defaults and an example.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = _cmd(sub, "make-corpus", help="write the deterministic synthetic image-text corpus (tar + Parquet)")
    s.add_argument("out", help="output folder (tar/ and parquet/ below it)")
    s.add_argument("--shards", type=int, default=4, help="shard files per format")
    s.add_argument("--per-shard", type=int, default=32, help="samples per shard")
    s.add_argument("--seed", type=int, default=0, help="corpus seed")
    s.add_argument("--formats", default="tar,parquet", help="comma list of tar, parquet")
    s.add_argument(
        "--split",
        choices=["clean", "web", "test"],
        help="a split of the learning-efficiency experiment: clean (accurate captions, teacher "
        "training), web (alt-text-like noisy captions), test (+ zero-shot folder); "
        "default: the demo corpus",
    )
    s.add_argument("--per-class", type=int, default=8, help="--split test: zero-shot images per colour x shape class")
    s.set_defaults(fn=cmd_make_corpus)

    s = _cmd(sub, "bootstrap", help="train the synthetic domain's real tiny teachers + captioner on the clean split")
    s.add_argument("ensemble", nargs="?", default="teachers/synthetic.yaml", help="ensemble file")
    s.add_argument("--seed", type=int)
    s.add_argument("--n-train", type=int, help="clean-split images (default 12000)")
    s.add_argument("--per-shard", type=int, help="clean-split scenes per shard (default 32)")
    s.add_argument("--clip-steps", type=int, help="steps per CLIP teacher")
    s.add_argument("--coca-steps", type=int, help="captioner steps")
    s.add_argument("--batch-size", type=int, help="training batch size")
    s.add_argument("--jobs", type=int, help="models trained in parallel processes (1 thread each)")
    s.add_argument("--only", action="append", help="train only this entry id (repeatable)")
    s.add_argument("--out", help="write checkpoints + a relocated ensemble file here instead")
    s.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    s.add_argument("--verify", action="store_true", help="only check the checkpoints against SHA256SUMS")
    s.set_defaults(fn=cmd_bootstrap)

    s = _cmd(sub, "reproduce", help="reinforced vs plain student: steps-to-accuracy ratio, plot, results")
    s.add_argument("--config", default="jobs/configs/reproduce.yaml", help="experiment config")
    s.add_argument("--seeds", help="comma list overriding train.seeds")
    s.add_argument("--ablation-seeds", help="comma list overriding train.ablation_seeds")
    s.add_argument("--results-dir", help="write results.json/md and the plot here instead of results_dir")
    s.add_argument("--only", action="append", help="run only this variant (repeatable)")
    s.set_defaults(fn=cmd_reproduce)

    s = _cmd(sub, "make-teachers", help="create the local checkpoints of an ensemble's tiny models")
    s.add_argument("ensemble", help="ensemble file, e.g. teachers/tiny.yaml")
    s.add_argument("--force", action="store_true", help="overwrite existing checkpoints")
    s.set_defaults(fn=cmd_make_teachers)

    s = _cmd(sub, "reinforce", help="run a reinforcement job (Ray)")
    s.add_argument("--config", required=True, help="jobs/configs/<job>.yaml")
    s.add_argument(
        "--address",
        help="Ray cluster address: 'auto', host:port or ray://host:port "
        "(default: the job's, else $RAY_ADDRESS, else a new local Ray)",
    )
    s.add_argument("--output", help="override output.path")
    s.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="override execution.device; cuda is refused at once on a machine without CUDA "
        "when the job runs here (--local or a fresh local Ray), not for a cluster",
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="redo a dataset made by a different config (its shards are uncommitted, then rewritten); "
        "without it a changed config is refused: use --output for a new location",
    )
    s.add_argument("--local", action="store_true", help="run in this process without Ray (debugging)")
    s.set_defaults(fn=cmd_reinforce)

    s = _cmd(sub, "validate", help="check every committed shard against the contract")
    s.add_argument("dataset", help="dataset folder or URL (the job's output.path)")
    s.add_argument("--no-base", action="store_true", help="skip the check against the base corpus keys")
    s.add_argument(
        "--deep",
        nargs="?",
        type=float,
        const=1.0,
        metavar="FRACTION",
        help="also compare rows with their base samples and recompute the teachers' embeddings "
        "(all rows, or this fraction of them, e.g. --deep 0.01; loads the teachers)",
    )
    s.set_defaults(fn=cmd_validate)

    s = _cmd(sub, "inspect", help="print a summary and write a contact-sheet PNG")
    s.add_argument("dataset", help="dataset folder or URL (the job's output.path)")
    s.add_argument("--out", help="PNG path (default DATASET/contact_sheet.png)")
    s.add_argument("--images", type=int, default=4, help="source images on the contact sheet")
    s.set_defaults(fn=cmd_inspect)

    s = _cmd(sub, "status", help="progress of a running or finished job, from its files alone")
    s.add_argument("dataset", help="dataset folder or URL (the job's output.path)")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.set_defaults(fn=cmd_status)

    s = _cmd(sub, "export", help="export to another layout")
    s.add_argument("dataset", help="dataset folder or URL (the job's output.path)")
    s.add_argument("--format", choices=["datacompdr"], default="datacompdr", help="target layout")
    s.add_argument("--out", required=True, help="output folder")
    s.set_defaults(fn=cmd_export)

    s = _cmd(sub, "add-teacher", help="add teacher(s) to an existing dataset (only their embeddings are computed)")
    s.add_argument("dataset", help="dataset folder or URL (the job's output.path)")
    s.add_argument("--teachers", required=True, help="ensemble file that defines the new teacher(s)")
    s.add_argument("--teacher", required=True, action="append", help="teacher id (repeatable)")
    s.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="where the new teacher runs (cuda needs a CUDA device here)"
    )
    s.add_argument("--local", action="store_true", help="run in this process without Ray (debugging)")
    s.set_defaults(fn=cmd_add_teacher)

    s = _cmd(sub, "train", help="train an MCi student on reinforced shards")
    s.add_argument("--config", required=True, help="jobs/configs/train-<name>.yaml")
    s.add_argument("--resume", help="'latest' or a checkpoint path")
    s.set_defaults(fn=cmd_train)

    s = _cmd(sub, "eval", help="zero-shot classification and retrieval of a student checkpoint")
    s.add_argument("--checkpoint", required=True, help="checkpoint .pt or run directory (latest)")
    s.add_argument(
        "--data", required=True, help="base shards (retrieval + zero-shot) or an image folder DATA/<class>/*"
    )
    s.add_argument("--out", help="write the metrics JSON here")
    s.set_defaults(fn=cmd_eval)

    s = _cmd(sub, "plan", help="estimate output bytes, shards and accelerator-hours of a run (no models loaded)")
    s.add_argument("--samples", required=True, help="corpus size, e.g. 2e9, 1.9B, 12.8M")
    s.add_argument("--ensemble", help="teachers/*.yaml: its teachers and captioners")
    s.add_argument("--teacher", action="append", help="open_clip model or MODEL:DIM (repeatable)")
    s.add_argument("--captioner", action="append", help="open_clip CoCa model (repeatable)")
    s.add_argument("--n-aug", type=int, default=2, help="augmentations per image (DFNDR-2B: 2)")
    s.add_argument("--k", type=int, default=5, help="synthetic captions per captioner")
    s.add_argument("--per-shard", type=int, default=10_000, help="samples per shard")
    s.add_argument("--gpus", type=int, default=64, help="G in 'with G GPUs: D days, S shards/hour' (one actor each)")
    s.add_argument(
        "--mfu",
        type=float,
        default=0.25,
        help="assumed model FLOPs utilisation of the image towers for the estimated A100/H100 rows",
    )
    s.add_argument("--batch-size", type=int, default=128, help="images per model step (memory per actor)")
    s.add_argument("--text-tokens", type=float, default=20.0, help="mean tokens per caption through the text towers")
    s.add_argument("--caption-tokens", type=float, default=16.0, help="mean decoding steps per synthetic caption")
    s.add_argument(
        "--draws-per-caption",
        type=float,
        default=1.1,
        help="sampled draws per kept caption (degenerate draws are resampled; at most max_attempts)",
    )
    s.add_argument("--costs", action="append", help="costs JSON from make bench (default: bench/costs-*.json)")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.set_defaults(fn=cmd_plan)
    return p


ENVIRONMENT_ERRNOS = {
    28: "the disk is full: free space or choose another output.path",
    30: "the file system is read-only: choose a writable output.path",
    13: "permission denied: fix the permissions or credentials",
    1: "operation not permitted: fix the permissions or credentials",
    2: "a file or folder vanished: check that the dataset / corpus path still exists",
    122: "disk quota exceeded: free space or choose another output.path",
}


def _log_traceback(argv: list[str] | None) -> str:
    """Write the current exception's traceback to a log file; returns its path."""
    import os
    import time
    import traceback

    d = Path(os.environ.get("DR_LOG_DIR") or Path.home() / ".cache" / "dr_pipeline" / "logs")
    try:
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"dr-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(f"dr {' '.join(argv if argv is not None else sys.argv[1:])}\n\n{traceback.format_exc()}")
        return str(path)
    except OSError:
        return "(no log: the log folder is not writable either)"


def _one_line(e: BaseException) -> str:
    from dr_pipeline.storage.retry import describe

    return " ".join(describe(e).split())[:500]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was committed is kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into one line
        from dr_pipeline.storage.retry import PermanentError, RetriesExhausted

        log = _log_traceback(argv)
        errno = next((x.errno for x in _chain(e) if isinstance(x, OSError) and x.errno in ENVIRONMENT_ERRNOS), None)
        if (
            errno is not None
            or isinstance(e, (PermanentError, RetriesExhausted, OSError))
            or type(e).__name__ in ("UnpicklingError", "UnsafeMemberError")
        ):
            fix = ENVIRONMENT_ERRNOS.get(errno, "fix the cause named above") if errno else "fix the cause named above"
            print(f"error: {_one_line(e)}; {fix}; rerun the same command to resume (traceback: {log})", file=sys.stderr)
            return 3
        print(
            f"error: unexpected {_one_line(e)} (a bug: please report it with the traceback in {log})", file=sys.stderr
        )
        return 4


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


if __name__ == "__main__":
    sys.exit(main())
