"""The reader's DICOM geometry equals dcm2niix's on real scans (../shared/data/dicom/*/Ref).

Voxel values identical, affine within 0.05 mm. Skipped with a reason when the shared data is absent.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from pipeline.io.reader import ScanReader

SERIES = [
    ("dcm_qa_ge/In/05_3D_Ax_T1_MP_RAGE_R22", "dcm_qa_ge/Ref/3D_Ax_T1_MP-RAGE_R22_5.nii.gz"),  # GE axial, LPS
    ("dcm_qa_frag/In/5001_anat-T1w_acq-tfl", "dcm_qa_frag/Ref/anat-T1w_acq-tfl_5001.nii"),  # sagittal, JPEG lossless
    ("dcm_qa_frag/In/6001_anat-T1w_acq-tfl", "dcm_qa_frag/Ref/anat-T1w_acq-tfl_6001.nii"),  # sagittal, JPEG 2000
]


@pytest.mark.parametrize("series, reference", SERIES, ids=["ge-axial", "siemens-sagittal-jpegll", "siemens-sagittal-j2k"])
def test_dicom_series_matches_dcm2niix(shared_data, series, reference):
    folder, ref_path = shared_data / "dicom" / series, shared_data / "dicom" / reference
    if not folder.is_dir() or not ref_path.is_file():
        pytest.skip(f"sample series not present: {folder}")
    reader = ScanReader()
    array, meta = reader.get_data(reader.read(str(folder)))
    ref = nib.load(str(ref_path))

    assert array.shape == ref.shape
    np.testing.assert_array_equal(array.astype(np.int32), np.asarray(ref.dataobj).astype(np.int32))
    np.testing.assert_allclose(meta["affine"], ref.affine, atol=0.05)
    assert meta["source_format"] == "dicom"
