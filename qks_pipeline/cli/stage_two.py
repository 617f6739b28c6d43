"""Stage-two commands: `qks train`, `qks evaluate` and `qks import-checkpoint`. CLIP is never loaded by the first two.

Hyperparameters come from `--params` (sections `model`, `train`, `evaluate`); paths from the command line.
"""

from __future__ import annotations

from pathlib import Path

import click

from qks_pipeline.config import load_params
from qks_pipeline.storage import StoreParam

EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
NEW_PATH = click.Path(path_type=Path)
STORE = StoreParam(exists=True)  # a feature or label-embedding store: a local directory or a URL (s3://...)
DEVICE = click.option("--device", default="auto", show_default=True, help="auto (CUDA when present) | cpu | cuda[:N]")
PARAMS = click.option("--params", type=EXISTING_FILE, help="params.yaml (sections model, train, evaluate).")


@click.command("train")
@click.option("--train-cache", required=True, type=STORE, help="Training feature store (stage one).")
@click.option("--labels", required=True, type=STORE, help="Label-embedding store (stage one).")
@click.option("--out", required=True, type=NEW_PATH, help="Output directory: checkpoints, config.json, train_log.csv.")
@click.option("--test-cache", type=STORE, help="Test store; required by train.selection 'test'.")
@PARAMS
@DEVICE
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue a run found in --out.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar per epoch.")
def train_cmd(train_cache, labels, out, test_cache, params, device, resume, progress) -> None:
    """Train the QKS head from the feature cache (stage two). Rerun the same command to resume after a kill."""
    from qks_pipeline.train import train

    train(train_cache, labels, out, params=load_params(params), test_path=test_cache, device=device, resume=resume,
          progress_bar=progress, echo=click.echo)  # fmt: skip


@click.command("evaluate")
@click.option("--checkpoint", type=EXISTING_DIR, help="A `qks train` (or `qks import-checkpoint`) output directory.")
@click.option("--test-cache", required=True, type=STORE, help="Test feature store (stage one).")
@click.option("--labels", required=True, type=STORE, help="Label-embedding store (stage one).")
@click.option("--out", required=True, type=NEW_PATH, help="Metrics JSON (fractions in [0, 1]).")
@click.option("--per-label", type=NEW_PATH, help="CSV: label, seen/unseen, AP, positives.")
@click.option("--query-preference", type=NEW_PATH,
              help="CSV: per label, how often each query wins on its positives [default: beside --out].")  # fmt: skip
@click.option("--baseline", type=click.Choice(["clip"]), help="Also (or, without --checkpoint, only) CLIP zero-shot.")
@PARAMS
@DEVICE
def evaluate_cmd(checkpoint, test_cache, labels, out, per_label, query_preference, baseline, params, device) -> None:
    """Score the test cache on seen + unseen labels; write ZSL / GZSL / seen metrics and the query-preference table."""
    from qks_pipeline.evaluate import evaluate

    p = load_params(params)
    evaluate(test_cache, labels, out, checkpoint=checkpoint, params=p.evaluate, per_label=per_label,
             query_table=query_preference, baseline=baseline, device=device, amp=p.train.amp,
             echo=click.echo)  # fmt: skip


@click.command("import-checkpoint")
@click.argument("file", type=EXISTING_FILE)
@click.option("--out", required=True, type=NEW_PATH, help="Directory for best.safetensors, config.json, CLIP weights.")
@click.option("--model", default="ViT-B-16-quickgelu", show_default=True,
              help="open_clip model (name or config .json) the CLIP weights belong to.")  # fmt: skip
@click.option("--num-heads", default=12, show_default=True, type=click.IntRange(min=1), help="Q-Former heads.")
@click.option("--trust-pickle", is_flag=True, help="Unpickle arbitrary objects (only for a trusted file).")
def import_checkpoint_cmd(file, out, model, num_heads, trust_pickle) -> None:
    """Convert an authors' QKS checkpoint for `qks evaluate` (and export its CLIP weights for `qks extract`)."""
    from qks_pipeline.train import import_checkpoint

    import_checkpoint(file, out, model=model, num_heads=num_heads, trust_pickle=trust_pickle, echo=click.echo)


COMMANDS = [train_cmd, evaluate_cmd, import_checkpoint_cmd]
