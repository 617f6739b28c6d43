"""Stage two, training: fit the QKS head (queries, Q-Former, projection) from a feature cache; CLIP
is never loaded.

The recipe and checkpoint selection (held-out tail of the shuffled training store, or the authors'
`selection: test`): docs/design.md, section 1. Each epoch writes the checkpoint directory's files
(`qks_pipeline.stage_two.checkpoint`), the resume point last; a rerun resumes from the last
completed epoch (README.md, "Reliability"). With `nproc` N > 1 the ranks
(`qks_pipeline.stage_two.data_parallel`) each train on their share of every global batch; rank 0
alone scores and writes (README.md, "Several GPUs").
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, OneCycleLR, ReduceLROnPlateau
from tqdm import tqdm

from qks_pipeline.atomic import atomic_write, write_csv
from qks_pipeline.config import Params, TrainConfig
from qks_pipeline.devices import AMP_DTYPES, autocast, resolve_device
from qks_pipeline.errors import QKSError
from qks_pipeline.stage_two import data_parallel
from qks_pipeline.stage_two.checkpoint import (
    BEST,
    CONFIG,
    LAST,
    LOG,
    STATE,
    make_config,
    read_config,
    save_weights,
    write_config,
)
from qks_pipeline.stage_two.inputs import Inputs, open_inputs
from qks_pipeline.stage_two.loader import CacheLoader, open_loader, split_rows
from qks_pipeline.stage_two.losses import make_loss
from qks_pipeline.stage_two.metrics import (
    SELECTED_ON_TEST,
    SELECTION_SCORES,
    label_counts,
    selection_score,
)
from qks_pipeline.stage_two.model import QKS
from qks_pipeline.stage_two.scoring import model_scorer, score_rows

# train params that may change between a run and its resumption
RESUMABLE_CHANGES = {"epochs", "early_stop", "nproc"}
LOG_FIELDS = "epoch loss lr val_mAP test_zsl_mAP test_zsl_f1@3 test_zsl_f1@5 score time_s samples_per_s".split()
# the Session's parts whose state last_state.pt holds
STATEFUL = ("model", "optimizer", "scheduler", "scaler")
# what score_epoch's "score" is, per train.selection
SELECTION = {"val": "val_mAP", "test": "test_zsl_mAP+f1@3+f1@5"}


# ---------------------------------------------------------------------------------------------------------- inputs
def check_train_config(cfg: TrainConfig, inputs: Inputs) -> None:
    """What the config loader cannot check alone (it checks the choices): ranges, and what the
    caches allow (selection 'val': a seen label with a positive and a negative among the held-out
    rows, `metrics`, counted shard by shard)."""
    if not 0.0 <= cfg.val_fraction < 1.0 or cfg.epochs < 1 or cfg.batch_size < 1:
        raise QKSError(
            "train.val_fraction must be in [0, 1), train.epochs and train.batch_size at least 1"
        )
    if cfg.selection == "test":
        if inputs.test is None:
            raise QKSError("train.selection is 'test' (the reference protocol): give --test-cache")
        if inputs.num_seen == len(inputs.label_names):
            raise QKSError("selection 'test' scores unseen labels, and the caches have none")
        return
    cache, rows = inputs.cache, split_rows(inputs.cache.num_images, cfg.val_fraction)[1]
    if rows[0] == rows[1]:
        raise QKSError(
            f"train.val_fraction {cfg.val_fraction} leaves no validation rows; selection 'val' needs some"
        )
    pos = neg = 0
    for start in range(rows[0], rows[1], cache.shard_size):
        stop = min(start + cache.shard_size, rows[1])
        _, p, n = label_counts(cache.labels[start:stop, : inputs.num_seen][cache.valid[start:stop]])
        pos, neg = pos + p, neg + n
    if not np.any((pos > 0) & (neg > 0)):
        why = "has both a positive and a negative, so validation mAP is undefined"
        raise QKSError(
            f"no seen label of the held-out rows {rows} {why}; selection 'val' cannot choose",
            cache.path,
        )


# --------------------------------------------------------------------------------------------------------- session
@dataclass
class Session:
    """Everything one training run holds in memory."""

    model: QKS
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LR scheduler or None
    scaler: torch.amp.GradScaler
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_loader: CacheLoader
    val_loader: CacheLoader | None
    test_loader: CacheLoader | None  # only with selection 'test'
    emb: torch.Tensor  # (C, E) on the device
    num_seen: int
    device: torch.device
    # autocast's dtype (train.precision bf16 or fp16, on CUDA); None: float32
    amp_dtype: torch.dtype | None
    # what training calls: `model`, wrapped in DistributedDataParallel under several ranks
    net: torch.nn.Module


def make_session(params: Params, inputs: Inputs, device: torch.device) -> Session:
    """Model (seeded init, CLIP's projection), optimizer, scheduler, loss and loaders."""
    cfg = params.train
    train_rows, val_rows = split_rows(inputs.cache.num_images, cfg.val_fraction)
    seen = slice(0, inputs.num_seen)
    # batches assembled in pinned memory, copied with non_blocking
    pin = {"pin_memory": device.type == "cuda"}
    loader = open_loader(
        inputs.cache, batch_size=cfg.batch_size, rows=train_rows, columns=seen, seed=cfg.seed, **pin
    )
    loader.part = data_parallel.rank_and_world()  # each rank reads its share of every batch
    if loader.num_samples == 0:
        raise QKSError("no valid training rows", inputs.cache.path)
    held = {"batch_size": params.evaluate.batch_size, "shuffle": False, **pin}  # scored in order
    val = (
        open_loader(inputs.cache, rows=val_rows, columns=seen, **held)
        if val_rows[1] > val_rows[0]
        else None
    )
    test = open_loader(inputs.test, **held) if cfg.selection == "test" else None
    torch.manual_seed(cfg.seed)
    model = QKS(params.model, inputs.cache.tokens.shape[3], inputs.embeddings.shape[1])
    model.init_projection(torch.from_numpy(inputs.cache.visual_proj[:]))
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(loader)
    scheduler = {
        "plateau": lambda: ReduceLROnPlateau(optimizer, mode="max", patience=cfg.plateau_patience),
        "cosine": lambda: CosineAnnealingLR(optimizer, T_max=steps),
        "onecycle": lambda: OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps),
        "none": lambda: None,
    }[cfg.scheduler]()
    # reduced precision on CUDA only
    amp_dtype = AMP_DTYPES[cfg.precision] if device.type == "cuda" else None
    return Session(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        loss_fn=make_loss(cfg.loss),
        train_loader=loader,
        val_loader=val,
        test_loader=test,
        emb=torch.from_numpy(inputs.embeddings).to(device),
        num_seen=inputs.num_seen,
        device=device,
        amp_dtype=amp_dtype,
        net=model,
    )


