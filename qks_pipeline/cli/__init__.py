"""The `qks` command line: one click group; each area of the pipeline adds its own commands."""

from __future__ import annotations

import click

from qks_pipeline.cli import data, index, predict, stage_one, stage_two
from qks_pipeline.devices import quiet_cpu_waits
from qks_pipeline.errors import QKSError


class QKSGroup(click.Group):
    """The edge where library errors become click's one-line errors (exit 1).

    A `QKSError`, and an OSError that reaches the top (a full disk, a read-only or unreadable path)
    named by its file.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QKSError as e:
            raise click.ClickException(e.message) from None
        except OSError as e:
            if e.errno is None:
                raise
            message = QKSError(e.strerror or str(e), e.filename).message
            raise click.ClickException(message) from None


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


@click.group(cls=QKSGroup, context_settings=CONTEXT)
@click.version_option(package_name="qks_pipeline")
def main() -> None:
    """QKS open-vocabulary multi-label classification on cached CLIP features.

    \b
    Stage one (once):   qks extract, qks embed-labels  -> Zarr feature caches
    Stage two (often):  qks train, qks evaluate        -> from the caches only, CLIP never loaded
    Tagging:            qks predict                    -> any label list on new images
    Query index:        qks index, qks tag|search|serve -> a whole collection, any label list
    Data:               qks import FORMAT, qks manifest check, qks cache info|verify
    """
    # before any command loads torch: OpenMP reads its wait policy once (README, "Threads")
    quiet_cpu_waits()


for module in (data, stage_one, stage_two, predict, index):
    for command in module.COMMANDS:
        main.add_command(command)
