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

import contextlib
import hashlib
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

from qks_pipeline.atomic import atomic_write, remove_temporary, write_csv
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
from qks_pipeline.store.fingerprint import differing_keys
from qks_pipeline.store.location import Location
from qks_pipeline.weights_files import first_line, load_torch

# train params that may change between a run and its resumption
RESUMABLE_CHANGES = {"epochs", "early_stop", "nproc"}
# train_log.csv's columns
LOG_FIELDS = [
    "epoch",
    "loss",
    "lr",
    "val_mAP",
    "test_zsl_mAP",
    "test_zsl_f1@3",
    "test_zsl_f1@5",
    "score",
    "time_s",
    "samples_per_s",
]
# the Session's parts whose state last_state.pt holds
STATEFUL = ("model", "optimizer", "scheduler", "scaler")
# what score_epoch's "score" is, per train.selection
SELECTION = {"val": "val_mAP", "test": "test_zsl_mAP+f1@3+f1@5"}
# what to do about a resume point that cannot be read
START_AFRESH = "delete it or pass --no-resume to start afresh"
# config.json's "inputs" (`inputs_identity`), in words
INPUT_NAMES = {
    "train_data": "training store",
    "test_data": "test store",
    "label_embeddings_sha256": "label store",
}


# ------------------------------------------------------------------------------------------ inputs
def check_train_config(cfg: TrainConfig, inputs: Inputs) -> None:
    """Check what the config loader cannot check alone (it checks the choices).

    Ranges, and what the caches allow: selection 'test' needs a test store with unseen labels;
    selection 'val' a seen label with a positive and a negative among the held-out rows.
    """
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
    _check_validation_rows(cfg, inputs)


def _check_validation_rows(cfg: TrainConfig, inputs: Inputs) -> None:
    """Refuse held-out rows without a seen label that has both a positive and a negative there
    (`metrics.label_counts`, counted shard by shard)."""
    cache = inputs.cache
    rows = split_rows(cache.num_images, cfg.val_fraction)[1]
    if rows[0] == rows[1]:
        raise QKSError(
            f"train.val_fraction {cfg.val_fraction} leaves no validation rows; "
            "selection 'val' needs some"
        )
    pos = neg = 0
    for start in range(rows[0], rows[1], cache.shard_size):
        stop = min(start + cache.shard_size, rows[1])
        valid = cache.valid[start:stop]
        labels = cache.labels[start:stop, : inputs.num_seen][valid]
        _, p, n = label_counts(labels)
        pos = pos + p
        neg = neg + n
    if not np.any((pos > 0) & (neg > 0)):
        why = "has both a positive and a negative, so validation mAP is undefined"
        raise QKSError(
            f"no seen label of the held-out rows {rows} {why}; selection 'val' cannot choose",
            cache.path,
        )


# ----------------------------------------------------------------------------------------- session
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


def _loaders(
    params: Params, inputs: Inputs, device: torch.device
) -> tuple[CacheLoader, CacheLoader | None, CacheLoader | None]:
    """The training loader (this rank's share of every batch), the held-out rows' and the test's."""
    cfg = params.train
    train_rows, val_rows = split_rows(inputs.cache.num_images, cfg.val_fraction)
    seen = slice(0, inputs.num_seen)
    # batches assembled in pinned memory, copied with non_blocking
    pin = {"pin_memory": device.type == "cuda"}
    loader = open_loader(
        inputs.cache, batch_size=cfg.batch_size, rows=train_rows, columns=seen, seed=cfg.seed, **pin
    )
    loader.part = data_parallel.rank_and_world()
    if loader.num_samples == 0:
        raise QKSError("no valid training rows", inputs.cache.path)
    # the held-out and test rows: scored in order
    held = {"batch_size": params.evaluate.batch_size, "shuffle": False, **pin}
    val = None
    if val_rows[1] > val_rows[0]:
        val = open_loader(inputs.cache, rows=val_rows, columns=seen, **held)
    test = open_loader(inputs.test, **held) if cfg.selection == "test" else None
    return loader, val, test


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> Any:
    """`train.scheduler` on `optimizer` (None for "none"); cosine and onecycle span `steps`."""
    if cfg.scheduler == "plateau":
        return ReduceLROnPlateau(optimizer, mode="max", patience=cfg.plateau_patience)
    if cfg.scheduler == "cosine":
        return CosineAnnealingLR(optimizer, T_max=steps)
    if cfg.scheduler == "onecycle":
        return OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps)
    assert cfg.scheduler == "none", cfg.scheduler
    return None


