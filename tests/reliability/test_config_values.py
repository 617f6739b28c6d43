"""Every bounded config value, just out of its range (or NaN, infinite, an empty list), by `--set`
and in a params file: refused in one line naming the key, before `qks train` writes anything."""

from __future__ import annotations

from tests.reliability.faults.config_values import bounded_keys, config_bounds
from tests.reliability.faults.training import make_train_setup


def test_every_out_of_bounds_value_is_refused_naming_its_key(tmp_path):
    setup = make_train_setup(tmp_path / "setup", num_train=128, epochs=1)
    outcome = config_bounds(tmp_path / "values", setup)
    assert len(bounded_keys()) >= 20 and outcome.trials >= 2 * len(bounded_keys())
    assert outcome.clean and outcome.unclear == 0, outcome.notes
