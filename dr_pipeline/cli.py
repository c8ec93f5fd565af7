"""The ``dr`` command. Each sub-command is a thin wrapper over one module.

Config and usage errors print one line (``error: ...``) and exit 2 before any model is
loaded or any shard written; a job with failed shards exits 1 after a summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from dr_pipeline.config import ConfigError


def cmd_make_corpus(a: argparse.Namespace) -> int:
    from dr_pipeline.corpus.synthetic import make_corpus

    urls = make_corpus(a.out, n_shards=a.shards, per_shard=a.per_shard, seed=a.seed,
                       formats=tuple(a.formats.split(",")))
    print(f"wrote {len(urls)} shard file(s) under {a.out}")
    return 0


def cmd_make_teachers(a: argparse.Namespace) -> int:
    from dr_pipeline.models.tiny import make_tiny_checkpoints

    written = make_tiny_checkpoints(a.ensemble, force=a.force)
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
        job = dataclasses.replace(job, output=dataclasses.replace(job.output, path=a.output))
    return job


def cmd_reinforce(a: argparse.Namespace) -> int:
    from dr_pipeline.execute.runner import resolve_ensemble, run_job

    job = _job(a)
    report = run_job(job, resolve_ensemble(job), force=a.force, executor="local" if a.local else "ray")
    if report.failed:
        print(f"{len(report.failed)} shard(s) failed:", file=sys.stderr)
        for f in report.failed:
            kind = ", permanent: not retried" if f.get("permanent") else ""
            print(f"  {f['shard']}: {f['error']} ({f['attempts']} attempt(s){kind})", file=sys.stderr)
    if report.error:
        print(f"error: {report.error}", file=sys.stderr)
    if not report.ok:
        print("rerun the same command to retry what is missing (committed shards are kept)", file=sys.stderr)
        return 1
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    from dr_pipeline.validate import validate_dataset

    rep = validate_dataset(a.dataset, check_base_keys=not a.no_base)
    print(rep.render())
    return 0 if rep.ok else 1


def cmd_inspect(a: argparse.Namespace) -> int:
    from dr_pipeline.inspect_dataset import contact_sheet, render_summary, summarize

    print(render_summary(summarize(a.dataset)))
    out = a.out or str(Path(a.dataset) / "contact_sheet.png")
    contact_sheet(a.dataset, out, n_images=a.images)
    print(f"{'contact sheet':>20}: {out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from dr_pipeline.shards.datacompdr import export_datacompdr

    paths = export_datacompdr(a.dataset, a.out)
    print(f"wrote {len(paths)} DataCompDR tar(s) under {a.out}")
    return 0


def cmd_add_teacher(a: argparse.Namespace) -> int:
    from dr_pipeline.execute.add_teacher import add_teachers

    rep = add_teachers(a.dataset, a.teachers, a.teacher, device=a.device)
    print(f"added {','.join(a.teacher)} to {len(rep.committed)} shard(s) ({len(rep.skipped)} already had it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dr", description="Dataset reinforcement for CLIP training (MobileCLIP-style).")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("make-corpus", help="write the deterministic synthetic image-text corpus (tar + Parquet)")
    s.add_argument("out")
    s.add_argument("--shards", type=int, default=4)
    s.add_argument("--per-shard", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--formats", default="tar,parquet", help="comma list of tar, parquet")
    s.set_defaults(fn=cmd_make_corpus)

    s = sub.add_parser("make-teachers", help="create the local checkpoints of an ensemble's tiny models")
    s.add_argument("ensemble", help="teachers/*.yaml")
    s.add_argument("--force", action="store_true")
    s.set_defaults(fn=cmd_make_teachers)

    s = sub.add_parser("reinforce", help="run a reinforcement job (Ray)")
    s.add_argument("--config", required=True, help="jobs/configs/<job>.yaml")
    s.add_argument("--address", help="Ray cluster address: 'auto', host:port or ray://host:port "
                                     "(default: the job's, else $RAY_ADDRESS, else a new local Ray)")
    s.add_argument("--output", help="override output.path")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--force", action="store_true",
                   help="redo a dataset made by a different config (its shards are uncommitted, then rewritten); "
                        "without it a changed config is refused: use --output for a new location")
    s.add_argument("--local", action="store_true", help="run in this process without Ray (debugging)")
    s.set_defaults(fn=cmd_reinforce)

    s = sub.add_parser("validate", help="check every committed shard against the contract")
    s.add_argument("dataset")
    s.add_argument("--no-base", action="store_true", help="skip the check against the base corpus keys")
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("inspect", help="print a summary and write a contact-sheet PNG")
    s.add_argument("dataset")
    s.add_argument("--out", help="PNG path (default DATASET/contact_sheet.png)")
    s.add_argument("--images", type=int, default=4)
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("export", help="export to another layout")
    s.add_argument("dataset")
    s.add_argument("--format", choices=["datacompdr"], default="datacompdr")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("add-teacher", help="add teacher(s) to an existing dataset (only their embeddings are computed)")
    s.add_argument("dataset")
    s.add_argument("--teachers", required=True, help="ensemble file that defines the new teacher(s)")
    s.add_argument("--teacher", required=True, action="append", help="teacher id (repeatable)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.set_defaults(fn=cmd_add_teacher)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
