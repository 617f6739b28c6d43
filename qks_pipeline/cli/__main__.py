"""`python -m qks_pipeline.cli ...` is `qks ...` (for `torchrun`: it starts a module per rank)."""

from qks_pipeline.cli import main

main(prog_name="qks")
