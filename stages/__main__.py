"""`python -m stages COMMAND ARGS...` = `qks COMMAND --params params.yaml ARGS...`.

`--params params.yaml` goes after the command's name (`manifest check` is two words), and only to
a command that takes it; a call for help (none, `--help`, `COMMAND --help`) passes as given.
"""

import sys
from collections.abc import Sequence

import click

from qks_pipeline.cli import main

PARAMS = ["--params", "params.yaml"]
HELP = {"-h", "--help"}


def with_params(args: Sequence[str]) -> list[str]:
    """`args` with `PARAMS` after the words that name the command, when the command takes them."""
    command: click.Command = main
    words = []
    rest = list(args)
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        command = command.commands[rest[0]]
        words.append(rest.pop(0))
    takes_params = any("--params" in option.opts for option in command.params)
    if not words or not takes_params or HELP & set(rest):
        return list(args) or ["--help"]
    return [*words, *PARAMS, *rest]


if __name__ == "__main__":
    main(with_params(sys.argv[1:]), prog_name="python -m stages")
