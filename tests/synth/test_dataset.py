"""synthesize(): nnU-Net raw layout, dataset.json, determinism, idempotence, and DICOM test-case geometry."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline.errors import InputError
from pipeline.io.geometry import affine_from_sitk, closest_canonical
from pipeline.synth import synthesize
from pipeline.synth.dataset import build_case

ARGS = {"cases": 6, "seed": 3, "test_fraction": 0.5, "dicom_test_cases": 2, "shape": (40, 40, 12),
        "spacing": (2.0, 2.0, 3.0)}
GEOMETRY = {"shape": ARGS["shape"], "spacing": ARGS["spacing"]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("a") / "ds", **ARGS)


def _nifti(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_layout(dataset):
    files = _files(dataset)
    expected = ["dataset.json"]
    expected += [f"imagesTr/synth_00{n}_0000.nii.gz" for n in range(3)]
    expected += [f"labelsTr/synth_00{n}.nii.gz" for n in range(3)]
    expected += [f"imagesTs/synth_00{n}_0000.nii.gz" for n in (5,)]
    expected += [f"labelsTs/synth_00{n}.nii.gz" for n in (3, 4, 5)]
    expected += [f"imagesTs/synth_00{n}/IM_{k:04d}.dcm" for n in (3, 4) for k in range(1, 13)]
    assert files == sorted(expected)
    assert not list(dataset.parent.glob(".ds.*"))  # no temporary folders left behind


def test_dataset_json(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert (meta["numTraining"], meta["numTest"], meta["file_ending"], meta["seed"]) == (3, 3, ".nii.gz", 3)
    assert meta["training"][0] == {
        "image": "imagesTr/synth_000_0000.nii.gz",
        "label": "labelsTr/synth_000.nii.gz",
    }
    assert [t["image"] for t in meta["test"]] == ["imagesTs/synth_003", "imagesTs/synth_004",
                                                  "imagesTs/synth_005_0000.nii.gz"]
    cases = {c["id"]: c for c in meta["cases"]}
    assert [cases[f"synth_00{n}"]["orientation"] for n in range(6)] == ["RAS", "LPS", "oblique"] * 2
    assert [cases[f"synth_00{n}"]["format"] for n in range(6)] == ["nifti"] * 3 + ["dicom"] * 2 + ["nifti"]
    assert cases["synth_005"]["n_lesions"] == 0 and cases["synth_005"]["lesion_fraction"] == 0
    for n, entry in enumerate(meta["training"] + meta["test"]):
        case = cases[f"synth_00{n}"]
        label, _ = _nifti(dataset / entry["label"])
        assert case["lesion_fraction"] == pytest.approx(label.mean(), abs=1e-8)
        assert case["spacing"] == [2.0, 2.0, 3.0]
        assert 10 <= case["noise_hu"] <= 25
        assert case["n_lesions"] == len(case["lesions"])
    assert any(c["n_lesions"] > 0 for c in meta["cases"])


def test_nifti_cases_hold_the_phantom(dataset):
    for n, split in [(0, "Tr"), (1, "Tr"), (2, "Tr"), (5, "Ts")]:
        case = build_case(3, n, **GEOMETRY)
        image, nii = _nifti(dataset / f"images{split}/synth_00{n}_0000.nii.gz")
        label, label_nii = _nifti(dataset / f"labels{split}/synth_00{n}.nii.gz")
        assert image.dtype == np.int16 and label.dtype == np.uint8
        np.testing.assert_array_equal(image, case.image)
        np.testing.assert_array_equal(label, case.label)
        for header in (nii.header, label_nii.header):
            assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1
            np.testing.assert_allclose(header.get_sform(), case.affine, atol=1e-4)
            np.testing.assert_allclose(header.get_qform(), case.affine, atol=1e-4)


@pytest.mark.parametrize("n", [3, 4])
def test_dicom_case_label_is_in_the_series_source_geometry(dataset, n):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dataset / f"imagesTs/synth_00{n}")))
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    array, affine = closest_canonical(array, affine_from_sitk(image))
    label, label_nii = _nifti(dataset / f"labelsTs/synth_00{n}.nii.gz")
    assert label.shape == array.shape
    np.testing.assert_allclose(label_nii.affine, affine, atol=1e-4)
    case = build_case(3, n, **GEOMETRY)
    expected_image, _ = closest_canonical(case.image, case.affine)
    expected_label, _ = closest_canonical(case.label, case.affine)
    np.testing.assert_array_equal(array.astype(np.int16), expected_image)
    np.testing.assert_array_equal(label, expected_label)
    assert label.sum() > 0
    ds = pydicom.dcmread(dataset / f"imagesTs/synth_00{n}/IM_0001.dcm")
    assert ds.PatientID == "SYNTHETIC" and ds.SeriesDescription == f"synthetic CT synth_00{n}" and ds.Modality == "CT"


def test_same_seed_gives_identical_data_and_other_seed_differs(dataset, tmp_path):
    again = synthesize(tmp_path / "again", **ARGS)
    assert _files(again) == _files(dataset)
    assert (again / "dataset.json").read_text() == (dataset / "dataset.json").read_text()
    for name in _files(dataset):
        if name.endswith(".nii.gz"):
            np.testing.assert_array_equal(_nifti(again / name)[0], _nifti(dataset / name)[0])
        elif name.endswith(".dcm"):
            assert (again / name).read_bytes() == (dataset / name).read_bytes()  # UIDs derive from the seed

    other = synthesize(tmp_path / "other", **{**ARGS, "seed": 4})
    assert not np.array_equal(_nifti(other / "imagesTr/synth_000_0000.nii.gz")[0],
                              _nifti(dataset / "imagesTr/synth_000_0000.nii.gz")[0])
    uid = pydicom.dcmread(other / "imagesTs/synth_003/IM_0001.dcm").SeriesInstanceUID
    assert uid != pydicom.dcmread(dataset / "imagesTs/synth_003/IM_0001.dcm").SeriesInstanceUID


def test_case_content_does_not_depend_on_the_number_of_cases(dataset, tmp_path):
    bigger = synthesize(tmp_path / "big", **{**ARGS, "cases": 8})
    for n in range(3):
        name = f"imagesTr/synth_00{n}_0000.nii.gz"
        np.testing.assert_array_equal(_nifti(bigger / name)[0], _nifti(dataset / name)[0])


def test_rerun_is_a_no_op_and_new_arguments_rewrite(tmp_path):
    small = {**ARGS, "cases": 2, "dicom_test_cases": 1}
    out = synthesize(tmp_path / "ds", **small)
    stamp = (out / "dataset.json").stat().st_mtime_ns
    (out / "marker").write_text("kept if not rewritten")
    assert synthesize(tmp_path / "ds", **small) == out
    assert (out / "dataset.json").stat().st_mtime_ns == stamp and (out / "marker").exists()

    synthesize(tmp_path / "ds", **{**small, "seed": 9})
    assert json.loads((out / "dataset.json").read_text())["seed"] == 9
    assert not (out / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folders left


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="synthetic dataset made by this tool"):
        synthesize(tmp_path / "ds", **{**ARGS, "cases": 2})
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
