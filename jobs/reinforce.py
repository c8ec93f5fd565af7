"""Ray job entrypoint for a reinforcement job: the same code and flags as ``dr reinforce``.

    ray job submit --working-dir . -- python jobs/reinforce.py --config jobs/configs/datacompdr-12m.yaml
    ray job submit --working-dir . -- python jobs/reinforce.py --config jobs/configs/dfndr-2b.yaml --force
    ray job submit --working-dir . -- python jobs/reinforce.py --config "$PWD/jobs/configs/demo.yaml"

Paths in the config resolve against the config file's folder (``pkg:teachers/...`` names a
shipped ensemble), so the cluster configs (s3:// data) work from the uploaded working dir and
on a KubeRay head alike; a config with local data must be given by absolute path on a disk the
head sees (the demo line), since Ray's uploaded copy holds no git-ignored data (docs/cluster.md).

Under ``ray job submit`` the entrypoint runs on the head node with ``RAY_ADDRESS`` set, and
this script connects to that cluster (``--address auto`` unless you pass one); the model
actors are placed on the GPU workers. Resubmitting the same command resumes: committed
shards are skipped. Exit codes as ``dr reinforce``: 0 all shards committed, 1 some failed
(listed; resubmit to retry them), 2 a config error (nothing was written).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/reinforce.py` puts jobs/ on sys.path, not the repo
    sys.path.insert(0, str(ROOT))

from dr_pipeline.cli import build_parser, main
from dr_pipeline.config import ConfigError, load_job


def entry(argv: list[str]) -> int:
    """``dr reinforce`` with one difference: no address anywhere means the running cluster
    (``auto``: $RAY_ADDRESS, else the cluster started on this machine), never a new local Ray."""
    a = build_parser().parse_args(["reinforce", *argv])
    if a.address is None and not a.local:
        try:
            configured = load_job(a.config).execution.address
        except ConfigError:
            configured = None  # main() reports the error
        if configured is None:
            argv = [*argv, "--address", "auto"]
    return main(["reinforce", *argv])


if __name__ == "__main__":
    sys.exit(entry(sys.argv[1:]))
