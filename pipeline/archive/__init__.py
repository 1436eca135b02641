"""DICOMweb archives (PACS) as a source and a sink: ``medseg segment dicomweb+http://HOST:PORT/dicom-web OUT``.

:mod:`~pipeline.archive.url` (the ``dicomweb+`` address), :mod:`~pipeline.archive.credentials` (basic or
bearer, from the environment or a 0600 file), :mod:`~pipeline.archive.client` (a ``dicomweb-client``
session: auth, TLS, timeout, request count), :mod:`~pipeline.archive.query` (QIDO-RS: which series),
:mod:`~pipeline.archive.state` (resume by SeriesInstanceUID + model fingerprint, pushed state),
:mod:`~pipeline.archive.fetch` (WADO-RS into a bounded cache folder, in a background thread),
:mod:`~pipeline.archive.push` (STOW-RS of the SEG/RTSTRUCT files) and :mod:`~pipeline.archive.run`
(``segment_archive``: the cache folder goes through the same discovery and batch run as any folder).
"""

from __future__ import annotations

_API = {
    "segment_archive": "pipeline.archive.run",
    "is_archive_url": "pipeline.archive.url",
    "parse_archive_url": "pipeline.archive.url",
    "load_credentials": "pipeline.archive.credentials",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline.archive' has no attribute {name!r}")
