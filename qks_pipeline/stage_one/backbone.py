"""The frozen CLIP backbone (open_clip) of stage one and predict (docs/design.md, sections 1-2).

Loading, fingerprint, visual tokens (`ln_post`'s output over all tokens, CLS first, before the
visual projection) and label embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import threading
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import open_clip
import torch
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.utils import logging as hub_logging
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transformer import VisionTransformer
from open_clip.utils import to_2tuple
from tqdm import tqdm

from qks_pipeline.errors import QKSError, shorten
from qks_pipeline.weights_files import first_line, format_problem, unreadable

log = logging.getLogger(__name__)
# the hub has its own stderr handler: a root handler (the CLI's) printed lines twice
hub_logging.disable_propagation()

TOKEN_LAYOUT = "ln_post(all tokens), CLS first, before visual.proj"
# `pretrained` values that mean: seeded random weights (tests, benchmarks)
NO_WEIGHTS = ("none", "random")
# one reachability check of the download server before open_clip's (retrying) download
HUB_TIMEOUT_S = 5
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


@dataclass(frozen=True)
class Backbone:
    """A loaded frozen CLIP model and the facts about it, each resolved once by `load_backbone`."""

    model: torch.nn.Module  # fp32, eval mode, no gradients
    # PIL RGB image -> (3, H, W): open_clip's inference transform (center crop)
    preprocess: Callable
    tokenizer: Callable
    # what determines the features: hashes, preprocessing, token layout (JSON-normalised)
    fingerprint: dict[str, Any]
    # where it came from: model name or config path, weights tag or path ("none": random)
    source: dict[str, str]


@dataclass(frozen=True)
class Weights:
    """Where a backbone's weights come from, resolved from a `pretrained` tag or path."""

    path: str | None  # local weights file (None: seeded random weights)
    source: str  # how to load them again: the tag given, the file's absolute path, or "none"
    tag: str | None  # open_clip pretrained tag, when known
    sha256: str | None  # of the weights file
    quick_gelu: bool = False  # the weights were trained with QuickGELU (OpenAI's)
    # mean/std/interpolation/resize_mode of the tag
    preprocess: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def resolve_model_name(model: str) -> tuple[str, str | None]:
    """Model name, and the sha256 of its config when `model` is an open_clip config JSON.

    A config file is registered with open_clip under its stem.
    """
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise QKSError("open_clip model config file not found", path)
        open_clip.add_model_config(path)
        if path.stem not in open_clip.list_models():
            raise QKSError(
                "not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)", path
            )
        return path.stem, file_sha256(path)
    if model not in open_clip.list_models():
        raise QKSError(
            f"unknown open_clip model {model!r} "
            "(a name from open_clip.list_models() or a config .json)"
        )
    return model, None


def _tag_of_file(name: str, sha256: str) -> tuple[str | None, dict[str, Any]]:
    """The open_clip tag (and its config) whose download URL names this file's hash, if any.

    OpenAI's and LAION's URLs do.
    """
    for tag in open_clip.list_pretrained_tags_by_model(name):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        url = cfg.get("url", "")
        if url and (sha256 in url or f"-{sha256[:8]}." in url):
            return tag, cfg
    return None, {}


def _unreachable(url: str) -> str | None:
    """Why the server at `url` does not answer one request within `HUB_TIMEOUT_S`; None if it does.

    The time includes the name lookup. The request runs in a daemon thread: a resolver that hangs
    cannot hold the caller longer.
    """
    why = [f"no answer within {HUB_TIMEOUT_S} s"]

    def probe() -> None:
        try:
            urllib.request.urlopen(
                urllib.request.Request(url, method="HEAD"), timeout=HUB_TIMEOUT_S
            ).close()
            why[0] = None
        except urllib.error.HTTPError:
            why[0] = None  # it answered
        except (OSError, ValueError) as e:
            why[0] = str(getattr(e, "reason", None) or e)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT_S)
    return why[0]


def safetensors_alternatives(file: str) -> list[str]:
    """The safetensors files that open_clip's downloader prefers to the hub weights file `file`."""
    if file == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME]
    if file.endswith((".bin", ".pth")):
        return [file[:-4] + ".safetensors"]
    return []


