"""What a batch run leaves beside its masks: manifest, lesion table, sidecars, QC pictures, index page.

One concept per module: :mod:`~pipeline.batch.report.manifest` (run manifest CSV/JSON),
:mod:`~pipeline.batch.report.lesions` (per-lesion statistics), :mod:`~pipeline.batch.report.sidecar` (provenance per
mask), :mod:`~pipeline.batch.report.fingerprint` (when a mask can be kept on a re-run),
:mod:`~pipeline.batch.report.qc` (PNG), :mod:`~pipeline.batch.report.html` (``index.html``),
:mod:`~pipeline.batch.report.lock` (one run per output folder), :mod:`~pipeline.batch.report.outputs` (file names,
shards) and :mod:`~pipeline.batch.report.merge` (``medseg manifest``). matplotlib is imported by ``qc`` only.
"""

from pipeline.batch.report.lesions import LESION_COLUMNS, Lesion, lesion_stats, write_lesions_csv
from pipeline.batch.report.manifest import MANIFEST_COLUMNS, Manifest, read_manifest_json
from pipeline.batch.report.merge import rebuild_reports
from pipeline.batch.report.outputs import CaseOutputs, RunFiles, Shard

__all__ = [
    "LESION_COLUMNS", "MANIFEST_COLUMNS", "CaseOutputs", "Lesion", "Manifest", "RunFiles", "Shard",
    "lesion_stats", "read_manifest_json", "rebuild_reports", "write_lesions_csv",
]
