"""Stage-two commands: `qks train`, `qks evaluate` and `qks import-checkpoint`. CLIP is never loaded
by the first two.

Hyperparameters come from `--params` (sections `model`, `train`, `evaluate`); paths from the command
line.
"""

from __future__ import annotations

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
    train_cache, labels, out, test_cache, params, device, resume, progress, nproc, any_split
) -> None:
    """Train the QKS head from the feature cache (stage two). Rerun the same command to resume after
    a kill.

    Writes best/last checkpoints, config.json, train_log.csv and its plot train_curves.png into OUT.
    """
    from qks_pipeline.stage_two.checkpoint import LOG
    from qks_pipeline.stage_two.plots import plot_training
    from qks_pipeline.stage_two.train import train

    params.train.nproc = nproc or params.train.nproc
    kwargs = dict(
        test_path=test_cache, device=device, resume=resume, progress_bar=progress, echo=click.echo
    )
    train(train_cache, labels, out, params=params, any_split=any_split, **kwargs)
    plot_training(out / LOG, out / "train_curves.png")


@click.command("evaluate")
@click.option(
    "--checkpoint",
    type=EXISTING_DIR,
    help="A `qks train` (or `qks import-checkpoint`) output directory.",
)
@click.option(
    "--test-cache", required=True, type=EXISTING_STORE, help="Test feature store (stage one)."
)
@click.option(
    "--labels", required=True, type=EXISTING_STORE, help="Label-embedding store (stage one)."
)
@click.option("--out", required=True, type=NEW_FILE, help="Metrics JSON (fractions in [0, 1]).")
@click.option(
    "--per-label",
    type=NEW_FILE,
    help="CSV per label: AP, what it lacks to be scored, positives, negatives; and its plot beside it (.png).",
)
@click.option(
    "--query-preference",
    type=NEW_FILE,
    help="CSV: per label, how often each query wins on its positives [default: OUT's name + .query_preference.csv].",
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
    checkpoint,
    test_cache,
    labels,
    out,
    per_label,
    query_preference,
    baseline,
    params,
    device,
    any_split,
):
    """Score the test cache on seen + unseen labels; write ZSL / GZSL / seen metrics and the
    query-preference table."""
    from qks_pipeline.stage_two.evaluate import evaluate

    tables = dict(per_label=per_label, query_table=query_preference)
    kwargs = dict(
        checkpoint=checkpoint,
        baseline=baseline,
        device=device,
        any_split=any_split,
        echo=click.echo,
    )
    evaluate(test_cache, labels, out, params=params.evaluate, **tables, **kwargs)
    if per_label is not None:
        from qks_pipeline.stage_two.plots import plot_per_label_ap

        plot_per_label_ap(per_label, per_label.with_suffix(".png"))


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
    help="The run's saved arguments (JSON or YAML, options by name): `rmcls: true` there means --no-cls.",
)
@click.option(
    "--trust-pickle", is_flag=True, help="Unpickle arbitrary objects (only for a trusted file)."
)
def import_checkpoint_cmd(file, out, model, num_heads, no_cls, run_args, trust_pickle) -> None:
    """Convert an authors' QKS checkpoint for `qks evaluate` (and export its CLIP weights for `qks
    extract`)."""
    from qks_pipeline.stage_two.authors_checkpoint import import_checkpoint, removed_cls

    keep_cls = not (no_cls or (run_args is not None and removed_cls(run_args)))
    kwargs = dict(
        num_heads=num_heads, keep_cls=keep_cls, trust_pickle=trust_pickle, echo=click.echo
    )
    import_checkpoint(file, out, model=model, **kwargs)


COMMANDS = [train_cmd, evaluate_cmd, import_checkpoint_cmd]