def offline_hint(name: str, cfg: dict[str, Any]) -> str:
    """Which file to fetch for an open_clip tag, and the settings that use it.

    open_clip's URL when the tag has one: `resolve_weights` knows that file by its hash (with its
    activation and preprocessing). Else the hub's file, which needs a `-quickgelu` model name when
    the tag's weights were trained with QuickGELU.
    """
    quick = ""
    if url := cfg.get("url"):
        source = url
        file = os.path.basename(url)
    else:
        repo, hub_file = os.path.split(cfg.get("hf_hub", ""))
        hub_file = hub_file or HF_WEIGHTS_NAME
        file = next(iter(safetensors_alternatives(hub_file)), hub_file)
        source = f"{constants.ENDPOINT}/{repo}/resolve/main/{file}"
        if file != hub_file:
            source += f" (or {hub_file} there)"
        if cfg.get("quick_gelu") and "quickgelu" not in name:
            quick = f" and backbone.model={name}-quickgelu"
    options = "--pretrained/--model" if quick else "--pretrained"
    return (
        f"download {source} where there is internet, then set "
        f"backbone.pretrained=/path/to/{file}{quick} (params.yaml, --set or {options})"
    )


def _download(name: str, tag: str, cfg: dict[str, Any]) -> str:
    """The weights file of an open_clip tag.

    From the download caches, else downloaded after one check (at most `HUB_TIMEOUT_S`) that the
    server answers; offline, one line saying how to use a local file instead.
    """
    repo, file = os.path.split(cfg.get("hf_hub", ""))
    file = file or "open_clip_pytorch_model.bin"
    if repo:
        names = (*safetensors_alternatives(file), file)
        cached = [try_to_load_from_cache(repo, f) for f in names]
        if path := next((p for p in cached if isinstance(p, str)), None):
            return path
    url = constants.ENDPOINT if repo else cfg.get("url", "")
    failed = f"cannot download the '{tag}' weights of {name}"
    hint = offline_hint(name, cfg)
    # open_clip's own cache of weights downloaded from a URL
    in_url_cache = not repo and (Path.home() / ".cache" / "clip" / os.path.basename(url)).is_file()
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    elif in_url_cache:
        why = None
    else:
        why = _unreachable(url)
    if why:
        raise QKSError(f"{failed} ({url} unreachable: {why}); {hint}")
    try:
        return open_clip.download_pretrained(cfg)
    except Exception as e:  # a hub error, a checksum: all mean "no weights here"
        raise QKSError(f"{failed} ({type(e).__name__}: {e}); {hint}") from None


def resolve_weights(name: str, pretrained: str | None) -> Weights:
    """`pretrained` (an open_clip tag or a local file) as a local file and facts about it.

    A tag, or a file recognisably a tag's (its sha256 in the tag's URL, or an OpenAI TorchScript
    archive), brings its activation (QuickGELU for OpenAI's) and preprocessing; other QuickGELU
    files need a `-quickgelu` model name (ViT-B-16-quickgelu), as in open_clip.
    """
    if pretrained is None or pretrained.lower() in NO_WEIGHTS:
        return Weights(path=None, source="none", tag=None, sha256=None)
    if cfg := open_clip.get_pretrained_cfg(name, pretrained):
        tag = pretrained
        path = _download(name, tag, cfg)
        source = tag
        sha = file_sha256(path)
        quick_gelu = bool(cfg.get("quick_gelu"))
    elif Path(pretrained).is_file():
        path = str(Path(pretrained).resolve())
        source = path
        sha = file_sha256(path)
        tag, cfg = _tag_of_file(name, sha)
        # the tag says so, or OpenAI's TorchScript files (all QuickGELU)
        quick_gelu = bool(cfg.get("quick_gelu")) or _is_torchscript(path)
    else:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise QKSError(
            f"pretrained {pretrained!r} is neither an open_clip tag of {name} (tags: {tags}) "
            "nor a file"
        )
    return Weights(
        path=path,
        source=source,
        tag=tag,
        sha256=sha,
        quick_gelu=quick_gelu,
        preprocess={k: cfg[k] for k in PREPROCESS_KEYS if k in cfg},
    )


