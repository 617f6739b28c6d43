"""Stage-two commands: `qks train`, `qks evaluate` and `qks import-checkpoint`.

CLIP is never loaded by the first two. Hyperparameters come from `--params` (sections `model`,
`train`, `evaluate`); paths from the command line.
"""

from __future__ import annotations

from pathlib import Path

import click

from qks_pipeline.cli.options import (
    DEVICE,
    EXISTING_DIR,
    EXISTING_FILE,
    EXISTING_STORE,
    NEW_DIR,
    NEW_FILE,
    params_options,
)
from qks_pipeline.config import Params

ANY_SPLIT = click.option(
    "--any-split",
    is_flag=True,
    help="Accept a store of the other split (train on test, evaluate on train): a leak.",
)


@click.command("train")
@click.option(
    "--train-cache", required=True, type=EXISTING_STORE, help="Training feature store (stage one)."
)
@click.option(
    "--labels", required=True, type=EXISTING_STORE, help="Label-embedding store (stage one)."
)
@click.option(
    "--out",
    required=True,
    type=NEW_DIR,
    help="Output directory: checkpoints, config.json, train_log.csv.",
)
@click.option(
    "--test-cache", type=EXISTING_STORE, help="Test store; required by train.selection 'test'."
)
@params_options("model, train, evaluate")
@DEVICE
@click.option(
    "--resume/--no-resume", default=True, show_default=True, help="Continue a run found in --out."
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Show a progress bar per epoch.",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    help="Data-parallel processes on this machine [train.nproc].",
)
@ANY_SPLIT
def train_cmd(
    train_cache: str | Path,
    labels: str | Path,
    out: Path,
    test_cache: str | Path | None,
    params: Params,
    device: str,
    resume: bool,
    progress: bool,
    nproc: int | None,
    any_split: bool,
) -> None:
    """Train the QKS head from the feature cache (stage two).
    Rerun the same command to resume after a kill.

    Writes best/last checkpoints, config.json, train_log.csv and its plot train_curves.png into OUT.
    """
    from qks_pipeline.stage_two.checkpoint import LOG
    from qks_pipeline.stage_two.plots import plot_training
    from qks_pipeline.stage_two.train import train

    if nproc is not None:
        params.train.nproc = nproc
    train(
        train_cache,
        labels,
        out,
        params=params,
        test_path=test_cache,
        device=device,
        resume=resume,
        progress_bar=progress,
        any_split=any_split,
        echo=click.echo,
    )
    plot_training(out / LOG, out / "train_curves.png")


@click.command("evaluate")
@click.option(
    "--checkpoint",
    type=EXISTING_DIR,
    help="A `qks train` (or `qks import-checkpoint`) output directory.",
)
@click.option(
    "--test-cache", type=EXISTING_STORE, help="Test feature store (stage one); or give --index."
)
@click.option(
    "--index",
    type=EXISTING_STORE,
    help="A query index of the test store (`qks index`): the head's scores without its forward "
    "pass; instead of --checkpoint and --test-cache.",
)
@click.option(
    "--labels", required=True, type=EXISTING_STORE, help="Label-embedding store (stage one)."
)
@click.option(
    "--out",
    required=True,
    type=NEW_FILE,
    help="Metrics JSON: the paper's table numbers (fractions in [0, 1]); the rest (counts, "
    "protocol, selection, notes) in OUT's name + _details.json beside it.",
)
@click.option(
    "--per-label",
    type=NEW_FILE,
    help="CSV per label: AP, what it lacks to be scored, positives, negatives; "
    "and its plot beside it (.png).",
)
@click.option(
    "--query-preference",
    type=NEW_FILE,
    help="CSV: per label, how often each query wins on its positives "
    "[default: OUT's name + .query_preference.csv].",
)
@click.option(
    "--baseline",
    type=click.Choice(["clip"]),
    help="Also (or, without --checkpoint, only) CLIP zero-shot.",
)
@params_options("model, train, evaluate")
@DEVICE
@ANY_SPLIT
def evaluate_cmd(
    checkpoint: Path | None,
    test_cache: str | Path | None,
    index: str | Path | None,
    labels: str | Path,
    out: Path,
    per_label: Path | None,
    query_preference: Path | None,
    baseline: str | None,
    params: Params,
    device: str,
    any_split: bool,
) -> None:
    """Score the test cache on seen + unseen labels; write ZSL / GZSL / seen metrics
    and the query-preference table."""
    from qks_pipeline.index.evaluation import evaluate_index
    from qks_pipeline.stage_two.evaluate import evaluate

    if index is not None and (checkpoint or test_cache or baseline):
        raise click.UsageError(
            "--index holds the head's outputs and the test labels: give it without --checkpoint, "
            "--test-cache and --baseline"
        )
    if index is None and test_cache is None:
        raise click.UsageError("Missing option '--test-cache' (or give --index).")
    if index is not None:
        evaluate_index(
            index,
            labels,
            out,
            params=params.evaluate,
            per_label=per_label,
            query_table=query_preference,
            device=device,
            any_split=any_split,
            echo=click.echo,
        )
    else:
        evaluate(
            test_cache,
            labels,
            out,
            checkpoint=checkpoint,
            params=params.evaluate,
            per_label=per_label,
            query_table=query_preference,
            baseline=baseline,
            device=device,
            any_split=any_split,
            echo=click.echo,
        )


@click.command("import-checkpoint")
@click.argument("file", type=EXISTING_FILE)
@click.option(
    "--out",
    required=True,
    type=NEW_DIR,
    help="Directory for best.safetensors, config.json, CLIP weights.",
)
@click.option(
    "--model",
    default="ViT-B-16-quickgelu",
    show_default=True,
    help="open_clip model (name or config .json) the CLIP weights belong to.",
)
@click.option(
    "--num-heads", default=12, show_default=True, type=click.IntRange(min=1), help="Q-Former heads."
)
@click.option(
    "--no-cls",
    is_flag=True,
    help="The run was trained with the authors' --rmcls (queries never see CLS).",
)
@click.option(
    "--run-args",
    type=EXISTING_FILE,
    help="The run's saved arguments (JSON or YAML, options by name): "
    "`rmcls: true` there means --no-cls.",
)
@click.option(
    "--trust-pickle", is_flag=True, help="Unpickle arbitrary objects (only for a trusted file)."
)
def import_checkpoint_cmd(
    file: Path,
    out: Path,
    model: str,
    num_heads: int,
    no_cls: bool,
    run_args: Path | None,
    trust_pickle: bool,
) -> None:
    """Convert an authors' QKS checkpoint for `qks evaluate`
    (and export its CLIP weights for `qks extract`)."""
    from qks_pipeline.stage_two.authors_checkpoint import import_checkpoint, removed_cls

    removed = no_cls or (run_args is not None and removed_cls(run_args))
    import_checkpoint(
        file,
        out,
        model=model,
        num_heads=num_heads,
        keep_cls=not removed,
        trust_pickle=trust_pickle,
        echo=click.echo,
    )


COMMANDS: list[click.Command] = [train_cmd, evaluate_cmd, import_checkpoint_cmd]
