"""What a batch run leaves beside its masks: manifest, lesion table, sidecars, QC pictures, index page.

One concept per module: :mod:`~pipeline.report.manifest` (run manifest CSV/JSON),
:mod:`~pipeline.report.lesions` (per-lesion statistics), :mod:`~pipeline.report.sidecar` (provenance per
mask), :mod:`~pipeline.report.fingerprint` (when a mask can be kept on a re-run),
:mod:`~pipeline.report.qc` (PNG), :mod:`~pipeline.report.html` (``index.html``),
:mod:`~pipeline.report.lock` (one run per output folder), :mod:`~pipeline.report.outputs` (file names,
shards) and :mod:`~pipeline.report.merge` (``medseg manifest``). matplotlib is imported by ``qc`` only.
"""

from pipeline.report.lesions import LESION_COLUMNS, Lesion, lesion_stats, write_lesions_csv
from pipeline.report.manifest import MANIFEST_COLUMNS, Manifest, read_manifest_json
from pipeline.report.merge import rebuild_reports
from pipeline.report.outputs import CaseOutputs, RunFiles, Shard

__all__ = [
    "LESION_COLUMNS", "MANIFEST_COLUMNS", "CaseOutputs", "Lesion", "Manifest", "RunFiles", "Shard",
    "lesion_stats", "read_manifest_json", "rebuild_reports", "write_lesions_csv",
]