def _is_torchscript(path: str) -> bool:
    """Whether `path` is a TorchScript archive (OpenAI's .pt files), which torch.load refuses."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def check_supported(model: torch.nn.Module, name: str) -> None:
    """Refuse towers whose ln_post tokens are not the reference's (docs/design.md, section 1)."""
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__
        raise QKSError(
            f"model {name}: vision tower {kind} is not an open_clip VisionTransformer "
            "(timm/ResNet towers)"
        )
    if visual.attn_pool is not None:
        raise QKSError(
            f"model {name}: attention-pooling vision towers are not supported (tokens differ)"
        )
    if visual.final_ln_after_pool or visual.pool_type != "tok":
        raise QKSError(
            f"model {name}: only CLS-token pooling with ln_post over all tokens is supported"
        )
    if visual.proj is None:
        raise QKSError(
            f"model {name}: the vision tower has no projection (visual.proj) "
            "to initialise stage two"
        )


def _torchscript_state(path: str) -> dict[str, torch.Tensor]:
    """The weights of an OpenAI TorchScript archive, without its entries that are not weights."""
    with warnings.catch_warnings():  # torch.jit.load is deprecated, but OpenAI's files need it
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(path, map_location="cpu").state_dict()
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        state.pop(key, None)
    return state


def _create(name: str, weights: Weights) -> tuple[torch.nn.Module, Callable]:
    """The open_clip model with `weights` (seeded random without a file) and its preprocess."""
    kwargs = {f"image_{k}": v for k, v in weights.preprocess.items()}
    kwargs["force_quick_gelu"] = weights.quick_gelu
    create = partial(open_clip.create_model_and_transforms, name, **kwargs)
    try:
        if weights.path is None:
            # the same random weights on every run (resumable extraction)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = create(pretrained=None)
        elif not _is_torchscript(weights.path):
            with warnings.catch_warnings():
                # a pickle of protocol 4 or 5: refused in one line below, the warning is noise
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                model, _, preprocess = create(pretrained=weights.path)
        else:
            model, _, preprocess = create(pretrained=None)
            model.load_state_dict(_torchscript_state(weights.path), strict=True)
    # a weights file of another model, or no weights file at all (empty, truncated, a pickle)
    except Exception as e:
        if weights.path is None:
            raise
        raise _weights_error(name, weights.path, e) from None
    return model, preprocess


def _weights_error(name: str, path: str, error: Exception) -> QKSError:
    """One line for weights that did not load: a file that is not weights at all
    (`weights_files.unreadable`: no code in a pickle ran), or the weights of another model."""
    if isinstance(error, pickle.UnpicklingError) or format_problem(path):
        return unreadable(path, error, f"{name} weights")
    if not isinstance(error, (RuntimeError, KeyError, ValueError, OSError)):
        why = f"{type(error).__name__}: {first_line(error)}"
        return QKSError(f"not a state dict of {name} weights ({why})", path)
    why = " ".join(str(error).split())
    return QKSError(f"could not load {name} weights: {why}", path)


def _fingerprint(
    clip: torch.nn.Module, name: str, config_sha: str | None, weights: Weights
) -> dict[str, Any]:
    """What determines the features: model (and config hash), weights (tag, sha256), preprocessing,
    token layout; JSON-normalised, as a store's attributes read back (tuples become lists)."""
    pp = clip.visual.preprocess_cfg
    preprocess = {k: pp[k] for k in PREPROCESS_KEYS} | {"size": to_2tuple(pp["size"])}
    model_quick_gelu = bool(open_clip.get_model_config(name).get("quick_gelu", False))
    fingerprint = {
        "model": name,
        "model_config_sha256": config_sha,
        "pretrained": weights.tag or (None if weights.path is None else "file"),
        "weights_sha256": weights.sha256 if weights.path else "random-seed-0",
        "quick_gelu": weights.quick_gelu or model_quick_gelu,
        "preprocess": preprocess,
        "tokens": TOKEN_LAYOUT,
        "token_shape": list(token_shape(clip)),
        "visual_proj": list(clip.visual.proj.shape),
    }
    return json.loads(json.dumps(fingerprint))


