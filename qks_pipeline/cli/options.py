"""Options and parameter types that several commands share, each defined once.

Hyperparameters have one override mechanism on every stage command: `--params params.yaml` then
`--set SECTION.KEY=VALUE` (repeatable), both checked by `qks_pipeline.config`, which holds every
default. Paths and the device, which people type daily, are plain options.
"""

from __future__ import annotations

from pathlib import Path

import click

from qks_pipeline.config import Params, load_params
from qks_pipeline.store.location import is_url, local_path

EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
# an output file: refused at once when a directory is given
NEW_FILE = click.Path(dir_okay=False, path_type=Path)
# an output directory: refused at once when a file is given
NEW_DIR = click.Path(file_okay=False, path_type=Path)


class StoreParam(click.ParamType):
    """A store: a local directory (must exist when `exists`) or a URL (checked when opened).

    A URL is s3://bucket/train.zarr and the like.
    """

    name = "store"

    def __init__(self, exists: bool = False):
        self.exists = exists

    def convert(
        self, value: str | Path, param: click.Parameter | None, ctx: click.Context | None
    ) -> str | Path:
        if is_url(value):
            return value
        path = click.Path(exists=self.exists, file_okay=False, path_type=Path)
        return path.convert(str(local_path(value)), param, ctx)


STORE = StoreParam()
EXISTING_STORE = StoreParam(exists=True)

DEVICE = click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA when present) | cpu | cuda[:N]"
)


def params_options(sections: str):
    """`--params FILE` and repeatable `--set SECTION.KEY=VALUE`: one `params: Params` argument."""

    def to_params(ctx: click.Context, _: click.Parameter, sets: tuple[str, ...]) -> Params:
        # what the user set by hand, for checks that only apply then
        ctx.meta["qks.sets"] = sets
        return load_params(ctx.params.pop("params_file", None), sets)

    help_set = "Override one hyperparameter (repeatable), e.g. --set train.lr=3e-5."
    sets = click.option(
        "--set",
        "params",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        callback=to_params,
        help=help_set,
    )
    help_file = f"params.yaml (sections {sections}) [default: the built-in defaults]."
    file = click.option(
        "--params", "params_file", type=EXISTING_FILE, is_eager=True, help=help_file
    )
    return lambda f: file(sets(f))