def make_session(params: Params, inputs: Inputs, device: torch.device) -> Session:
    """Model (seeded init, CLIP's projection), optimizer, scheduler, loss and loaders."""
    cfg = params.train
    loader, val, test = _loaders(params, inputs, device)
    torch.manual_seed(cfg.seed)
    token_dim = inputs.cache.tokens.shape[3]  # tokens (N, V, T, D)
    embed_dim = inputs.embeddings.shape[1]  # label embeddings (C, E)
    model = QKS(params.model, token_dim, embed_dim)
    model.init_projection(torch.from_numpy(inputs.cache.visual_proj[:]))
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # reduced precision on CUDA only
    amp_dtype = AMP_DTYPES[cfg.precision] if device.type == "cuda" else None
    return Session(
        model=model,
        optimizer=optimizer,
        scheduler=_scheduler(optimizer, cfg, steps=cfg.epochs * len(loader)),
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


# --------------------------------------------------------------------------------- epoch and score
def train_step(
    s: Session,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    emb_seen: torch.Tensor,
    of: int | None = None,
) -> torch.Tensor:
    """One optimisation step on tokens (b, T, D) and labels (b, C_seen) int8.

    The batch is this rank's share of a global batch of `of` samples (default: b, one process).
    Returns the share's loss times b, detached.
    """
    tokens = tokens.to(s.device, non_blocking=True)
    targets = labels.to(s.device, non_blocking=True)
    with autocast(s.device, s.amp_dtype):
        logits = s.net(tokens, emb_seen)  # (b, C_seen)
    # an empty share: 0, with the graph for DDP
    loss = s.loss_fn(logits, targets) if len(targets) else logits.sum()
    s.optimizer.zero_grad(set_to_none=True)
    # Every loss is a mean over images: weighting the share by b / B x world makes DDP's mean over
    # ranks the gradient of the whole batch's loss.
    world = data_parallel.rank_and_world()[1]
    weight = len(targets) * world / (of or len(targets))
    s.scaler.scale(loss * weight).backward()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    if s.scheduler is not None and not isinstance(s.scheduler, ReduceLROnPlateau):
        s.scheduler.step()  # cosine and onecycle step every batch
    return loss.detach() * len(targets)


def train_epoch(s: Session, epoch: int, progress_bar: bool = True) -> dict[str, float]:
    """One pass over the training rows; returns the mean loss, time and throughput."""
    s.model.train()
    # dropout's draws: a function of (seed, epoch, rank), so a resumed run repeats them
    entropy = [s.train_loader.seed, epoch, s.train_loader.part[0]]
    seed = np.random.SeedSequence(entropy).generate_state(1)[0]
    torch.manual_seed(int(seed))
    emb_seen = s.emb[: s.num_seen]  # (C_seen, E): training scores seen labels only
    size = s.train_loader.batch_size
    samples = s.train_loader.num_samples
    total = torch.zeros((), device=s.device)  # the loss summed on the device: no sync per batch
    count = 0
    start = time.perf_counter()
    bar = tqdm(total=samples, desc=f"epoch {epoch + 1}", unit="img", disable=not progress_bar)
    with bar:
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
    """`metrics.selection_score` (float32) on the held-out rows and, with selection 'test', the
    test set's (whose `score` then counts)."""
    out = {}
    if s.val_loader is not None:
        pred = score_rows(model_scorer(s.model, s.emb[: s.num_seen]), s.val_loader, s.device)
        out = selection_score(pred.scores, pred.labels, s.num_seen, "val")
    if s.test_loader is not None:
        pred = score_rows(model_scorer(s.model, s.emb), s.test_loader, s.device)
        out |= selection_score(pred.scores, pred.labels, s.num_seen, "test")
    return out


# ------------------------------------------------------------------------------------- checkpoints
@dataclass
class Progress:
    """Where a run stands: what last_state.pt holds besides the `STATEFUL` parts' states."""

    epoch: int = 0  # completed epochs
    best_score: float = -math.inf
    best_epoch: int = 0  # 1-based epoch of the best checkpoint (0: none yet)
    since_best: int = 0  # epochs since the best score
    stopped_early: bool = False
    log: list[dict[str, Any]] = field(default_factory=list)  # one row per completed epoch

    def record(self, score: float, early_stop: int) -> bool:
        """Count one more epoch, which scored `score`; returns whether it is the best so far."""
        self.epoch += 1
        improved = score > self.best_score
        if improved:
            self.best_score = score
            self.best_epoch = self.epoch
            self.since_best = 0
        else:
            self.since_best += 1
        self.stopped_early = early_stop > 0 and self.since_best >= early_stop
        return improved


def save_state(s: Session, progress: Progress, path: Path) -> None:
    """The resume point: the `STATEFUL` parts' states and the progress.

    Serialised in memory first, so that a full disk is a plain OSError naming the file (torch.save
    on a file would say only 'unexpected pos').
    """
    parts = {k: getattr(s, k) for k in STATEFUL}
    state = {k: None if part is None else part.state_dict() for k, part in parts.items()}
    buf = io.BytesIO()
    torch.save(state | {"progress": asdict(progress)}, buf)
    atomic_write(path, buf.getvalue())


def inputs_identity(inputs: Inputs, selection: str) -> dict[str, Any]:
    """What a resumed run must read again: the training store's data fingerprint, the test store's
    (selection 'test'), the label embeddings' sha256 (the backbone and labels: config.json's
    `fingerprint` and `label_names`)."""
    embeddings = np.ascontiguousarray(inputs.embeddings, dtype=np.float32)
    test = inputs.test.fingerprint["data"] if inputs.test and selection == "test" else None
    return {
        "train_data": inputs.cache.fingerprint["data"],
        "test_data": test,
        "label_embeddings_sha256": hashlib.sha256(embeddings.tobytes()).hexdigest(),
    }


def run_config(params: Params, inputs: Inputs, model: QKS) -> dict[str, Any]:
    """config.json (`checkpoint.make_config`): how to rebuild the model and how it was trained."""
    selection = params.train.selection
    note = f"selection score: {SELECTION_SCORES[selection]}"
    if selection == "test":
        note = f"{SELECTED_ON_TEST}; {note}"
    return make_config(
        model,
        inputs.cache.tokens.shape[2],
        inputs.backbone,
        inputs.backbone_source,
        selection=selection,
        selection_note=note,
        label_names=inputs.label_names,
        num_seen=inputs.num_seen,
        label_embedding=inputs.label_embedding,
        train=asdict(params.train),
        train_cache=str(inputs.cache.path),
        inputs=inputs_identity(inputs, selection),
    )


def _check_resumable(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    """Refuse to resume a run in `out` whose config differs in more than `RESUMABLE_CHANGES`."""
    same = ("model", "token_dim", "embed_dim", "fingerprint", "label_names", "num_seen")
    diffs = [k for k in same if old.get(k) != new[k]]
    # runs before the record was kept: not compared
    if old.get("inputs") is not None:
        for key, _, _ in differing_keys(old["inputs"], new["inputs"]):
            part, _, field_name = key.partition(".")
            diffs.append(f"{INPUT_NAMES.get(part, part)}{f' {field_name}' if field_name else ''}")
    old_train = old["train"]
    new_train = new["train"]
    diffs += [
        f"train.{k}"
        for k, v in new_train.items()
        if k not in RESUMABLE_CHANGES and old_train.get(k) != v
    ]
    spans_epochs = new_train["scheduler"] in ("cosine", "onecycle")
    if spans_epochs and old_train["epochs"] != new_train["epochs"]:
        diffs.append("train.epochs (the cosine/onecycle schedule depends on it)")
    if diffs:
        raise QKSError(
            f"holds a run with other settings ({', '.join(diffs)}); "
            "use --no-resume or another --out",
            out,
        )


def _start(
    s: Session, out: Path, config: dict[str, Any], cfg: TrainConfig, resume: bool, echo: Callable
) -> Progress:
    """Resume from DIR/last_state.pt when asked and present, on every rank; otherwise start afresh
    (rank 0 removes an older run's files first)."""
    found = resume and (out / STATE).exists() and (out / CONFIG).exists()
    found = data_parallel.from_rank0(found)
    if data_parallel.rank_and_world()[0] == 0:
        if left := remove_temporary(out):
            echo(f"removed {len(left)} temporary file(s) of an interrupted save, e.g. {left[0]}")
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
    progress = load_state(s, out / STATE)
    progress.stopped_early = cfg.early_stop > 0 and progress.since_best >= cfg.early_stop
    echo(f"resuming {out} after epoch {progress.epoch} (best score {progress.best_score:.4f})")
    return progress


def load_state(s: Session, path: Path) -> Progress:
    """Restore the `STATEFUL` parts from a resume point; returns its progress.

    Only tensors and plain containers are unpickled (`weights_only`): no code in the file runs. A
    file that is truncated, foreign or of another run is one error naming it.
    """
    try:
        state = load_torch(path, "the resume point")
    except QKSError as e:
        # the message names the file already
        raise QKSError(f"{e.message}; {START_AFRESH}") from None
    try:
        for k in STATEFUL:
            if getattr(s, k) is not None:
                getattr(s, k).load_state_dict(state[k])
        return Progress(**state["progress"])
    # a file of other contents: another model's states, no progress, other fields
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        why = f"{type(e).__name__}: {first_line(e)}"
        message = f"not a resume point of this run ({why}); {START_AFRESH}"
        raise QKSError(message, path) from None


def _save_epoch(
    s: Session, progress: Progress, out: Path, config: dict[str, Any], improved: bool
) -> None:
    """Write an epoch's files: best weights if `improved`, last weights, log, resume point."""
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
    log = [{k: row.get(k, "") for k in LOG_FIELDS} for row in progress.log]
    write_csv(out / LOG, log, LOG_FIELDS)
    # the resume point, last: a run killed before it replays the whole epoch
    save_state(s, progress, out / STATE)


# ---------------------------------------------------------------------------------------- the loop
def run_epochs(
    s: Session,
    cfg: TrainConfig,
    progress: Progress,
    *,
    out: Path,
    config: dict[str, Any],
    echo: Callable[[str], None],
    progress_bar: bool,
    on_epoch_end: Callable[[int], None] | None,
) -> Progress:
    """Epochs until `train.epochs` or early stopping.

    Each: train, score (rank 0), step the plateau scheduler on the score, on rank 0 checkpoint and
    log, then `on_epoch_end(epoch)`.
    """
    while progress.epoch < cfg.epochs and not progress.stopped_early:
        lr = s.optimizer.param_groups[0]["lr"]
        stats = train_epoch(s, progress.epoch, progress_bar)
        is_rank0 = data_parallel.rank_and_world()[0] == 0
        scores = data_parallel.from_rank0(score_epoch(s) if is_rank0 else None)
        score = scores.pop("score")
        score = -math.inf if math.isnan(score) else score
        if isinstance(s.scheduler, ReduceLROnPlateau):
            s.scheduler.step(score)
        improved = progress.record(score, cfg.early_stop)
        row = {
            "epoch": progress.epoch,
            "lr": lr,
            **stats,
            **scores,
            "score": score,
            "metric": SELECTION[cfg.selection],
        }
        progress.log.append(row)
        if is_rank0:
            _save_epoch(s, progress, out, config, improved)
        loss = f"loss {row['loss']:.4f} lr {lr:.2e}"
        shown = " ".join(f"{k} {100 * v:.2f}%" for k, v in scores.items())
        speed = f"{row['samples_per_s']:.0f} img/s{' *best*' if improved else ''}"
        echo(f"epoch {progress.epoch}/{cfg.epochs}: {loss} {shown} {speed}")
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
    """Train the QKS head from the feature caches into the checkpoint directory `out`.

    With `train.nproc` N > 1, starts N ranks that run this function and returns rank 0's result.

    Args:
        train_path: The training feature store (stage one).
        labels_path: The label-embedding store (stage one).
        out: The checkpoint directory: best and last weights, config.json, train_log.csv and the
            resume point.
        params: The `model`, `train` and `evaluate` sections of params.yaml (default: their
            defaults).
        test_path: The test feature store; required by `train.selection: test`.
        device: "auto", "cpu", "cuda" or "cuda:N".
        resume: Continue the run found in `out`; False starts afresh.
        progress_bar: Show a progress bar per epoch.
        any_split: Accept even a store that stage one made from a test split.
        echo: Where progress lines and warnings are printed.
        on_epoch_end: Called with the epoch number (1-based) after each epoch's checkpoint.

    Returns:
        The run's progress: epochs done, the best score and its epoch, one log row per epoch.
    """
    args = dict(locals())  # what the launched ranks run this function with
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
            gpus = torch.cuda.device_count()
            raise QKSError(f"train.nproc {ranks} asks for more ranks than the {gpus} GPUs")
        return data_parallel.launch(ranks, train, args | {"params": params})
    echo = echo if rank == 0 else lambda _: None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # rank 0 alone writes `out`: one run at a time holds its lock
    lock = Location.of(out).writer_lock("training run", "directory")
    with lock if rank == 0 else contextlib.nullcontext():
        return _run(params, inputs, dev, out, resume, progress_bar, echo, on_epoch_end)


def _run(
    params: Params,
    inputs: Inputs,
    dev: torch.device,
    out: Path,
    resume: bool,
    progress_bar: bool,
    echo: Callable[[str], None],
    on_epoch_end: Callable[[int], None] | None,
) -> Progress:
    """`train`'s run in this process, once its inputs, device and lock are settled."""
    rank = data_parallel.rank_and_world()[0]
    deterministic = torch.are_deterministic_algorithms_enabled()
    # deterministic kernels cost nothing on the CPU; the caller's setting is restored afterwards
    torch.use_deterministic_algorithms(deterministic or dev.type == "cpu")
    try:
        s = make_session(params, inputs, data_parallel.setup(dev))
        config = run_config(params, inputs, s.model)
        progress = _start(s, out, config, params.train, resume, echo)
        s.net = data_parallel.wrap(s.model, s.device)
        _announce(s, params, echo)
        progress = run_epochs(
            s,
            params.train,
            progress,
            out=out,
            config=config,
            echo=echo,
            progress_bar=progress_bar and rank == 0,
            on_epoch_end=on_epoch_end,
        )
    finally:
        torch.use_deterministic_algorithms(deterministic)
    if progress.best_epoch:
        metric = progress.log[progress.best_epoch - 1]["metric"]
        best = f"epoch {progress.best_epoch}, {metric} {100 * progress.best_score:.2f}%"
        echo(f"best checkpoint: {out / BEST} ({best})")
    if params.train.selection == "test":
        echo(f"WARNING: {SELECTED_ON_TEST}")
    return progress


def _announce(s: Session, params: Params, echo: Callable[[str], None]) -> None:
    """Echo what the run trains on, and how."""
    val = s.val_loader.num_samples if s.val_loader is not None else 0
    world = data_parallel.rank_and_world()[1]
    if world > 1:
        ranks = f"{world} ranks x {params.train.batch_size // world}"
    else:
        ranks = f"batch {params.train.batch_size}"
    precision = params.train.precision if s.amp_dtype else "fp32"
    memory = s.train_loader.memory_bound_bytes / 2**20
    echo(
        f"training on {s.train_loader.num_samples} images ({val} held out for validation), "
        f"{len(s.train_loader)} batches/epoch ({ranks}), device {s.device}, {precision}; "
        f"loader memory bound {memory:.0f} MiB"
    )
    if params.train.selection == "test":
        echo(f"WARNING: {SELECTED_ON_TEST}")