def load_backbone(
    model: str = "ViT-B-16", pretrained: str | None = "openai", device: str | torch.device = "cpu"
) -> Backbone:
    """A frozen fp32 open_clip model in eval mode, with its fingerprint and source.

    `model` is an open_clip name or model-config JSON; `pretrained` an open_clip tag, a local
    weights file, or "none" (seeded random weights).
    """
    name, config_sha = resolve_model_name(model)
    weights = resolve_weights(name, pretrained)
    if weights.path is None:
        log.warning(
            "backbone %s has random weights (pretrained=%r): features are meaningless",
            name,
            pretrained,
        )
    clip, preprocess = _create(name, weights)
    check_supported(clip, name)
    clip = clip.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    # absolute paths, so that a checkpoint trained on these features can find them again
    source = {
        "model": str(Path(model).resolve()) if config_sha else name,
        "pretrained": weights.source,
    }
    fingerprint = _fingerprint(clip, name, config_sha, weights)
    return Backbone(clip, preprocess, open_clip.get_tokenizer(name), fingerprint, source)


def token_shape(clip: torch.nn.Module) -> tuple[int, int]:
    """(T, D) of the visual tokens: grid cells + CLS, transformer width."""
    visual = clip.visual
    return visual.grid_size[0] * visual.grid_size[1] + 1, visual.transformer.width


@torch.no_grad()
def visual_tokens(clip: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Preprocessed images (B, 3, H, W) -> visual tokens (B, T, D) (docs/design.md, section 1)."""
    visual = clip.visual
    saved = (visual.output_tokens, visual.proj)
    # the tower returns (pre-projection CLS, patch tokens)
    visual.output_tokens = True
    visual.proj = None
    try:
        cls, patches = visual(images)  # (B, D), (B, T-1, D)
    finally:
        visual.output_tokens, visual.proj = saved
    return torch.cat([cls.unsqueeze(1), patches], dim=1)  # (B, T, D)


def _cut_rows(tokenizer: Callable, texts: list[str], tokens: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which of `texts`, tokenized to `tokens` (N, context), were cut at the context.

    Only the rows that fill the whole context are tokenized again, one token longer.
    """
    context = tokens.shape[1]
    pad = int(tokenizer([""])[0, -1])  # what fills a row after its last token
    full = tokens[:, -1] != pad
    cut = torch.zeros(len(texts), dtype=torch.bool)
    if full.any():
        rows = full.nonzero().flatten()
        longer = tokenizer([texts[i] for i in rows], context_length=context + 1)
        cut[rows] = longer[:, context] != pad
    return cut


@torch.no_grad()
def encode_labels(
    clip: torch.nn.Module,
    tokenizer: Callable,
    labels: Sequence[str],
    templates: Sequence[str],
    normalize: bool = False,
    batch_labels: int = 16,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> torch.Tensor:
    """Prompt-pool label embeddings (C, E) float32 on the CPU (docs/design.md, section 1).

    A label's embedding is the mean of every template (one '{}' each) filled with the label,
    L2-normalised only with `normalize`; `batch_labels` labels per text batch. `progress`: a bar
    over the labels (None: on a terminal only). A label that some template makes longer than the
    text encoder's context is cut there, as CLIP does, with a warning naming it.
    """
    out = []
    cut = []
    bar = tqdm(
        total=len(labels),
        unit="label",
        desc="embed labels",
        disable=None if progress is None else not progress,
    )
    with bar:
        for start in range(0, len(labels), batch_labels):
            chunk = labels[start : start + batch_labels]
            texts = [t.format(label) for label in chunk for t in templates]
            tokens = tokenizer(texts)  # (c * M, context)
            rows_cut = _cut_rows(tokenizer, texts, tokens).view(len(chunk), len(templates))
            cut += [label for label, row in zip(chunk, rows_cut, strict=True) if row.any()]
            feats = clip.encode_text(tokens.to(device)).float()  # (c * M, E)
            out.append(feats.view(len(chunk), len(templates), -1).mean(dim=1))  # (c, E)
            bar.update(len(chunk))
    if cut:
        log.warning(
            "%d label(s) cut at the text encoder's context of %d tokens (in some template): %s",
            len(cut),
            tokens.shape[1],
            shorten(", ".join(cut[:5])),
        )
    emb = torch.cat(out).cpu()  # (C, E)
    return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb
