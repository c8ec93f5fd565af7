"""The student trainer: reinforced data in, MCi CLIP students out.

Modules (import what you need; nothing heavy is imported here):

- ``config``     TrainConfig and its parts (``jobs/configs/train-*.yaml``)
- ``sources``    pair base and reinforcement shards; read one shard's per-epoch choices
- ``data``       the joined loader (replay, sharding over ranks x workers, counted skips, resume state)
- ``loss``       DistillClipLoss: (1-λ)·CLIP + λ·multi-teacher KL, GT and synthetic captions, multi-rank
- ``students``   MCi0-4 (timm FastViT-MCi) + open_clip text tower; ``tiny`` for tests; reparameterize
- ``loop``       ``dr train`` (``train_main``), DDP via torchrun / Ray Train, checkpoints, exact resume
- ``evaluate``   ``dr eval`` (``eval_main``): zero-shot classification, retrieval R@1/R@5
- ``checkpoint``, ``metrics``, ``distributed``: plumbing
- ``fake_reinforce``  a model-free reinforced dataset (same layout) for tests and debugging
"""
