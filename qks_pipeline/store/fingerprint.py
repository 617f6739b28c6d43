"""A store's identity: the backbone and data it was built from (docs/design.md, section 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qks_pipeline.errors import QKSError

# 3: every chunk of every array written, each with its crc32c; 2: a crc32c per inner token chunk
# only; 1: none (2 and 1 still read: docs/design.md, section 2)
FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)


def make_fingerprint(
    backbone: dict[str, Any], data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A store's identity (docs/design.md, section 2), through JSON to equal the stored copy."""
    fingerprint = {"format_version": FORMAT_VERSION, "backbone": backbone, "data": data or {}}
    return json.loads(json.dumps(fingerprint))


def differing_keys(
    a: dict[str, Any], b: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in `a`, value in `b`) for every leaf where two nested dicts differ."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        x = a.get(key)
        y = b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            diffs += differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            diffs.append((prefix + key, x, y))
    return diffs


def check_fingerprint(
    path: str | Path,
    found: dict[str, Any],
    expected: dict[str, Any],
    what: str = "cache",
    hint: str = "",
) -> None:
    """Refuse a store built otherwise than asked for, naming every difference (and `hint`)."""
    diffs = [
        f"{key} is {a!r} in the store, {b!r} expected"
        for key, a, b in differing_keys(found, expected)
    ]
    if not diffs:
        return
    message = f"{what} was built differently: " + "; ".join(diffs)
    if hint:
        message += f" ({hint})"
    raise QKSError(message, path)


def describe_backbone(fp: dict[str, Any]) -> str:
    """A short human name of a backbone fingerprint: model, config hash, weights source and hash."""
    model = fp.get("model")
    if fp.get("model_config_sha256"):
        model = f"{model} (config sha256 {fp['model_config_sha256'][:12]})"
    weights = fp.get("pretrained") or "random"
    weights_sha256 = str(fp.get("weights_sha256"))[:12]
    return f"{model}, weights {weights} sha256 {weights_sha256}"