# ------------------------------------------------------------------------------------------------- epoch and score
def train_step(
    s: Session,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    emb_seen: torch.Tensor,
    of: int | None = None,
) -> torch.Tensor:
    """One optimisation step on tokens (b, T, D) and labels (b, C_seen) int8: this rank's share of a
    global batch of `of` samples (default: b, one process); returns the share's loss times b
    (detached)."""
    tokens = tokens.to(s.device, non_blocking=True)
    targets = labels.to(s.device, non_blocking=True)
    with autocast(s.device, s.amp_dtype):
        logits = s.net(tokens, emb_seen)  # (b, C_seen)
    # an empty share: 0, with the graph for DDP
    loss = s.loss_fn(logits, targets) if len(targets) else logits.sum()
    s.optimizer.zero_grad(set_to_none=True)
    # Every loss is a mean over images: weighting the share by b / B x world makes DDP's mean over
    # ranks the gradient of the whole batch's loss.
    s.scaler.scale(
        loss * (len(targets) * data_parallel.rank_and_world()[1] / (of or len(targets)))
    ).backward()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    if s.scheduler is not None and not isinstance(s.scheduler, ReduceLROnPlateau):
        s.scheduler.step()  # cosine and onecycle step every batch
    return loss.detach() * len(targets)


def train_epoch(s: Session, epoch: int, progress_bar: bool = True) -> dict[str, float]:
    """One pass over the training rows; returns the mean loss, time and throughput."""
    s.model.train()
    seed = np.random.SeedSequence(
        [s.train_loader.seed, epoch, s.train_loader.part[0]]
    ).generate_state(1)[0]
    # dropout's draws: a function of (seed, epoch, rank), so a resumed run repeats them
    torch.manual_seed(int(seed))
    emb_seen = s.emb[: s.num_seen]  # (C_seen, E): training scores seen labels only
    total, count, start = torch.zeros((), device=s.device), 0, time.perf_counter()
    size, samples = s.train_loader.batch_size, s.train_loader.num_samples
    with tqdm(
        total=samples, desc=f"epoch {epoch + 1}", unit="img", disable=not progress_bar
    ) as bar:
        for i, batch in enumerate(s.train_loader.epoch(epoch)):
            of = min(size, samples - i * size)  # the global batch this rank's share belongs to
            total += train_step(s, batch.tokens, batch.labels, emb_seen, of)
            count += of
            bar.update(of)
    seconds = time.perf_counter() - start
    return {
        "loss": float(data_parallel.total(total)) / count,
        "time_s": seconds,
        "samples_per_s": count / seconds,
    }


