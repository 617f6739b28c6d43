"""`python -m stages COMMAND ARGS...` = `qks COMMAND --params params.yaml ARGS...`."""

import sys

from qks_pipeline.cli import main

if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["--help"]
    main([command, "--params", "params.yaml", *args], prog_name="python -m stages")
