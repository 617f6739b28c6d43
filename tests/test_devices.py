"""How CPU threads wait: OMP_WAIT_POLICY=PASSIVE set before torch loads, a user's value kept; the
DVC entry point (`python -m stages`) applies it and its help works for every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qks_pipeline.devices import CPU_WAITS, quiet_cpu_waits
from stages.__main__ import with_params

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import os, sys\n"
    "from qks_pipeline.devices import quiet_cpu_waits\n"
    "assert 'torch' not in sys.modules\n"
    "print(quiet_cpu_waits(), os.environ.get('OMP_WAIT_POLICY'))\n"
)


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_waits_are_passive_unless_the_user_says_otherwise():
    assert CPU_WAITS == {"OMP_WAIT_POLICY": "PASSIVE"}
    # importing the module loads no torch, so the policy can be set first
    assert _python(PROBE) == "True PASSIVE"
    assert _python(PROBE, OMP_WAIT_POLICY="ACTIVE") == "True ACTIVE"


def test_every_qks_command_sets_the_policy_before_torch_loads():
    code = (
        "import os\n"
        "from click.testing import CliRunner\n"
        "from qks_pipeline.cli import main\n"
        "CliRunner().invoke(main, ['cache', 'info', 'no-such-store'])\n"
        "print(os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    assert _python(code) == "PASSIVE"


def test_too_late_once_torch_is_loaded():
    import torch  # noqa: F401  (loaded, as in this test process)

    before = os.environ.get("OMP_WAIT_POLICY")
    assert quiet_cpu_waits() is False and os.environ.get("OMP_WAIT_POLICY") == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["--help"]),
        (["--help"], ["--help"]),
        (["predict", "--help"], ["predict", "--help"]),
        (["train", "-h"], ["train", "-h"]),
        (["train", "--out", "m"], ["train", "--params", "params.yaml", "--out", "m"]),
        (["manifest", "check", "d"], ["manifest", "check", "--params", "params.yaml", "d"]),
        # commands without --params get none
        (["predict", "--checkpoint", "m", "a.jpg"], ["predict", "--checkpoint", "m", "a.jpg"]),
        (["cache", "info", "s.zarr"], ["cache", "info", "s.zarr"]),
        (["manifest"], ["manifest"]),
    ],
)
def test_stages_puts_params_after_the_command_that_takes_them(args, expected):
    assert with_params(args) == expected


@pytest.mark.parametrize(
    "args", [[], ["--help"], ["predict", "--help"], ["manifest", "check", "-h"]]
)
def test_python_m_stages_help_works(args):
    done = subprocess.run(
        [sys.executable, "-m", "stages", *args], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0 and "Usage: python -m stages" in done.stdout, done.stderr
    assert "No such option" not in done.stdout + done.stderr
