"""synthesize_mr(): nnU-Net v2 layout and dataset.json, determinism, caching, the DICOM study's geometry."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.io.discover import discover
from pipeline.io.reader import ScanReader
from pipeline.synth import synthesize, synthesize_mr
from pipeline.synth.mr import build_mr_case

# cases 0-4 train (4: no lesion), 5 (oblique) and 6 (RAS) DICOM test cases, 7 (LPS) a NIfTI test case
ARGS = {"cases": 8, "seed": 1, "test_fraction": 0.375, "dicom_test_cases": 2, "shape": (56, 56, 16),
        "spacing": (1.5, 1.5, 3.0)}
GEOMETRY = {"shape": ARGS["shape"], "spacing": ARGS["spacing"]}
NIFTI = {0: "Tr", 1: "Tr", 2: "Tr", 3: "Tr", 4: "Tr", 7: "Ts"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthesize_mr(tmp_path_factory.mktemp("mr") / "ds", **ARGS)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _nifti(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def _read(source):
    reader = ScanReader()
    array, meta = reader.get_data(reader.read(source))
    return np.asarray(array), np.asarray(meta["affine"], dtype=np.float64)


def _world(mask, affine) -> np.ndarray:
    """World RAS centroid (mm) of a voxel mask."""
    index = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ index + affine[:3, 3]


def test_layout(dataset):
    expected = ["dataset.json"]
    for n, split in NIFTI.items():
        expected += [f"images{split}/mr_00{n}_000{c}.nii.gz" for c in (0, 1)]
        expected.append(f"labels{split}/mr_00{n}.nii.gz")
    for n in (5, 6):
        expected.append(f"labelsTs/mr_00{n}.nii.gz")
        expected += [f"imagesTs/mr_00{n}/FLAIR/IM_{k:04d}.dcm" for k in range(1, 17)]
        expected += [f"imagesTs/mr_00{n}/T1c/IM_{k:04d}.dcm" for k in range(1, 27)]  # 2 mm slices
    assert _files(dataset) == sorted(expected)
    assert not list(dataset.parent.glob(".ds.*"))  # no temporary folders left behind


def test_dataset_json_is_nnunet_v2(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1c"}
    assert meta["labels"] == {"background": 0, "oedema": 1, "core": 2}
    assert sorted(meta["labels"].values()) == list(range(len(meta["labels"])))  # consecutive from 0
    assert meta["file_ending"] == ".nii.gz" and meta["name"] == "SynthLesionMR"
    assert meta["numTraining"] == len(list((dataset / "imagesTr").glob("*_0000.nii.gz"))) == 5
    assert "training" not in meta and "test" not in meta  # nnU-Net v2 finds the files itself
    recipe = meta["medseg"]["recipe"]
    assert (recipe["seed"], recipe["cases"], recipe["num_test"], recipe["shape"]) == (1, 8, 3, [56, 56, 16])
    cases = meta["medseg"]["cases"]
    assert [c["orientation"] for c in cases] == ["RAS", "LPS", "oblique"] * 2 + ["RAS", "LPS"]
    assert [c["format"] for c in cases] == ["nifti"] * 5 + ["dicom"] * 2 + ["nifti"]
    assert [c["t1c_grid"] for c in cases] == ["same"] * 5 + ["other"] * 2 + ["same"]
    assert cases[4]["n_lesions"] == 0 and cases[4]["voxels"]["core"] == 0
    assert all(1 <= c["n_lesions"] <= 3 for n, c in enumerate(cases) if n != 4)
    assert cases[5]["spacing"] == [1.5, 1.5, 3.0] and cases[5]["t1c_spacing"] == [1.5, 1.5, 2.0]


def test_nifti_cases_share_one_grid_and_hold_the_phantom(dataset):
    for n, split in NIFTI.items():
        case = build_mr_case(1, n, **GEOMETRY)
        flair, flair_affine = _nifti(dataset / f"images{split}/mr_00{n}_0000.nii.gz")
        t1c, t1c_affine = _nifti(dataset / f"images{split}/mr_00{n}_0001.nii.gz")
        label, label_affine = _nifti(dataset / f"labels{split}/mr_00{n}.nii.gz")
        assert flair.dtype == t1c.dtype == np.int16 and label.dtype == np.uint8
        assert flair.shape == t1c.shape == label.shape == ARGS["shape"]
        for affine in (flair_affine, t1c_affine, label_affine):
            np.testing.assert_allclose(affine, case.affine, atol=1e-4)
        np.testing.assert_array_equal(flair, case.flair)
        np.testing.assert_array_equal(t1c, case.t1c)
        np.testing.assert_array_equal(label, case.label)
        assert set(np.unique(label)) <= {0, 1, 2}
        if n != 4:
            assert np.count_nonzero(label == 1) and np.count_nonzero(label == 2)


def test_lps_and_oblique_grids(dataset):
    directions = {}
    for n, split in ((0, "Tr"), (1, "Tr"), (2, "Tr")):
        affine = _nifti(dataset / f"images{split}/mr_00{n}_0000.nii.gz")[1]
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [1.5, 1.5, 3.0], atol=1e-5)
        directions[n] = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(directions[0], np.eye(3), atol=1e-6)
    np.testing.assert_allclose(directions[1], np.diag([-1.0, -1.0, 1.0]), atol=1e-6)
    assert np.abs(directions[2] - np.round(directions[2])).max() > 0.05  # not axis-aligned


@pytest.mark.parametrize("n", [5, 6])
def test_dicom_study_of_two_series(dataset, n):
    found = discover(dataset / f"imagesTs/mr_00{n}")
    assert found.skipped == []
    cases = {c.series_description: c for c in found.cases}
    assert sorted(cases) == ["AX FLAIR", "AX T1 POST GAD"]
    flair, t1c = cases["AX FLAIR"], cases["AX T1 POST GAD"]
    assert flair.modality == t1c.modality == "MR" and flair.kind == t1c.kind == "dicom"
    assert (flair.series_number, t1c.series_number) == (1, 2)
    assert flair.series_uid != t1c.series_uid
    assert flair.volume.series.study_uid == t1c.volume.series.study_uid
    assert flair.volume.series.frame_of_reference_uid == t1c.volume.series.frame_of_reference_uid
    headers = [pydicom.dcmread(dataset / f"imagesTs/mr_00{n}/{s}/IM_0001.dcm") for s in ("FLAIR", "T1c")]
    assert {(h.PatientID, str(h.PatientName)) for h in headers} == {("SYNTH-MR", "SYNTH-MR")}

    flair_array, flair_affine = _read(flair.volume)
    t1c_array, t1c_affine = _read(t1c.volume)
    label, label_affine = _nifti(dataset / f"labelsTs/mr_00{n}.nii.gz")
    assert label.shape == flair_array.shape  # the label is in the FLAIR series' source geometry
    np.testing.assert_allclose(label_affine, flair_affine, atol=1e-4)
    assert t1c_array.shape != flair_array.shape and not np.allclose(t1c_affine, flair_affine, atol=1e-3)
    case = build_mr_case(1, n, t1c_grid="other", **GEOMETRY)
    assert np.sort(flair_array, axis=None).tolist() == np.sort(case.flair, axis=None).tolist()


@pytest.mark.parametrize("n", [5, 6])
def test_dicom_lesion_at_the_same_millimetres_in_both_series_and_the_label(dataset, n):
    """The biggest core's centroid in world mm: from the label, from bright T1c voxels near it (T1c
    grid), and the lesion's (oedema + core) from bright FLAIR voxels near it (FLAIR grid)."""
    series = {c.series_description: c for c in discover(dataset / f"imagesTs/mr_00{n}").cases}
    flair, flair_affine = _read(series["AX FLAIR"].volume)
    t1c, t1c_affine = _read(series["AX T1 POST GAD"].volume)
    label, label_affine = _nifti(dataset / f"labelsTs/mr_00{n}.nii.gz")
    case = build_mr_case(1, n, t1c_grid="other", **GEOMETRY)
    lesion = max(case.head.lesions, key=lambda les: np.prod(les.core.semi))
    tolerance = 1.5 * 1.5  # 1.5 in-plane voxels, mm

    def near(shape, affine, radius):
        index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
        world = index @ affine[:3, :3].T + affine[:3, 3]
        return np.linalg.norm(world - lesion.oedema.centre, axis=-1) < radius

    reach = float(lesion.oedema.semi.max()) + 2
    core = (label == 2) & near(label.shape, label_affine, reach)
    whole = (label > 0) & near(label.shape, label_affine, reach)
    assert core.sum() >= 4
    core_mm = _world(core, label_affine)
    np.testing.assert_allclose(core_mm, lesion.core.centre, atol=tolerance)

    bright_t1c = _bright(t1c, near(t1c.shape, t1c_affine, float(lesion.core.semi.max()) + 3))
    np.testing.assert_allclose(_world(bright_t1c, t1c_affine), core_mm, atol=tolerance)
    bright_flair = _bright(flair, near(flair.shape, flair_affine, reach + 2))
    lesion_mm = _world(whole, label_affine)
    np.testing.assert_allclose(_world(bright_flair, flair_affine), lesion_mm, atol=tolerance)


