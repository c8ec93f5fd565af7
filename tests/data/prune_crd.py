"""Make tests/data/kuberay-rayjob-crd-v1.schema.json from KubeRay's CRD (the whole file is 1.4 MB).

    python tests/data/prune_crd.py ray.io_rayjobs.yaml jobs/kuberay-rayjob.yaml > tests/data/kuberay-rayjob-crd-v1.schema.json

Source: ray-project/kuberay v1.7.0, ray-operator/config/crd/bases/ray.io_rayjobs.yaml, version v1,
``openAPIV3Schema``. Kept as it is along every path the RayJob document uses (types, formats,
patterns, enums, required, defaults); elsewhere each object keeps all its property *names* with
empty schemas, so the names stay known. Every object with properties and no additionalProperties
gets ``additionalProperties: false``: what ``kubectl apply`` (field validation Strict, the default
since Kubernetes 1.25) does with an unknown field. ``x-kubernetes-*`` markers become JSON-Schema
equivalents where they matter (int-or-string).
"""
from __future__ import annotations

import json
import sys

import yaml


def prune(schema: dict, doc) -> dict:
    out = {k: v for k, v in schema.items() if k not in ("properties", "items", "additionalProperties")
           and not k.startswith("x-kubernetes")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = schema.get("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in schema:
        used = doc if isinstance(doc, dict) else {}
        out["properties"] = {k: prune(v, used[k]) if k in used else {} for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        vals = list(doc.values()) if isinstance(doc, dict) else []
        out["additionalProperties"] = prune(schema["additionalProperties"], vals[0] if vals else None) if vals else \
            {k: v for k, v in schema["additionalProperties"].items() if not k.startswith("x-kubernetes")}
    if "items" in schema:
        items = doc if isinstance(doc, list) else []
        merged: dict = {}
        for it in items:                       # the union of every item's keys
            if isinstance(it, dict):
                for k, v in it.items():
                    merged.setdefault(k, v)
        out["items"] = prune(schema["items"], merged if merged else (items[0] if items else None))
    return out


def main(crd_path: str, doc_path: str) -> None:
    crd = yaml.safe_load(open(crd_path))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    doc = next(d for d in yaml.safe_load_all(open(doc_path)) if d and d.get("kind") == "RayJob")
    out = prune(schema, doc)
    out["$comment"] = ("KubeRay v1.7.0 ray.io_rayjobs CRD, v1 openAPIV3Schema, pruned by tests/data/prune_crd.py")
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
