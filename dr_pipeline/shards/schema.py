"""The reinforced-shard contract, built from ``schemas/reinforced-v1.json``.

The JSON file is the source of truth (language neutral); this module turns it into an
Arrow schema for a concrete ensemble (teacher ids and dims, captioner ids, n_aug) and
names the per-teacher columns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 1
METADATA_KEY = b"dr_pipeline"


def schema_path(name: str) -> Path:
    """A file of ``schemas/`` (the one source of truth: the checkout's folder, or the copy a wheel
    installs with the shipped data, ``config.data_root()``)."""
    from dr_pipeline.config import data_root

    return data_root() / "schemas" / name


@cache
def contract(version: int = SCHEMA_VERSION) -> dict:
    return json.loads(schema_path(f"reinforced-v{version}.json").read_text())


@cache
def json_schema(name: str, version: int = SCHEMA_VERSION) -> dict:
    """The JSON Schema of a marker (``shard-stats``) or a manifest (``manifest``)."""
    return json.loads(schema_path(f"{name}-v{version}.schema.json").read_text())


_SIMPLE = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint16": pa.uint16(),
    "float32": pa.float32(),
    "binary": pa.binary(),
}


def parse_type(text: str) -> pa.DataType:
    """Parse the small type language of the schema file ("list<fixed_size_list<uint16, 512>>")."""
    text = text.strip()
    if text in _SIMPLE:
        return _SIMPLE[text]
    m = re.fullmatch(r"fixed_size_list<(.+),\s*(\d+)>", text)
    if m:
        return pa.list_(parse_type(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"list<(.+)>", text)
    if m:
        return pa.list_(parse_type(m.group(1)))
    raise ValueError(f"unknown type in schema file: {text!r}")


@dataclass(frozen=True)
class TeacherLayout:
    id: str
    dim: int


@dataclass(frozen=True)
class ShardLayout:
    """What a concrete dataset's shards hold: n_aug, teachers (with dims), captioners."""

    n_aug: int
    teachers: tuple[TeacherLayout, ...]
    captioners: tuple[str, ...]

    def fields(self) -> dict[str, str]:
        return {**self.base_fields(), **{n: t for tl in self.teachers for n, t in self.teacher_fields(tl).items()}}

    def base_fields(self) -> dict[str, str]:
        c = contract()
        out = {col["name"]: col["type"].format(aug_width=self.n_aug * 8) for col in c["columns"]}
        for cap in self.captioners:
            for col in c["per_captioner_columns"]:
                out[col["name"].format(captioner=cap)] = col["type"]
        return out

    def teacher_fields(self, tl: TeacherLayout) -> dict[str, str]:
        c = contract()
        fmt = dict(teacher=tl.id, dim=tl.dim, n_aug=self.n_aug, n_aug_x_dim=self.n_aug * tl.dim)
        out = {col["name"].format(**fmt): col["type"].format(**fmt) for col in c["per_teacher_columns"]}
        for cap in self.captioners:
            for col in c["per_teacher_captioner_columns"]:
                out[col["name"].format(captioner=cap, **fmt)] = col["type"].format(**fmt)
        return out

    def arrow_schema(self, metadata: dict | None = None) -> pa.Schema:
        nullable = {col["name"]: col["nullable"] for col in contract()["columns"]}
        schema = pa.schema(
            [pa.field(n, parse_type(t), nullable=nullable.get(n, False)) for n, t in self.fields().items()]
        )
        if metadata is not None:
            schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
        return schema

    def with_teacher(self, tl: TeacherLayout) -> ShardLayout:
        return ShardLayout(self.n_aug, self.teachers + (tl,), self.captioners)


def image_col(teacher: str, n_aug: int, dim: int) -> str:
    return f"emb__{teacher}__image__bf16_{n_aug}x{dim}"


def text_col(teacher: str, dim: int) -> str:
    return f"emb__{teacher}__text__bf16_{dim}"


def syn_emb_col(teacher: str, captioner: str, dim: int) -> str:
    return f"emb__{teacher}__syn__{captioner}__bf16_{dim}"


def syn_col(captioner: str) -> str:
    return f"syn__{captioner}"


def layout_from_metadata(meta: dict) -> ShardLayout:
    return ShardLayout(
        n_aug=int(meta["aug"]["n_aug"]),
        teachers=tuple(TeacherLayout(t["id"], int(t["dim"])) for t in meta["teachers"]),
        captioners=tuple(c["id"] for c in meta["captioners"]),
    )


def read_metadata(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not a dr_pipeline shard: file metadata has no 'dr_pipeline' entry")
    meta = json.loads(raw)
    check_version(meta.get("schema_version", SCHEMA_VERSION), "shard")
    return meta


class NewerSchemaError(ValueError):
    """Data written by a newer schema version than this reader knows (schemas/README.md)."""


def check_version(version: object, what: str) -> None:
    """Refuse data of a newer major schema version: its columns or fields may mean other things."""
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise NewerSchemaError(
            f"{what} has schema_version {version!r}; this dr_pipeline reads up to "
            f"{SCHEMA_VERSION}: upgrade dr_pipeline to read it"
        )