def _bright(image, region):
    """Voxels of ``region`` brighter than halfway between its median (tissue) and its 99th percentile."""
    values = image[region].astype(np.float64)
    return region & (image > (np.median(values) + np.percentile(values, 99)) / 2)


def test_same_seed_gives_identical_files_and_other_seed_differs(dataset, tmp_path):
    again = synthesize_mr(tmp_path / "again", **ARGS)
    assert _files(again) == _files(dataset)
    for name in _files(dataset):
        assert (again / name).read_bytes() == (dataset / name).read_bytes() or name.endswith(".nii.gz")
        if name.endswith(".nii.gz"):
            np.testing.assert_array_equal(_nifti(again / name)[0], _nifti(dataset / name)[0])
    other = synthesize_mr(tmp_path / "other", **{**ARGS, "seed": 2})
    name = "imagesTr/mr_000_0001.nii.gz"
    assert not np.array_equal(_nifti(other / name)[0], _nifti(dataset / name)[0])
    uid = pydicom.dcmread(other / "imagesTs/mr_005/FLAIR/IM_0001.dcm").StudyInstanceUID
    assert uid != pydicom.dcmread(dataset / "imagesTs/mr_005/FLAIR/IM_0001.dcm").StudyInstanceUID


def test_rerun_is_a_no_op_and_a_ct_dataset_is_replaced(tmp_path):
    small = {**ARGS, "cases": 2, "test_fraction": 0.5, "dicom_test_cases": 1}
    synthesize(tmp_path / "ds", cases=2, seed=0, test_fraction=0.5, dicom_test_cases=0,
               shape=(40, 40, 12), spacing=(2.0, 2.0, 3.0))
    out = synthesize_mr(tmp_path / "ds", **small)  # our own CT dataset: replaced
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "FLAIR", "1": "T1c"}
    stamp = (out / "dataset.json").stat().st_mtime_ns
    assert synthesize_mr(tmp_path / "ds", **small) == out
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
