"""DICOM voxel sizes the headers do not give are refused, or assumed with a warning and recorded
(``input.on_missing_spacing``); mosaics count their real slices; per-slice rescale is applied per slice."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.cli import main
from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.discover import discover
from pipeline.io.reader import ScanReader
from tests.conftest import make_affine
from tests.helpers import hu_volume

SHAPE = (12, 10, 6)
ASSUME = InputConfig(on_missing_spacing="assume")


def _series(folder: Path, shape=SHAPE, seed=0, **kwargs) -> tuple[np.ndarray, list[Path]]:
    volume = hu_volume(shape, seed=seed)
    return volume, write_dicom_series(volume, make_affine("RAS"), folder, uid_entropy=[str(folder)], **kwargs)


def _remove(paths, *keywords, **values) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def _only_case(folder: Path, select: InputConfig | None = None):
    found = discover(folder, select)
    assert len(found.cases) == 1, (found.cases, found.skipped)
    return found.cases[0]


def _read(case):
    reader = ScanReader()
    return reader.get_data(reader.read(case.reader_input))


def _spacing(affine) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


# --- in-plane spacing ------------------------------------------------------------------------------


def test_missing_pixel_spacing_is_refused_naming_series_tag_and_key(tmp_path):
    _, paths = _series(tmp_path / "in" / "nospacing")
    _remove(paths, "PixelSpacing")
    case = _only_case(tmp_path / "in")
    with pytest.raises(InputError) as error:
        _read(case)
    message = str(error.value)
    assert "\n" not in message
    for part in ("case nospacing", "CT series 1", "PixelSpacing (0028,0030)", "input.on_missing_spacing=assume"):
        assert part in message


def test_missing_pixel_spacing_assumed_with_warning_and_recorded(tmp_path, caplog):
    volume, paths = _series(tmp_path / "in" / "nospacing")
    _remove(paths, "PixelSpacing")
    case = _only_case(tmp_path / "in", ASSUME)
    with caplog.at_level(logging.WARNING, logger="pipeline.io.dicom_stack"):
        array, meta = _read(case)
    np.testing.assert_array_equal(array, volume)
    np.testing.assert_allclose(_spacing(meta["affine"]), [1.0, 1.0, 2.5], atol=1e-6)
    assert case.volume.assumptions == ["in-plane spacing 1 x 1 mm (no PixelSpacing)"]
    assert any("input.on_missing_spacing=assume" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_imager_pixel_spacing_is_used_only_as_an_assumption(tmp_path):
    _, paths = _series(tmp_path / "in" / "imager")
    _remove(paths, "PixelSpacing", ImagerPixelSpacing=[0.6, 0.7])
    with pytest.raises(InputError, match=r"only ImagerPixelSpacing \(0018,1164\), 0.6 x 0.7 mm at the detector"):
        _read(_only_case(tmp_path / "in"))
    case = _only_case(tmp_path / "in", ASSUME)
    _, meta = _read(case)
    np.testing.assert_allclose(_spacing(meta["affine"]), [0.7, 0.6, 2.5], atol=1e-6)  # i: columns, j: rows
    assert case.volume.assumptions == ["in-plane spacing 0.6 x 0.7 mm from ImagerPixelSpacing (no PixelSpacing)"]


def test_a_complete_series_records_no_assumption(tmp_path):
    _series(tmp_path / "in" / "ok")
    case = _only_case(tmp_path / "in")
    _read(case)
    assert case.volume.assumptions == []


def test_convert_reports_the_refusal_on_one_line(tmp_path):
    _, paths = _series(tmp_path / "in" / "nospacing")
    _remove(paths, "PixelSpacing")
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "out"), "-q"]) == 2
    index = (tmp_path / "out" / "index.csv").read_text()
    assert "failed" in index and "input.on_missing_spacing=assume" in index
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "out2"), "-q", "input.on_missing_spacing=assume"]) == 0


# --- single slices ---------------------------------------------------------------------------------


def test_single_slice_uses_its_thickness_and_refuses_without_one(tmp_path):
    _, paths = _series(tmp_path / "in" / "one", shape=(12, 10, 1))
    case = _only_case(tmp_path / "in")
    _, meta = _read(case)
    assert _spacing(meta["affine"])[2] == pytest.approx(2.5)  # SliceThickness written by write_dicom_series
    assert case.volume.assumptions == []

    _remove(paths, "SliceThickness", "SpacingBetweenSlices")
    with pytest.raises(InputError, match=r"single slice without SpacingBetweenSlices.*input.on_missing_spacing=assume"):
        _read(_only_case(tmp_path / "in"))
    case = _only_case(tmp_path / "in", ASSUME)
    _, meta = _read(case)
    assert _spacing(meta["affine"])[2] == pytest.approx(1.0)
    assert case.volume.assumptions == ["slice thickness 1 mm (no SpacingBetweenSlices/SliceThickness)"]


# --- legacy multi-frame files ----------------------------------------------------------------------


def _legacy_multiframe(tmp_path: Path, **values) -> tuple[np.ndarray, Path]:
    """One CT Image Storage file holding every slice as a frame, one position (no functional groups)."""
    volume, paths = _series(tmp_path / "slices")
    ds = pydicom.dcmread(paths[0])
    frames = [pydicom.dcmread(p).pixel_array for p in paths]
    ds.NumberOfFrames = len(frames)
    ds.PixelData = np.stack(frames).astype("<i2").tobytes()
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    out = tmp_path / "in" / "legacy" / "multi.dcm"
    out.parent.mkdir(parents=True)
    ds.save_as(out)
    return volume, out


def test_legacy_multiframe_step_from_spacing_between_slices(tmp_path):
    volume, _ = _legacy_multiframe(tmp_path, SpacingBetweenSlices=2.5, SliceThickness=3.0)
    case = _only_case(tmp_path / "in")
    array, meta = _read(case)
    np.testing.assert_array_equal(array, volume)
    np.testing.assert_allclose(_spacing(meta["affine"]), [0.8, 0.9, 2.5], atol=1e-5)
    assert case.volume.assumptions == []


@pytest.mark.parametrize("thickness, step", [(3.0, 3.0), (None, 1.0)])
def test_legacy_multiframe_step_guess_is_refused_or_assumed(tmp_path, thickness, step):
    values = {} if thickness is None else {"SliceThickness": thickness}
    _legacy_multiframe(tmp_path, **values)
    with pytest.raises(InputError, match=r"multi-frame file without per-frame positions.*on_missing_spacing=assume"):
        _read(_only_case(tmp_path / "in"))
    case = _only_case(tmp_path / "in", ASSUME)
    _, meta = _read(case)
    assert _spacing(meta["affine"])[2] == pytest.approx(step)
    assert len(case.volume.assumptions) == 1 and f"slice step {step:g} mm" in case.volume.assumptions[0]


# --- mosaics and input.min_slices --------------------------------------------------------------------


def test_mosaic_counts_its_slices_for_min_slices(shared_data, tmp_path):
    source = shared_data / "dicom" / "dcm_qa_12bit" / "In" / "12bitUnsigned.dcm"
    if not source.is_file():
        pytest.skip(f"sample not present: {source}")
    (tmp_path / "in").mkdir()
    shutil.copy(source, tmp_path / "in" / source.name)

    case = _only_case(tmp_path / "in", InputConfig(min_slices=20))  # 35 slices tiled in one file
    assert case.volume.n_slices == 35
    found = discover(tmp_path / "in", InputConfig(min_slices=36))
    assert not found.cases and "35 slice(s), fewer than input.min_slices=36" in found.skipped[0].reason


# --- rescale slope varying per slice ---------------------------------------------------------------


def test_per_slice_rescale_slope_is_applied_per_slice(tmp_path):
    slopes = [1.0, 0.1, 0.25, 2.0, 0.5, 0.1]
    volume = np.clip(hu_volume(SHAPE, seed=7), -1024, 2000).astype(np.float64)  # int16 room for slope 0.1
    volume[..., 1] = volume[..., 1] + 0.3  # fractional HU that an integer decoding of slice 0's type would lose
    write_dicom_series(volume, make_affine("RAS"), tmp_path / "in" / "slopes", rescale_slope=slopes,
                       uid_entropy=["slopes"])
    assert [float(pydicom.dcmread(p).RescaleSlope) for p in sorted((tmp_path / "in" / "slopes").iterdir())] == slopes

    array, _ = _read(_only_case(tmp_path / "in"))
    for k, slope in enumerate(slopes):  # within one stored unit of each slice's own slope
        np.testing.assert_allclose(array[..., k], volume[..., k], atol=slope * 1.0001, rtol=0, err_msg=f"slice {k}")
    assert array.dtype == np.float32
