"""``medseg validate`` / :func:`pipeline.io.validate.validate_dicom`: dciodvfy's errors are found and
reported (so the "0 errors" of the other tests means something), warnings listed."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.io import validate
from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.reader import ScanReader
from pipeline.io.rtstruct import write_rtstruct
from tests.conftest import make_affine
from tests.dicom_validate import SKIP_REASON


@pytest.fixture
def rtstruct(tmp_path):
    if not validate.dciodvfy_available():
        pytest.skip(SKIP_REASON)
    files = write_dicom_series(np.zeros((12, 10, 4), np.int16), make_affine("LPS"), tmp_path / "series")
    reader = ScanReader()
    array, meta = reader.get_data(reader.read(tmp_path / "series"))
    mask = np.zeros(array.shape, np.uint8)
    mask[3:7, 2:6, 1:3] = 1
    return write_rtstruct(mask, meta["affine"], files, tmp_path / "rt.dcm", ["background", "lesion"])


def test_valid_file_passes(rtstruct, capsys):
    result = validate.validate_dicom(rtstruct)
    assert result.iod == "RTStructureSet" and result.errors == []
    assert main(["validate", str(rtstruct)]) == 0
    assert f"{rtstruct}: RTStructureSet: 0 error(s)" in capsys.readouterr().out


def test_missing_required_attribute_is_an_error(rtstruct, tmp_path, capsys):
    ds = pydicom.dcmread(rtstruct)
    del ds.StructureSetLabel  # type 1 in the Structure Set module
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    result = validate.validate_dicom(broken)
    assert any("Structure Set Label" in line or "StructureSetLabel" in line for line in result.errors), result
    assert main(["validate", str(rtstruct), str(broken)]) == 1
    out = capsys.readouterr().out
    assert f"{broken}: RTStructureSet: {len(result.errors)} error(s)" in out and "Error - " in out


def test_missing_validator_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(validate.shutil, "which", lambda name: None)
    with pytest.raises(InputError, match="install the Debian package dicom3tools"):
        validate.validate_dicom(tmp_path / "x.dcm")
    assert main(["validate", str(tmp_path / "x.dcm")]) == 2