def score_epoch(s: Session) -> dict[str, float]:
    """`metrics.selection_score` (float32) on the held-out rows and, with selection 'test', on the
    test set (whose `score` then counts)."""
    out = {}
    if s.val_loader is not None:
        pred = score_rows(model_scorer(s.model, s.emb[: s.num_seen]), s.val_loader, s.device)
        out = selection_score(pred.scores, pred.labels, s.num_seen, "val")
    if s.test_loader is not None:
        pred = score_rows(model_scorer(s.model, s.emb), s.test_loader, s.device)
        out |= selection_score(pred.scores, pred.labels, s.num_seen, "test")
    return out


# ----------------------------------------------------------------------------------------------------- checkpoints
@dataclass
class Progress:
    epoch: int = 0  # completed epochs
    best_score: float = -math.inf
    best_epoch: int = 0  # 1-based epoch of the best checkpoint (0: none yet)
    since_best: int = 0  # epochs since the best score
    stopped_early: bool = False
    log: list[dict[str, Any]] = field(default_factory=list)  # one row per completed epoch


def save_state(s: Session, progress: Progress, path: Path) -> None:
    """The resume point: the `STATEFUL` parts' states and the progress. Serialised in memory first,
    so that a full disk is a plain OSError naming the file (torch.save on a file would say only
    'unexpected pos')."""
    state = {k: None if getattr(s, k) is None else getattr(s, k).state_dict() for k in STATEFUL}
    buf = io.BytesIO()
    torch.save(state | {"progress": asdict(progress)}, buf)
    atomic_write(path, buf.getvalue())


def run_config(params: Params, inputs: Inputs, model: QKS) -> dict[str, Any]:
    """config.json (`checkpoint.make_config`): what rebuilds the model and checks its inputs, and
    how it was trained."""
    test = params.train.selection == "test"
    note = (
        f"{SELECTED_ON_TEST}; " if test else ""
    ) + f"selection score: {SELECTION_SCORES[params.train.selection]}"
    labels = {
        "label_names": inputs.label_names,
        "num_seen": inputs.num_seen,
        "label_embedding": inputs.label_embedding,
    }
    run = {"train": asdict(params.train), "train_cache": str(inputs.cache.path), **labels}
    fixed = (model, inputs.cache.tokens.shape[2], inputs.backbone, inputs.backbone_source)
    return make_config(*fixed, selection=params.train.selection, selection_note=note, **run)


