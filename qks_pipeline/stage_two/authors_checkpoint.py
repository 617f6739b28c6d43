"""Import the authors' published QKS checkpoints: the Q-Former head for `QKS`, CLIP for open_clip.

The checkpoint's layout, and what the exported CLIP weights hold: docs/design.md, section 1. It may
carry a `module.` prefix (DDP) and be wrapped in a top-level `state_dict` or `model` entry.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from qks_pipeline.config import ModelConfig
from qks_pipeline.errors import QKSError
from qks_pipeline.stage_two.checkpoint import (
    BEST,
    CLIP_WEIGHTS,
    CONFIG,
    make_config,
    save_weights,
    write_config,
)
from qks_pipeline.stage_two.model import QKS
from qks_pipeline.weights_files import load_safetensors, load_torch

# Reference (BERT) names inside encoder.layer.{i} -> our names inside layers.{i}.
_LAYER_NAMES = {
    "attention.self.query": "self_attn.query",
    "attention.self.key": "self_attn.key",
    "attention.self.value": "self_attn.value",
    "attention.output.dense": "self_attn.dense",
    "attention.output.LayerNorm": "self_attn.norm",
    "crossattention.self.query": "cross_attn.query",
    "crossattention.self.key": "cross_attn.key",
    "crossattention.self.value": "cross_attn.value",
    "crossattention.output.dense": "cross_attn.dense",
    "crossattention.output.LayerNorm": "cross_attn.norm",
    "intermediate_query.dense": "ffn.fc1",
    "output_query.dense": "ffn.fc2",
    "output_query.LayerNorm": "ffn.norm",
}
_UNUSED_LAYER = ("intermediate.dense", "output.dense", "output.LayerNorm")  # the text feed-forward
_UNUSED_EMBEDDINGS = ("word_embeddings", "position_embeddings", "position_ids")
_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
# found in OpenAI's JIT archives only
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The flat state dict of a `.safetensors` or `torch.save` file.

    Unwrapped from `state_dict`/`model`, without a `module.` prefix. `trust_pickle` unpickles
    arbitrary objects (only for a trusted file); otherwise only tensors and plain containers are
    read.
    """
    path = Path(path)
    if not path.is_file():
        raise QKSError("checkpoint not found", path)
    if path.suffix == ".safetensors":
        obj: Any = load_safetensors(path, "checkpoint")
    else:
        # the flag applies to a pickle of other objects only, never to a damaged file
        hint = "" if trust_pickle else "pass --trust-pickle if you trust its source"
        obj = load_torch(path, "checkpoint", trust_pickle=trust_pickle, hint=hint)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise QKSError("not a state dict (expected a mapping of names to tensors)", path)
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _qformer_key(key: str) -> str | None:
    """Our name for a reference `net.*` key (prefix removed); None for weights the queries skip."""
    key = key.removeprefix("bert.")
    # BERT's pooler, if saved, reads a text CLS token the queries never produce
    if key.startswith("pooler."):
        return None
    if key.startswith("embeddings.LayerNorm."):
        return "embed_norm." + key.removeprefix("embeddings.LayerNorm.")
    if key.startswith("embeddings."):
        return None if key.split(".")[1] in _UNUSED_EMBEDDINGS else key
    m = _LAYER_KEY.fullmatch(key)
    if m is None:
        return key
    index, block, param = m.groups()
    if block in _UNUSED_LAYER:
        return None
    return f"layers.{index}.{_LAYER_NAMES[block]}.{param}" if block in _LAYER_NAMES else key


