"""QKS (Query-Based Knowledge Sharing) open-vocabulary multi-label classification on cached CLIP
features.

The package, in the order the data flows (docs/design.md explains each step and its sources):

    data/       manifests (which image has which labels), dataset importers, image decoding
    stage_one/  once per image: the frozen CLIP backbone, extraction into a feature store, the
                label vocabulary's embeddings (in this process or on a dask cluster)
    store/      the feature and label stores (Zarr v3, sharded, checksummed), their fingerprints,
                the shard reader, HDF5 interchange
    stage_two/  from the cache only: the QKS head, its losses, the loader, training, scoring,
                metrics, evaluation, checkpoints
    predict/    tagging new images with any label list, and the HTML page of the results
    index/      the query index: a collection's query outputs, stored once and scored against
                any vocabulary (tag, search, a local web page, evaluation)
    cli/        the `qks` command line, the only place that knows click

The root holds what every layer uses: `config` (params.yaml's sections), `errors`, `devices` and
`atomic` (files written whole or not at all).

The entry points a Python user needs are importable from here; each loads its module on first use,
so `import qks_pipeline` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qks_pipeline.config import Params, load_params
    from qks_pipeline.index.index import Index
    from qks_pipeline.predict.tagger import Tagger
    from qks_pipeline.stage_one.extract import embed_labels, extract
    from qks_pipeline.stage_two.evaluate import evaluate
    from qks_pipeline.stage_two.train import train

# public name -> the module that defines it
_EXPORTS = {
    "Params": "qks_pipeline.config",
    "load_params": "qks_pipeline.config",
    "extract": "qks_pipeline.stage_one.extract",
    "embed_labels": "qks_pipeline.stage_one.extract",
    "train": "qks_pipeline.stage_two.train",
    "evaluate": "qks_pipeline.stage_two.evaluate",
    "Tagger": "qks_pipeline.predict.tagger",
    "Index": "qks_pipeline.index.index",
}

__all__ = [
    "Index",
    "Params",
    "Tagger",
    "embed_labels",
    "evaluate",
    "extract",
    "load_params",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qks_pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
