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
    from dr_pipeline.corpus.synthetic import ZEROSHOT_DIR, make_corpus, make_split, zeroshot_classes

    formats = tuple(a.formats.split(","))
    if a.split is None:
        urls = make_corpus(a.out, n_shards=a.shards, per_shard=a.per_shard, seed=a.seed, formats=formats)
    else:
        urls = make_split(a.split, a.out, n_shards=a.shards, per_shard=a.per_shard, seed=a.seed,
                          formats=formats, per_class=a.per_class)
    print(f"wrote {len(urls)} shard file(s) under {a.out}")
    if a.split == "test" and a.per_class > 0:
        print(f"wrote the zero-shot set ({a.per_class} images x {len(zeroshot_classes())} classes) under {a.out}/{ZEROSHOT_DIR}/")
    return 0


def cmd_bootstrap(a: argparse.Namespace) -> int:
    import dataclasses as dc

    from dr_pipeline.bootstrap import BootstrapConfig, bootstrap, format_report, verify

    if a.verify:
        problems = verify(a.ensemble)
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        if problems:
            print(f"the committed checkpoints of {a.ensemble} are missing or changed: restore them "
                  f"(git checkout) or regenerate them with `dr bootstrap {a.ensemble}`", file=sys.stderr)
            return 1
        print(f"{a.ensemble}: every checkpoint matches its SHA256SUMS entry")
        return 0
    overrides = {k: v for k, v in (("seed", a.seed), ("n_train", a.n_train), ("clip_steps", a.clip_steps),
                                   ("coca_steps", a.coca_steps), ("batch_size", a.batch_size), ("jobs", a.jobs))
                 if v is not None}
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
        cfg = dc.replace(cfg, train=dc.replace(cfg.train, seeds=seeds,
                                               ablation_seeds=tuple(s for s in cfg.train.ablation_seeds if s in seeds) or seeds[:1]))
    if a.ablation_seeds:
        cfg = dc.replace(cfg, train=dc.replace(cfg.train, ablation_seeds=tuple(int(s) for s in a.ablation_seeds.split(","))))
    if a.results_dir:
        cfg = dc.replace(cfg, results_dir=a.results_dir)
    res = reproduce(cfg, only=a.only)
    return 0 if res["analysis"]["headline"]["ratio_mean"] is not None else 1


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


def cmd_train(a: argparse.Namespace) -> int:
    from dr_pipeline.train.loop import train_main

    return train_main(a.config, a.resume)


def cmd_eval(a: argparse.Namespace) -> int:
    from dr_pipeline.train.evaluate import eval_main

    return eval_main(a.checkpoint, a.data, a.out)


def cmd_plan(a: argparse.Namespace) -> int:
    import json

    from dr_pipeline.plan import load_costs, make_plan, render, spec_from_args

    if not (a.ensemble or a.teacher or a.captioner):
        raise ConfigError("plan: give --ensemble FILE or --teacher MODEL[:DIM] / --captioner MODEL")
    try:
        spec = spec_from_args(a.samples, a.teacher or [], a.captioner or [], a.ensemble, a.n_aug, a.k, a.per_shard)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    plan = make_plan(spec, load_costs(a.costs))
    print(json.dumps(plan.to_dict(), indent=2) if a.json else render(plan))
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
    s.add_argument("--split", choices=["clean", "web", "test"],
                   help="a split of the learning-efficiency experiment: clean (accurate captions, teacher "
                        "training), web (alt-text-like noisy captions), test (+ zero-shot folder); "
                        "default: the demo corpus")
    s.add_argument("--per-class", type=int, default=8, help="--split test: zero-shot images per colour x shape class")
    s.set_defaults(fn=cmd_make_corpus)

    s = sub.add_parser("bootstrap", help="train the synthetic domain's real tiny teachers + captioner on the clean split")
    s.add_argument("ensemble", nargs="?", default="teachers/synthetic.yaml")
    s.add_argument("--seed", type=int)
    s.add_argument("--n-train", type=int, help="clean-split images (default 12000)")
    s.add_argument("--clip-steps", type=int, help="steps per CLIP teacher")
    s.add_argument("--coca-steps", type=int, help="captioner steps")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--jobs", type=int, help="models trained in parallel processes (1 thread each)")
    s.add_argument("--only", action="append", help="train only this entry id (repeatable)")
    s.add_argument("--out", help="write checkpoints + a relocated ensemble file here instead")
    s.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    s.add_argument("--verify", action="store_true", help="only check the checkpoints against SHA256SUMS")
    s.set_defaults(fn=cmd_bootstrap)

    s = sub.add_parser("reproduce", help="reinforced vs plain student: steps-to-accuracy ratio, plot, results")
    s.add_argument("--config", default="jobs/configs/reproduce.yaml")
    s.add_argument("--seeds", help="comma list overriding train.seeds")
    s.add_argument("--ablation-seeds", help="comma list overriding train.ablation_seeds")
    s.add_argument("--results-dir", help="write results.json/md and the plot here instead of results_dir")
    s.add_argument("--only", action="append", help="run only this variant (repeatable)")
    s.set_defaults(fn=cmd_reproduce)

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

    s = sub.add_parser("train", help="train an MCi student on reinforced shards")
    s.add_argument("--config", required=True, help="jobs/configs/train-<name>.yaml")
    s.add_argument("--resume", help="'latest' or a checkpoint path")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="zero-shot classification and retrieval of a student checkpoint")
    s.add_argument("--checkpoint", required=True, help="checkpoint .pt or run directory (latest)")
    s.add_argument("--data", required=True, help="base shards (retrieval + zero-shot) or an image folder DATA/<class>/*")
    s.add_argument("--out", help="write the metrics JSON here")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("plan", help="estimate output bytes, shards and accelerator-hours of a run (no models loaded)")
    s.add_argument("--samples", required=True, help="corpus size, e.g. 2e9, 1.9B, 12.8M")
    s.add_argument("--ensemble", help="teachers/*.yaml: its teachers and captioners")
    s.add_argument("--teacher", action="append", help="open_clip model or MODEL:DIM (repeatable)")
    s.add_argument("--captioner", action="append", help="open_clip CoCa model (repeatable)")
    s.add_argument("--n-aug", type=int, default=2, help="augmentations per image (default 2, DFNDR-2B)")
    s.add_argument("--k", type=int, default=5, help="synthetic captions per captioner (default 5)")
    s.add_argument("--per-shard", type=int, default=10_000, help="samples per shard (default 10,000)")
    s.add_argument("--costs", action="append", help="costs JSON from make bench (default: bench/costs-*.json)")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.set_defaults(fn=cmd_plan)
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
