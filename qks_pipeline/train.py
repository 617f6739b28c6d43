"""Stage two, training: fit the QKS head (queries, Q-Former, projection) from a feature cache; CLIP is never loaded.

The training store's tail (`val_fraction` of its rows, a random sample because stage one shuffles the store) is held
out; the checkpoint is selected on its seen-label mAP. `selection: test` instead selects on the test cache's ZSL mAP, as
the reference code does, and every output says so.

Output directory:
    config.json         model config, token/embed dims, backbone fingerprint, labels and how they were embedded,
                        training params, best epoch
    best.safetensors    weights of the selected epoch
    last.safetensors    weights after the last completed epoch
    last_state.pt       everything needed to resume (weights, optimizer, scheduler, scaler, RNG, progress); written
                        last each epoch, so a kill before it replays that epoch. Every file is written atomically.
    train_log.csv       one row per epoch (epoch, loss, lr, val_mAP[, test_zsl_mAP], score, time_s, samples_per_s)

Rerunning the same command after an interruption resumes from the last completed epoch; on the CPU, with the same
seed, the final weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from tqdm import tqdm

from qks_pipeline.atomic import atomic_write
from qks_pipeline.cache import Cache, check_fingerprint, open_cache, read_label_embeddings
from qks_pipeline.config import ModelConfig, Params, TrainConfig
from qks_pipeline.devices import autocast, resolve_device
from qks_pipeline.errors import QKSError
from qks_pipeline.evaluate import (
    SELECTED_ON_TEST,
    check_label_names,
    model_scorer,
    predict,
    write_csv,
)
from qks_pipeline.loader import CacheLoader, open_loader, split_rows
from qks_pipeline.losses import make_loss
from qks_pipeline.metrics import evaluate_setting
from qks_pipeline.model import QKS

SCHEDULERS = ("plateau", "cosine", "onecycle", "none")
RESUMABLE_CHANGES = {"epochs", "early_stop"}  # training params that may change between a run and its resumption
LOG_FIELDS = ["epoch", "loss", "lr", "val_mAP", "test_zsl_mAP", "score", "time_s", "samples_per_s"]


# ---------------------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    train: Cache
    test: Cache | None
    label_names: list[str]  # seen then unseen
    embeddings: torch.Tensor  # (C, E) float32
    num_seen: int
    label_embedding: dict[str, Any]  # how the label store was made (normalize, num_templates): predict repeats it

    @property
    def backbone(self) -> dict[str, Any]:
        return self.train.fingerprint["backbone"]


def open_inputs(train_path: str | Path, labels_path: str | Path, test_path: str | Path | None) -> Inputs:
    """Open the caches and label embeddings; refuse incomplete caches, other backbones, other label lists."""
    train = open_cache(train_path)
    train.require_complete()
    names, emb, attrs = read_label_embeddings(labels_path)
    backbone = {"backbone": train.fingerprint["backbone"]}
    check_fingerprint(labels_path, {"backbone": attrs["fingerprint"]["backbone"]}, backbone,
                      "label embeddings vs the training cache")  # fmt: skip
    check_label_names(labels_path, names, train.label_names, "label embeddings vs the training cache")
    test = None
    if test_path is not None:
        test = open_cache(test_path)
        test.require_complete()
        check_fingerprint(test_path, {"backbone": test.fingerprint["backbone"]}, backbone,
                          "test cache vs the training cache")  # fmt: skip
        check_label_names(test_path, test.label_names, train.label_names, "test cache vs the training cache")
        if test.num_seen != train.num_seen:
            raise QKSError(
                f"test cache has {test.num_seen} seen labels, the training cache {train.num_seen}", test_path
            )
    made = {"normalize": bool(attrs.get("normalize", False)), "num_templates": attrs.get("num_templates")}
    return Inputs(train, test, names, torch.from_numpy(emb), train.num_seen, made)


def check_train_config(cfg: TrainConfig, inputs: Inputs) -> None:
    if cfg.scheduler not in SCHEDULERS:
        raise QKSError(f"train.scheduler must be one of {', '.join(SCHEDULERS)}, got {cfg.scheduler!r}")
    if cfg.selection not in ("val", "test"):
        raise QKSError(f"train.selection must be val or test, got {cfg.selection!r}")
    if cfg.selection == "test" and inputs.test is None:
        raise QKSError("train.selection is 'test' (the reference protocol): give --test-cache")
    if not 0.0 <= cfg.val_fraction < 1.0 or cfg.epochs < 1 or cfg.batch_size < 1:
        raise QKSError("train.val_fraction must be in [0, 1), train.epochs and train.batch_size at least 1")
    val_rows = split_rows(inputs.train.num_images, cfg.val_fraction)[1]
    if cfg.selection == "val" and val_rows[0] == val_rows[1]:
        raise QKSError(f"train.val_fraction {cfg.val_fraction} leaves no validation rows; selection 'val' needs some")
    if inputs.num_seen == len(inputs.label_names) and cfg.selection == "test":
        raise QKSError("selection 'test' scores unseen labels, and the caches have none")


# --------------------------------------------------------------------------------------------------------- session
@dataclass
class Session:
    """Everything one training run holds in memory."""

    model: QKS
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LR scheduler or None
    per_step: bool  # the scheduler steps every batch (cosine, onecycle) rather than every epoch (plateau)
    scaler: torch.amp.GradScaler
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_loader: CacheLoader
    val_loader: CacheLoader | None
    test_loader: CacheLoader | None  # only with selection 'test'
    emb: torch.Tensor  # (C, E) on the device
    num_seen: int
    label_names: list[str]
    device: torch.device
    amp: bool


def _make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int) -> tuple[Any, bool]:
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="max", patience=cfg.plateau_patience), False
    if cfg.scheduler == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps), True
    if cfg.scheduler == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps), True
    return None, False


def make_session(params: Params, inputs: Inputs, device: torch.device) -> Session:
    """Model (seeded init, CLIP's projection), optimizer, scheduler, loss and loaders."""
    cfg = params.train
    train_rows, val_rows = split_rows(inputs.train.num_images, cfg.val_fraction)
    seen = slice(0, inputs.num_seen)
    loader = open_loader(inputs.train, batch_size=cfg.batch_size, rows=train_rows, columns=seen, seed=cfg.seed)
    if loader.num_samples == 0:
        raise QKSError("no valid training rows", inputs.train.path)
    val = None
    if val_rows[1] > val_rows[0]:
        val = open_loader(inputs.train, batch_size=params.evaluate.batch_size, rows=val_rows, columns=seen,
                          shuffle=False)  # fmt: skip
    test = None
    if cfg.selection == "test":
        test = open_loader(inputs.test, batch_size=params.evaluate.batch_size, shuffle=False)
    torch.manual_seed(cfg.seed)
    model = QKS(params.model, inputs.train.tokens.shape[3], inputs.embeddings.shape[1])
    model.init_projection(torch.from_numpy(inputs.train.group["visual_proj"][:]))
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, per_step = _make_scheduler(cfg, optimizer, len(loader))
    amp = cfg.amp and device.type == "cuda"
    return Session(
        model, optimizer, scheduler, per_step, torch.amp.GradScaler("cuda", enabled=amp), make_loss(cfg.loss),
        loader, val, test, inputs.embeddings.to(device), inputs.num_seen, inputs.label_names, device, amp,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- epoch and score
def train_step(s: Session, tokens: torch.Tensor, labels: torch.Tensor, emb_seen: torch.Tensor) -> torch.Tensor:
    """One optimisation step on tokens (B, T, D) and labels (B, C_seen) int8; returns the loss (detached)."""
    tokens = tokens.to(s.device, non_blocking=True)
    targets = labels.to(s.device, non_blocking=True)
    with autocast(s.device, s.amp):
        logits = s.model(tokens, emb_seen)  # (B, C_seen)
    loss = s.loss_fn(logits.float(), targets)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    if s.per_step:
        s.scheduler.step()
    return loss.detach()


def train_epoch(s: Session, epoch: int, progress_bar: bool = True) -> dict[str, float]:
    """One pass over the training rows; returns the mean loss, time and throughput."""
    s.model.train()
    emb_seen = s.emb[: s.num_seen]  # (C_seen, E): training scores seen labels only
    total, count, start = torch.zeros((), device=s.device), 0, time.perf_counter()
    bar = tqdm(total=s.train_loader.num_samples, desc=f"epoch {epoch + 1}", unit="img", disable=not progress_bar,
               leave=False, dynamic_ncols=True)  # fmt: skip
    for batch in s.train_loader.epoch(epoch):
        loss = train_step(s, batch.tokens, batch.labels, emb_seen)
        total += loss * len(batch.rows)
        count += len(batch.rows)
        bar.update(len(batch.rows))
    bar.close()
    seconds = time.perf_counter() - start
    return {"loss": float(total) / count, "time_s": seconds, "samples_per_s": count / seconds}


def score_epoch(s: Session) -> dict[str, float]:
    """Validation mAP over the seen labels (held-out rows), and the test ZSL mAP when selecting on the test set."""
    out = {}
    if s.val_loader is not None:
        emb_seen = s.emb[: s.num_seen]
        pred = predict(model_scorer(s.model, emb_seen, s.device, s.amp), s.val_loader, s.device)
        names = s.label_names[: s.num_seen]
        out["val_mAP"] = evaluate_setting(pred.scores, pred.labels, names, np.arange(s.num_seen), [])["mAP"]
    if s.test_loader is not None:
        pred = predict(model_scorer(s.model, s.emb, s.device, s.amp), s.test_loader, s.device)
        unseen = np.arange(s.num_seen, len(s.label_names))
        out["test_zsl_mAP"] = evaluate_setting(pred.scores, pred.labels, s.label_names, unseen, [])["mAP"]
    return out


# ----------------------------------------------------------------------------------------------------- checkpoints
BEST, LAST, STATE, LOG, CONFIG = "best.safetensors", "last.safetensors", "last_state.pt", "train_log.csv", "config.json"


@dataclass
class Progress:
    epoch: int = 0  # completed epochs
    best_score: float = -math.inf
    best_epoch: int = 0  # 1-based epoch of the best checkpoint (0: none yet)
    since_best: int = 0  # epochs since the best score
    stopped_early: bool = False
    log: list[dict[str, Any]] = field(default_factory=list)  # one row per completed epoch


def save_weights(model: QKS, path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, safetensors.torch.save(tensors))


def save_state(s: Session, progress: Progress, path: Path) -> None:
    """The single source of truth for resuming: weights, optimizer, scheduler, scaler, RNG and progress. Serialised
    in memory first, so that a full disk is a plain OSError naming the file (torch.save on a file would say only
    'unexpected pos')."""
    state = {
        "model": s.model.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict() if s.scheduler is not None else None,
        "scaler": s.scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if s.device.type == "cuda" else None,
        "progress": asdict(progress),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def load_state(s: Session, path: Path) -> Progress:
    state = torch.load(path, map_location="cpu", weights_only=True)
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    if s.scheduler is not None:
        s.scheduler.load_state_dict(state["scheduler"])
    s.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and s.device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(**state["progress"])


def run_config(params: Params, inputs: Inputs) -> dict[str, Any]:
    """config.json: what `qks evaluate` needs to rebuild the model and check its inputs, and how it was trained."""
    t, d = inputs.train.tokens.shape[2:]
    test = params.train.selection == "test"
    return {
        "model": asdict(params.model),
        "token_dim": d,
        "num_tokens": t,
        "embed_dim": int(inputs.embeddings.shape[1]),
        "fingerprint": inputs.backbone,
        "label_names": inputs.label_names,
        "num_seen": inputs.num_seen,
        "label_embedding": inputs.label_embedding,
        "train": asdict(params.train),
        "selection": params.train.selection,
        "selection_note": SELECTED_ON_TEST if test else "held-out tail of the training store (train.val_fraction)",
        "train_cache": str(inputs.train.path),
        "best": None,
    }


def _check_resumable(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    diffs = [
        k for k in ("model", "token_dim", "embed_dim", "fingerprint", "label_names", "num_seen") if old[k] != new[k]
    ]
    diffs += [
        f"train.{k}" for k in new["train"] if k not in RESUMABLE_CHANGES and old["train"].get(k) != new["train"][k]
    ]
    if old["train"]["epochs"] != new["train"]["epochs"] and new["train"]["scheduler"] in ("cosine", "onecycle"):
        diffs.append("train.epochs (the cosine/onecycle schedule depends on it)")
    if diffs:
        raise QKSError(f"holds a run with other settings ({', '.join(diffs)}); use --no-resume or another --out", out)


def _start(s: Session, out: Path, config: dict[str, Any], cfg: TrainConfig, resume: bool, echo: Callable) -> Progress:
    """Resume from DIR/last_state.pt when asked and present; otherwise start afresh (removing an older run's files)."""
    if resume and (out / STATE).exists() and (out / CONFIG).exists():
        old = json.loads((out / CONFIG).read_text())
        _check_resumable(old, config, out)
        config["best"] = old.get("best")
        progress = load_state(s, out / STATE)
        progress.stopped_early = cfg.early_stop > 0 and progress.since_best >= cfg.early_stop
        echo(f"resuming {out} after epoch {progress.epoch} (best score {progress.best_score:.4f})")
    else:
        for name in (BEST, LAST, STATE, LOG):
            (out / name).unlink(missing_ok=True)
        progress = Progress()
    atomic_write(out / CONFIG, json.dumps(config, indent=2) + "\n")
    return progress


def _save_epoch(s: Session, progress: Progress, out: Path, config: dict[str, Any], improved: bool) -> None:
    if improved:
        save_weights(s.model, out / BEST)
        config["best"] = {
            "epoch": progress.best_epoch,
            "score": progress.best_score,
            "metric": progress.log[-1]["metric"],
        }
        atomic_write(out / CONFIG, json.dumps(config, indent=2) + "\n")
    save_weights(s.model, out / LAST)
    write_csv(out / LOG, [{k: row.get(k, "") for k in LOG_FIELDS} for row in progress.log], LOG_FIELDS)
    save_state(s, progress, out / STATE)  # the resume point, last: a run killed before it replays the whole epoch


# ------------------------------------------------------------------------------------------------------- the loop
def run_epochs(s: Session, cfg: TrainConfig, progress: Progress, out: Path, config: dict[str, Any],
               echo: Callable[[str], None], progress_bar: bool, on_epoch_end: Callable | None) -> Progress:  # fmt: skip
    """Train, score, step the plateau scheduler, keep the best, checkpoint, log; until epochs or patience run out."""
    metric = "test_zsl_mAP" if cfg.selection == "test" else "val_mAP"
    while progress.epoch < cfg.epochs and not progress.stopped_early:
        lr = s.optimizer.param_groups[0]["lr"]
        stats = train_epoch(s, progress.epoch, progress_bar)
        scores = score_epoch(s)
        score = scores[metric] if not math.isnan(scores[metric]) else -math.inf
        if s.scheduler is not None and not s.per_step:
            s.scheduler.step(score)
        progress.epoch += 1
        improved = score > progress.best_score
        if improved:
            progress.best_score, progress.best_epoch, progress.since_best = score, progress.epoch, 0
        else:
            progress.since_best += 1
        progress.stopped_early = cfg.early_stop > 0 and progress.since_best >= cfg.early_stop
        progress.log.append({"epoch": progress.epoch, "lr": lr, **stats, **scores, "score": score, "metric": metric})
        _save_epoch(s, progress, out, config, improved)
        shown = " ".join(f"{k} {100 * v:.2f}%" for k, v in scores.items())
        echo(f"epoch {progress.epoch}/{cfg.epochs}: loss {stats['loss']:.4f} lr {lr:.2e} {shown} "
             f"{stats['samples_per_s']:.0f} img/s{' *best*' if improved else ''}")  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(progress.epoch)
    if progress.stopped_early:
        echo(f"early stop: no improvement of {metric} in {cfg.early_stop} epochs")
    return progress


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms for the run (the CPU, where it costs nothing), restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled or previous)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def train(
    train_path: str | Path,
    labels_path: str | Path,
    out: str | Path,
    *,
    params: Params | None = None,
    test_path: str | Path | None = None,
    device: str = "auto",
    resume: bool = True,
    progress_bar: bool = True,
    echo: Callable[[str], None] = print,
    on_epoch_end: Callable[[int], None] | None = None,
) -> Progress:
    """Train from the caches into `out` (see the module docstring); `on_epoch_end(epoch)` runs after each checkpoint."""
    params = params or Params()
    inputs = open_inputs(train_path, labels_path, test_path)
    check_train_config(params.train, inputs)
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = run_config(params, inputs)
    with deterministic(dev.type == "cpu"):
        s = make_session(params, inputs, dev)
        progress = _start(s, out, config, params.train, resume, echo)
        _announce(s, params, echo)
        progress = run_epochs(s, params.train, progress, out, config, echo, progress_bar, on_epoch_end)
    if progress.best_epoch:
        echo(f"best checkpoint: {out / BEST} (epoch {progress.best_epoch}, "
             f"{progress.log[progress.best_epoch - 1]['metric']} {100 * progress.best_score:.2f}%)")  # fmt: skip
    if params.train.selection == "test":
        echo(f"WARNING: {SELECTED_ON_TEST}")
    return progress


def _announce(s: Session, params: Params, echo: Callable[[str], None]) -> None:
    val = s.val_loader.num_samples if s.val_loader is not None else 0
    echo(f"training on {s.train_loader.num_samples} images ({val} held out for validation), "
         f"{len(s.train_loader)} batches/epoch, device {s.device}{', AMP' if s.amp else ''}; "
         f"loader memory bound {s.train_loader.memory_bound_bytes / 2**20:.0f} MiB")  # fmt: skip
    if params.train.selection == "test":
        echo(f"WARNING: {SELECTED_ON_TEST}")


REFERENCE_MODEL = "ViT-B-16-quickgelu"  # OpenAI's CLIP weights need QuickGELU, which a weights file cannot record


def import_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    model: str = REFERENCE_MODEL,
    num_heads: int = 12,
    trust_pickle: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Turn an authors' checkpoint into a `qks evaluate`-able directory: best.safetensors, config.json, CLIP weights.

    The CLIP part is exported to `out/clip_weights.pt`; the fingerprint in config.json is what stage one records when
    extracting with `--model {model} --pretrained out/clip_weights.pt`, so only caches extracted that way match.
    """
    from qks_pipeline.backbone import backbone_fingerprint, load_backbone, token_shape  # stage one: CLIP needed here
    from qks_pipeline.reference import export_clip_weights, load_reference_checkpoint

    out = Path(out)
    qks_state, clip_state, fields = load_reference_checkpoint(path, trust_pickle)
    if not clip_state:
        raise QKSError("the checkpoint has no clip_model.* weights, so its backbone cannot be identified", path)
    token_dim, embed_dim = qks_state["proj"].shape
    cfg = ModelConfig(num_heads=num_heads, **fields)
    if token_dim % num_heads:
        raise QKSError(f"width {token_dim} is not divisible by {num_heads} heads (--num-heads)", path)
    head = QKS(cfg, token_dim, embed_dim)
    head.load_state_dict(qks_state, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    clip_path = out / "clip_weights.pt"
    export_clip_weights(clip_state, clip_path)
    clip, _, _ = load_backbone(model, str(clip_path))
    fingerprint = backbone_fingerprint(clip, model, str(clip_path))
    save_weights(head, out / "best.safetensors")
    config = {
        "model": asdict(cfg), "token_dim": token_dim, "num_tokens": token_shape(clip)[0],
        "embed_dim": embed_dim, "fingerprint": json.loads(json.dumps(fingerprint)), "label_names": None,
        "num_seen": None, "train": None, "selection": "test",
        "selection_note": "reference checkpoint: its authors selected it on the test set", "source": str(path),
    }  # fmt: skip
    atomic_write(out / "config.json", json.dumps(config, indent=2) + "\n")
    echo(f"{out}: Q-Former ({fields['num_queries']} queries, {fields['num_layers']} layers, {num_heads} heads, "
         f"{token_dim}->{embed_dim}) -> best.safetensors; CLIP -> {clip_path.name}; config.json")  # fmt: skip
    echo(f"extract caches with: --model {model} --pretrained {clip_path}  (other caches are refused as stale)")
    return config
