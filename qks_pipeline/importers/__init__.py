"""Importers: turn a dataset's own published files into a dataset directory (see data_manifests/README.md).

One module per format; each exposes one `import_*` function that writes `train.jsonl`, `test.jsonl`, `seen.txt` and
`unseen.txt` through `ImportReport.write` (`manifest.write_dataset`: validated, all or nothing) and returns the report.
"""

from qks_pipeline.importers.coco import import_coco as import_coco
from qks_pipeline.importers.common import ImportReport as ImportReport
from qks_pipeline.importers.common import import_manifest as import_manifest
from qks_pipeline.importers.hdf5 import import_hdf5 as import_hdf5
from qks_pipeline.importers.nuswide import import_nuswide as import_nuswide
from qks_pipeline.importers.openimages import import_openimages as import_openimages
from qks_pipeline.importers.reference_csv import import_reference_csv as import_reference_csv