def _check_resumable(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    same = ("model", "token_dim", "embed_dim", "fingerprint", "label_names", "num_seen")
    diffs = [k for k in same if old[k] != new[k]]
    diffs += [
        f"train.{k}"
        for k, v in new["train"].items()
        if k not in RESUMABLE_CHANGES and old["train"].get(k) != v
    ]
    if old["train"]["epochs"] != new["train"]["epochs"] and new["train"]["scheduler"] in (
        "cosine",
        "onecycle",
    ):
        diffs.append("train.epochs (the cosine/onecycle schedule depends on it)")
    if diffs:
        raise QKSError(
            f"holds a run with other settings ({', '.join(diffs)}); use --no-resume or another --out",
            out,
        )


def _start(
    s: Session, out: Path, config: dict[str, Any], cfg: TrainConfig, resume: bool, echo: Callable
) -> Progress:
    """Resume from DIR/last_state.pt when asked and present, on every rank; otherwise start afresh
    (rank 0 removes an older run's files first)."""
    found = data_parallel.from_rank0(resume and (out / STATE).exists() and (out / CONFIG).exists())
    if data_parallel.rank_and_world()[0] == 0:
        if found:
            old = read_config(out)
            _check_resumable(old, config, out)
            config["best"] = old.get("best")
        else:
            for name in (BEST, LAST, STATE, LOG):
                (out / name).unlink(missing_ok=True)
        write_config(out, config)
    data_parallel.barrier()
    if not found:
        return Progress()
    state = torch.load(out / STATE, map_location="cpu", weights_only=True)
    for k in STATEFUL:
        if getattr(s, k) is not None:
            getattr(s, k).load_state_dict(state[k])
    progress = Progress(**state["progress"])
    progress.stopped_early = cfg.early_stop > 0 and progress.since_best >= cfg.early_stop
    echo(f"resuming {out} after epoch {progress.epoch} (best score {progress.best_score:.4f})")
    return progress


def _save_epoch(
    s: Session, progress: Progress, out: Path, config: dict[str, Any], improved: bool
) -> None:
    if improved:
        save_weights(s.model, out / BEST)
        metric = progress.log[-1]["metric"]
        config["best"] = {
            "epoch": progress.best_epoch,
            "score": progress.best_score,
            "metric": metric,
        }
        write_config(out, config)
    save_weights(s.model, out / LAST)
    write_csv(
        out / LOG, [{k: row.get(k, "") for k in LOG_FIELDS} for row in progress.log], LOG_FIELDS
    )
    # the resume point, last: a run killed before it replays the whole epoch
    save_state(s, progress, out / STATE)


# ------------------------------------------------------------------------------------------------------- the loop
def run_epochs(
    s: Session,
    cfg: TrainConfig,
    progress: Progress,
    out: Path,
    config: dict[str, Any],
    echo: Callable[[str], None],
    progress_bar: bool,
    on_epoch_end: Callable[[int], None] | None,
) -> Progress:
    """Epochs until `train.epochs` or early stopping. Each: train, score (rank 0), step the plateau
    scheduler on the score, on rank 0 checkpoint and log, then `on_epoch_end(epoch)`."""
    while progress.epoch < cfg.epochs and not progress.stopped_early:
        lr = s.optimizer.param_groups[0]["lr"]
        stats = train_epoch(s, progress.epoch, progress_bar)
        scores = data_parallel.from_rank0(
            score_epoch(s) if data_parallel.rank_and_world()[0] == 0 else None
        )
        score = scores.pop("score")
        score = -math.inf if math.isnan(score) else score
        if isinstance(s.scheduler, ReduceLROnPlateau):
            s.scheduler.step(score)
        progress.epoch += 1
        improved = score > progress.best_score
        if improved:
            progress.best_score, progress.best_epoch, progress.since_best = score, progress.epoch, 0
        else:
            progress.since_best += 1
        progress.stopped_early = cfg.early_stop > 0 and progress.since_best >= cfg.early_stop
        row = {
            "epoch": progress.epoch,
            "lr": lr,
            **stats,
            **scores,
            "score": score,
            "metric": SELECTION[cfg.selection],
        }
        progress.log.append(row)
        if data_parallel.rank_and_world()[0] == 0:
            _save_epoch(s, progress, out, config, improved)
        shown = " ".join(f"{k} {100 * v:.2f}%" for k, v in scores.items())
        speed = f"{row['samples_per_s']:.0f} img/s{' *best*' if improved else ''}"
        echo(
            f"epoch {progress.epoch}/{cfg.epochs}: loss {row['loss']:.4f} lr {lr:.2e} {shown} {speed}"
        )
        if on_epoch_end is not None:
            on_epoch_end(progress.epoch)
    if progress.stopped_early:
        echo(f"early stop: no improvement of {SELECTION[cfg.selection]} in {cfg.early_stop} epochs")
    return progress


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
    any_split: bool = False,
    echo: Callable[[str], None] = print,
    on_epoch_end: Callable[[int], None] | None = None,
) -> Progress:
    """Train from the caches into `out`; `on_epoch_end(epoch)` runs after each checkpoint. With
    `train.nproc` N > 1, starts N ranks that run this function and returns rank 0's result."""
    args = dict(locals())
    params = params or Params()
    inputs = open_inputs(train_path, labels_path, test_path, role="train", any_split=any_split)
    check_train_config(params.train, inputs)
    dev = resolve_device(device)
    rank, world = data_parallel.rank_and_world()
    ranks = world if world > 1 else params.train.nproc
    if params.train.batch_size % ranks:
        raise QKSError(
            f"train.batch_size {params.train.batch_size} is not divisible by the {ranks} processes"
        )
    if ranks > world:
        if dev.type == "cuda" and ranks > torch.cuda.device_count():
            raise QKSError(
                f"train.nproc {ranks} asks for more ranks than the {torch.cuda.device_count()} GPUs"
            )
        return data_parallel.launch(ranks, train, args | {"params": params})
    echo, out = (echo if rank == 0 else lambda _: None), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    deterministic = torch.are_deterministic_algorithms_enabled()
    # free on the CPU, restored afterwards
    torch.use_deterministic_algorithms(deterministic or dev.type == "cpu")
    try:
        s = make_session(params, inputs, data_parallel.setup(dev))
        config = run_config(params, inputs, s.model)
        progress = _start(s, out, config, params.train, resume, echo)
        s.net = data_parallel.wrap(s.model, s.device)
        _announce(s, params, echo)
        progress = run_epochs(
            s, params.train, progress, out, config, echo, progress_bar and rank == 0, on_epoch_end
        )
    finally:
        torch.use_deterministic_algorithms(deterministic)
    if progress.best_epoch:
        best = progress.log[progress.best_epoch - 1]["metric"]
        echo(
            f"best checkpoint: {out / BEST} (epoch {progress.best_epoch}, {best} {100 * progress.best_score:.2f}%)"
        )
    if params.train.selection == "test":
        echo(f"WARNING: {SELECTED_ON_TEST}")
    return progress


def _announce(s: Session, params: Params, echo: Callable[[str], None]) -> None:
    val = s.val_loader.num_samples if s.val_loader is not None else 0
    world = data_parallel.rank_and_world()[1]
    ranks = (
        f"{world} ranks x {params.train.batch_size // world}"
        if world > 1
        else f"batch {params.train.batch_size}"
    )
    precision = params.train.precision if s.amp_dtype else "fp32"
    echo(
        f"training on {s.train_loader.num_samples} images ({val} held out for validation), {len(s.train_loader)} "
        f"batches/epoch ({ranks}), device {s.device}, {precision}; "
        f"loader memory bound {s.train_loader.memory_bound_bytes / 2**20:.0f} MiB"
    )
    if params.train.selection == "test":
        echo(f"WARNING: {SELECTED_ON_TEST}")
