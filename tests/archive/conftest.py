"""Fixtures of the archive tests: a real Orthanc (DICOMweb plugin) per test, and the studies it holds.

``orthanc`` starts ``/usr/sbin/Orthanc`` on free loopback ports with basic auth (user ``medseg``, the
password :data:`PASSWORD`) and stops it after the test; it skips with a one-line reason when the Debian
packages ``orthanc orthanc-dicomweb`` are missing. ``ct_studies`` uploads two synthetic CT studies
(lesions of 150 HU, known masks); ``real_series`` copies the real ct-3slice, GE MR and Siemens sagittal
series from ``../shared/data`` into tmp and uploads them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.archive.orthanc_server import OrthancServer, skip_reason

USER = "medseg"
PASSWORD = "pw-Zq8#not-in-any-log"

REAL_SERIES = {  # name -> folder under ../shared/data
    "ct3": "seg/dcmqi/ct-3slice",
    "ge_mr": "dicom/dcm_qa_ge/In/05_3D_Ax_T1_MP_RAGE_R22",
    "siemens_sag": "dicom/dcm_qa_frag/In/5001_anat-T1w_acq-tfl",
}


@pytest.fixture
def orthanc(tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = OrthancServer(tmp_path / "orthanc", users={USER: PASSWORD}).start()
    try:
        yield server
    finally:
        server.stop()


def write_ct_studies(root: Path, n: int = 2) -> dict:
    """``n`` synthetic CT studies (one series each, a patient name that must never reach an output):
    ``{folder name: (files, label)}``."""
    from pipeline.io.dicom_write import write_dicom_series
    from tests.conftest import make_affine
    from tests.helpers import ct_case

    studies = {}
    for k in range(n):
        image, label = ct_case((40, 36, 12), seed=10 + k)
        files = write_dicom_series(image.astype(np.int16), make_affine("LPS", spacing=(0.8, 0.9, 2.5)),
                                   root / f"synth{k}", patient_id=f"PID-SECRET-{k}", patient_name=f"DOE^JANE{k}",
                                   series_description="synthetic CT", uid_entropy=[f"archive-test-{k}"],
                                   study_date="20240315")
        studies[f"synth{k}"] = (files, label)
    return studies


@pytest.fixture
def ct_studies(orthanc, tmp_path) -> dict:
    studies = write_ct_studies(tmp_path / "ct")
    for files, _ in studies.values():
        assert orthanc.upload(files) == len(files)
    return studies


@pytest.fixture
def real_series(orthanc, tmp_path, shared_data) -> dict:
    """The real series, copied into tmp and uploaded: ``{name: [files]}``."""
    copies = {}
    for name, relative in REAL_SERIES.items():
        target = tmp_path / "real" / name
        shutil.copytree(shared_data / relative, target)
        files = sorted(p for p in target.iterdir() if p.is_file())
        assert orthanc.upload(files) == len(files)
        copies[name] = files
    return copies
