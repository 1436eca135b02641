"""Datasets as users ship them (nnU-Net v2, MSD, plain folders): list their cases, check every file.

``read_dataset`` only looks at names and ``dataset.json``; ``check_dataset`` reads every file. Importing
this package imports no heavy library (the scan reader is imported by the check itself).
"""

from __future__ import annotations

from pipeline.dataset.check import CheckReport, check_dataset
from pipeline.dataset.layout import Dataset, DatasetCase, read_dataset
from pipeline.dataset.problem import Problem

__all__ = ["CheckReport", "Dataset", "DatasetCase", "Problem", "check_dataset", "read_dataset"]
