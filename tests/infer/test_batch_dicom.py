"""``segment_folder`` on DICOM sources: what reading assumed reaches the sidecar; a DICOM SEG that cannot
be written never costs the case its mask (``dicom_seg_error``)."""

from __future__ import annotations

import json

import numpy as np
import pydicom

from pipeline.config import InputConfig
from pipeline.infer import segment_folder
from pipeline.io.dicom_write import write_dicom_series
from tests.conftest import make_affine
from tests.helpers import ct_case
from tests.infer.test_batch import SHAPE, _one_thread, segmenter  # noqa: F401  (fixtures)


def _ct_series(folder, seed=3):
    return write_dicom_series(ct_case(SHAPE, seed=seed)[0].astype(np.int16), make_affine("RAS"), folder)


def test_assumptions_are_recorded_in_the_sidecar(tmp_path, segmenter):
    for path in _ct_series(tmp_path / "in" / "ct"):
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        ds.save_as(path)
    refused = segment_folder(tmp_path / "in", tmp_path / "out", segmenter)
    assert refused[0].status == "failed" and "input.on_missing_spacing=assume" in refused[0].error

    results = segment_folder(tmp_path / "in", tmp_path / "out2", segmenter,
                             select=InputConfig(on_missing_spacing="assume"))
    assert results[0].status == "done", results[0].error
    sidecar = json.loads((tmp_path / "out2" / "ct_seg.json").read_text())
    assert sidecar["assumptions"] == ["in-plane spacing 1 x 1 mm (no PixelSpacing)"]
