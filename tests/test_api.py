"""The public API: the entry points a Python user needs, importable from the package itself, each
documented with its arguments; `import qks_pipeline` alone loads none of them."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import qks_pipeline

ENTRY_POINTS = ["Tagger", "load_params", "extract", "embed_labels", "train", "evaluate"]


def test_the_entry_points_import_from_the_package():
    from qks_pipeline import Tagger, embed_labels, evaluate, extract, load_params, train

    assert callable(train) and callable(evaluate) and callable(extract) and callable(embed_labels)
    assert Tagger.__module__ == "qks_pipeline.predict.tagger"
    assert load_params().train.lr > 0
    assert set(ENTRY_POINTS) <= set(qks_pipeline.__all__)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_each_entry_point_documents_its_arguments(name):
    entry = getattr(qks_pipeline, name)
    function = entry.load if inspect.isclass(entry) else entry
    documented = inspect.getdoc(function) or ""
    assert "Args:" in documented, f"{name}: no Args: section"
    parameters = [p for p in inspect.signature(function).parameters if p not in ("self", "cls")]
    undocumented = [
        p for p in parameters if f"{p}:" not in documented and f"{p}," not in documented
    ]
    assert undocumented == [], f"{name}: {undocumented} not in its Args"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = qks_pipeline.nothing


def test_importing_the_package_loads_no_torch():
    code = "import sys, qks_pipeline; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_all_names_exactly_the_lazy_exports():
    assert sorted(qks_pipeline.__all__) == sorted(qks_pipeline._EXPORTS)
