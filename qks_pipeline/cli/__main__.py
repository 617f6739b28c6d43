"""`python -m qks_pipeline.cli ...` runs `qks ...` (e.g. under `torchrun`, which starts a module on
every rank)."""

from qks_pipeline.cli import main

main(prog_name="qks")