def _split(
    state: dict[str, Tensor], path: str | Path
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """Split a reference state dict: the Q-Former (our names), CLIP (open_clip's), foreign keys."""
    qks = {}
    clip = {}
    unknown = []  # Q-Former keys our model has no place for
    foreign = []  # keys outside the layout
    for key, value in state.items():
        if key in ("query_tokens", "proj"):
            qks[key] = value
        elif key.startswith("clip_model."):
            clip[key.removeprefix("clip_model.")] = value
        elif key.startswith("net."):
            ours = _qformer_key(key.removeprefix("net."))
            if ours is not None and ours.startswith(("embed_norm.", "layers.")):
                qks[ours] = value
            elif ours is not None:
                unknown.append(key)
        else:
            foreign.append(key)
    if unknown:
        raise QKSError(
            f"Q-Former weights this model has no place for: {', '.join(unknown[:8])}", path
        )
    return qks, clip, foreign


def _infer_fields(qks: dict[str, Tensor], path: str | Path) -> dict[str, int]:
    """num_queries, num_layers and ff_dim from the tensor shapes, checked.

    Not the number of heads: the shapes do not tell. Every parameter of the `QKS` these fields build
    must be present with its shape.
    """
    for key in ("query_tokens", "proj", "layers.0.ffn.fc1.weight"):
        if key not in qks:
            names = "query_tokens, proj, net.encoder.*"
            raise QKSError(f"not a QKS checkpoint: no {key} (reference names: {names})", path)
    _, num_queries, dim = qks["query_tokens"].shape
    if qks["proj"].shape[0] != dim:
        raise QKSError(f"proj is {tuple(qks['proj'].shape)} but the queries are {dim} wide", path)
    num_layers = 1 + max(int(k.split(".")[1]) for k in qks if k.startswith("layers."))
    fields = {
        "num_queries": num_queries,
        "num_layers": num_layers,
        "ff_dim": qks["layers.0.ffn.fc1.weight"].shape[0],
    }
    with torch.device("meta"):  # shapes only, no memory and no initialisation cost
        cfg = ModelConfig(num_heads=1, **fields)
        expected = QKS(cfg, *qks["proj"].shape).state_dict()
    missing = sorted(set(expected) - set(qks))
    shapes = {k: (tuple(qks[k].shape), tuple(v.shape)) for k, v in expected.items() if k in qks}
    wrong = [f"{k} {got} != {want}" for k, (got, want) in shapes.items() if got != want]
    if missing or wrong:
        raise QKSError(
            f"incomplete or inconsistent Q-Former: missing {missing[:6]}, wrong shapes {wrong[:6]}",
            path,
        )
    return fields


def load_reference_checkpoint(
    path: str | Path, trust_pickle: bool = False
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, int]]:
    """An authors' checkpoint as state dicts for `QKS` and open_clip.

    Returns:
        The state dict for `QKS` (strict; `token_dim, embed_dim = state["proj"].shape`), the CLIP
        state dict in open_clip layout (empty without `clip_model.*`; `visual.proj` is the trained
        `proj`: docs/design.md, section 1), and the `ModelConfig` fields the shapes tell
        (`_infer_fields`).
    """
    qks, clip, foreign = _split(read_checkpoint(path, trust_pickle), path)
    fields = _infer_fields(qks, path)
    if foreign:
        listed = ", ".join(foreign[:8])
        warnings.warn(
            f"{path}: ignoring {len(foreign)} key(s) outside the QKS layout: {listed}", stacklevel=2
        )
    if clip:
        clip = {k: v for k, v in clip.items() if k not in _OPENAI_EXTRAS}
        clip.setdefault("visual.proj", qks["proj"].detach().clone())
    return qks, clip, fields


def removed_cls(run_args: str | Path) -> bool:
    """Whether the authors' run trained with `--rmcls` (its queries never saw the CLS token).

    `run_args` holds the run's saved arguments: its command-line options by name, in JSON or YAML.
    """
    try:
        args = yaml.safe_load(Path(run_args).read_text())  # JSON is YAML too
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise QKSError(f"cannot read the run's arguments: {e}".splitlines()[0], run_args) from None
    if not isinstance(args, dict):
        raise QKSError("the run's arguments must be a mapping of option names to values", run_args)
    return bool(args.get("rmcls", False))


def export_clip_weights(clip_state: dict[str, Tensor], out_path: str | Path) -> None:
    """Write CLIP weights (with `visual.proj`) that open_clip loads strictly.

    `.safetensors` when the file name says so, else `torch.save`. Load them as `REFERENCE_MODEL`
    (docs/design.md, section 1: QuickGELU).
    """
    # safetensors refuses shared storage
    state = {k: v.detach().contiguous().clone() for k, v in clip_state.items()}
    if Path(out_path).suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, out_path)
    else:
        torch.save(state, out_path)


# QuickGELU, which a weights file cannot record (docs/design.md, section 1)
REFERENCE_MODEL = "ViT-B-16-quickgelu"


def import_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    model: str = REFERENCE_MODEL,
    num_heads: int = 12,
    keep_cls: bool = True,
    trust_pickle: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """An authors' checkpoint as a checkpoint directory (`qks_pipeline.stage_two.checkpoint`).

    The directory holds its CLIP weights too; its fingerprint matches only caches extracted with
    them (`--model {model} --pretrained out/clip_weights.pt`). `keep_cls` is False for runs trained
    with the authors' `--rmcls`: nothing in the weights tells.
    """
    # stage one's CLIP loader, to fingerprint the exported weights
    from qks_pipeline.stage_one.backbone import load_backbone, token_shape

    out = Path(out)
    qks_state, clip_state, fields = load_reference_checkpoint(path, trust_pickle)
    if not clip_state:
        raise QKSError(
            "the checkpoint has no clip_model.* weights, so its backbone cannot be identified", path
        )
    token_dim, embed_dim = qks_state["proj"].shape
    try:
        cfg = ModelConfig(num_heads=num_heads, keep_cls=keep_cls, **fields)
        head = QKS(cfg, token_dim, embed_dim)
    except QKSError as e:
        raise QKSError(f"{e.message} (--num-heads)", path) from None
    head.load_state_dict(qks_state, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    export_clip_weights(clip_state, out / CLIP_WEIGHTS)
    backbone = load_backbone(model, str(out / CLIP_WEIGHTS))
    save_weights(head, out / BEST)
    note = "reference checkpoint: its authors selected it on the test set"
    described = (token_shape(backbone.model)[0], backbone.fingerprint, backbone.source)
    config = make_config(head, *described, selection="test", selection_note=note, source=str(path))
    write_config(out, config)
    shape = f"{fields['num_queries']} queries, {fields['num_layers']} layers, {num_heads} heads"
    echo(
        f"{out}: Q-Former ({shape}, {token_dim}->{embed_dim}) -> {BEST}; "
        f"CLIP -> {CLIP_WEIGHTS}; {CONFIG}"
    )
    echo(
        f"extract caches with: --model {model} --pretrained {out / CLIP_WEIGHTS}  "
        "(other caches are refused as stale)"
    )
    return config
