"""Importers: turn a dataset's own published files into a dataset directory (see data_manifests/README.md).

One module per format; each exposes one `import_*` function that writes `train.jsonl`, `test.jsonl`, `seen.txt` and
`unseen.txt` through `manifest.write_dataset` (all or nothing) and returns an `ImportReport`.
"""

from qks_pipeline.importers.coco import import_coco
from qks_pipeline.importers.common import ImportReport, import_manifest
from qks_pipeline.importers.hdf5 import import_hdf5
from qks_pipeline.importers.nuswide import import_nuswide
from qks_pipeline.importers.openimages import import_openimages
from qks_pipeline.importers.reference_csv import import_reference_csv

__all__ = [
    "ImportReport",
    "import_coco",
    "import_hdf5",
    "import_manifest",
    "import_nuswide",
    "import_openimages",
    "import_reference_csv",
]
