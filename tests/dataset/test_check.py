"""``check_dataset`` and ``medseg check``: a corrupted copy of a good dataset has every problem reported in
one run (one line each, naming the case), the clean one passes with exit 0."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.dataset import check_dataset
from tests.dataset.builders import case_affine, write_msd_4d, write_nnunet_v2, write_volume

CASES = ("clean", "missing_channel", "channel_grid", "label_shape", "label_affine", "label_value", "nan", "inf",
         "empty", "unreadable", "duplicate", "fractional", "label_4d")

# (case, the start of its problem line after "<case>: ") for every corruption made by `corrupt`
EXPECTED = [
    ("duplicate", "duplicate case id: found with .nii.gz and as labelsTr/duplicate.nrrd; keep one copy"),
    ("missing_channel", "channel 1 (T1c) missing: expected imagesTr/missing_channel_0001.nii.gz"),
    ("channel_grid", "channel 1 (T1c) imagesTr/channel_grid_0001.nii.gz: grid differs from channel 0 (FLAIR)'s: "
                     "affine differs by up to 0.5 mm (tolerance 0.001 mm; origin by 0.5 mm, voxel axes by 0 mm)"),
    ("label_shape", "label labelsTr/label_shape.nii.gz: grid differs from the image's: shape (12, 10, 7) vs "
                    "(12, 10, 8)"),
    ("label_affine", "label labelsTr/label_affine.nii.gz: grid differs from the image's: affine differs by up to "
                     "0.2 mm (tolerance 0.001 mm; origin by 0.2 mm"),
    ("label_value", "label labelsTr/label_value.nii.gz holds values [5, 7] outside the labels {background: 0, "
                    "edema: 1, tumour: 2}"),
    ("nan", "channel 0 (FLAIR) imagesTr/nan_0000.nii.gz holds 2 NaN voxel(s)"),
    ("inf", "channel 1 (T1c) imagesTr/inf_0001.nii.gz holds 1 Inf voxel(s)"),
    ("empty", "channel 0 (FLAIR) imagesTr/empty_0000.nii.gz is empty (0 bytes)"),
    ("unreadable", "label labelsTr/unreadable.nii.gz is unreadable: cannot read NIfTI"),
    ("fractional", "label labelsTr/fractional.nii.gz holds non-integer values (0.5; 1 voxel(s))"),
    ("label_4d", "label labelsTr/label_4d.nii.gz has shape (12, 10, 8, 2): expected a 3D volume"),
]


def corrupt(root) -> None:
    """One corruption per case of :data:`CASES` (the first, ``clean``, is left alone)."""
    index = {case: n for n, case in enumerate(CASES)}
    images, labels = root / "imagesTr", root / "labelsTr"

    def rewrite(path, change, dtype=None):
        image = nib.load(str(path))
        array = np.asarray(image.dataobj).astype(dtype or image.get_data_dtype())
        array, affine = change(array, image.affine.copy())
        write_volume(array, affine, path)

    def shifted(mm):
        def change(array, affine):
            affine[:3, 3] += [mm, 0.0, 0.0]
            return array, affine
        return change

    def set_voxels(values, positions):
        def change(array, affine):
            for value, position in zip(values, positions):
                array[position] = value
            return array, affine
        return change

    (images / "missing_channel_0001.nii.gz").unlink()
    rewrite(images / "channel_grid_0001.nii.gz", shifted(0.5))
    write_volume(np.zeros((12, 10, 7), np.uint8), case_affine(index["label_shape"]), labels / "label_shape.nii.gz")
    rewrite(labels / "label_affine.nii.gz", shifted(0.2))
    rewrite(labels / "label_value.nii.gz", set_voxels([5, 7], [(0, 0, 0), (1, 1, 1)]))
    rewrite(images / "nan_0000.nii.gz", set_voxels([np.nan, np.nan], [(0, 0, 0), (3, 3, 3)]))
    rewrite(images / "inf_0001.nii.gz", set_voxels([np.inf], [(5, 5, 5)]))
    (images / "empty_0000.nii.gz").write_bytes(b"")
    (labels / "unreadable.nii.gz").write_bytes(b"this is not a NIfTI file " * 20)
    shutil.copy(labels / "label_value.nii.gz", labels / "duplicate.nrrd")  # the same case under a second ending
    rewrite(labels / "fractional.nii.gz", set_voxels([0.5], [(0, 0, 0)]), dtype=np.float32)
    label = np.asarray(nib.load(str(labels / "label_4d.nii.gz")).dataobj)
    write_volume(np.stack([label, label], axis=-1), case_affine(index["label_4d"]), labels / "label_4d.nii.gz")


@pytest.fixture
def good(tmp_path):
    root = tmp_path / "good"
    write_nnunet_v2(root, cases=CASES, channels=2)
    return root


@pytest.fixture
def corrupted(good, tmp_path):
    root = tmp_path / "corrupted"
    shutil.copytree(good, root)
    corrupt(root)
    return root


def assert_every_problem(lines: list[str], prefix: str = "") -> None:
    """Each expected problem is the start of exactly one line, and there is no other line."""
    for case, start in EXPECTED:
        matching = [line for line in lines if line.startswith(f"{prefix}{case}: {start}")]
        assert len(matching) == 1, (case, start, lines)
    assert len(lines) == len(EXPECTED), lines
    assert not any(line.startswith(f"{prefix}clean:") for line in lines)


def test_clean_dataset_passes(good):
    report = check_dataset(good)
    assert report.ok and report.problems == [] and report.lines() == []
    assert (report.cases, report.layout) == (len(CASES), "nnunetv2")


def test_every_problem_in_one_run(corrupted):
    report = check_dataset(corrupted)
    assert not report.ok
    assert report.cases == len(CASES) - 1  # missing_channel is a problem, not a case
    assert_every_problem(report.lines())
    assert {p.case_id for p in report.problems} == {case for case, _ in EXPECTED}


def test_cli_check_clean_exits_zero(good, capsys):
    code = main(["check", str(good), "-q"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert out.splitlines() == [f"{len(CASES)} case(s), 0 problem(s) (nnunetv2 layout, {good})"]


def test_cli_check_lists_every_problem_and_exits_two(corrupted, capsys):
    code = main(["check", str(corrupted), "-q"])
    out, err = capsys.readouterr()
    assert code == 2
    lines = out.splitlines()
    assert_every_problem(lines[:-1], prefix="error: ")
    assert lines[-1] == f"{len(CASES) - 1} case(s), {len(EXPECTED)} problem(s) (nnunetv2 layout, {corrupted})"
    assert "Traceback" not in err


def test_labels_argument_replaces_the_datasets(good, capsys):
    report = check_dataset(good, labels={"background": 0, "edema": 1})
    assert len(report.problems) == len(CASES)  # every label holds the tumour value 2
    assert report.lines()[0] == ("channel_grid: label labelsTr/channel_grid.nii.gz holds values [2] outside the labels "
                                 "{background: 0, edema: 1}: fix the label, or pass the dataset's labels (--labels)")
    code = main(["check", str(good), "-q", "--labels", "background=0", "edema=1", "tumour=2", "x=7"])
    assert code == 0, capsys.readouterr().out
    code = main(["check", str(good), "-q", "--labels", "background=0", "edema=1"])
    assert code == 2 and f"{len(CASES)} case(s), {len(CASES)} problem(s)" in capsys.readouterr().out


def test_cli_rejects_a_bad_labels_argument(good, capsys):
    with pytest.raises(SystemExit) as info:
        main(["check", str(good), "--labels", "lesion"])
    assert info.value.code == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_cli_missing_dataset_is_one_error_line(tmp_path, capsys):
    code = main(["check", str(tmp_path / "nowhere")])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.strip().startswith("error: dataset folder not found") and len(err.strip().splitlines()) == 1


def test_msd_4d_wrong_channel_count_and_grid(tmp_path):
    written = write_msd_4d(tmp_path, modalities=("FLAIR", "T1w"))
    case = written["BRATS_002"]
    three = np.stack(case.images + case.images[:1], axis=-1)
    write_volume(three, case.affine, case.image_paths[0])
    label_affine = case_affine(2).copy()
    label_affine[:3, 0] *= 1.01  # 1 % off in spacing along i (oblique: up to 0.0075 mm on one entry)
    write_volume(written["BRATS_003"].label, label_affine, written["BRATS_003"].label_path)
    report = check_dataset(tmp_path)
    assert report.lines() == [
        "BRATS_002: image imagesTr/BRATS_002.nii.gz has shape (12, 10, 8, 3) (3 volume(s) on its 4th axis): "
        "expected a 4D image with one volume per modality on the 4th axis, 2 (FLAIR, T1w)",
        "BRATS_003: label labelsTr/BRATS_003.nii.gz: grid differs from the image's: affine differs by up to "
        "0.007469 mm (tolerance 0.001 mm; origin by 0 mm, voxel axes by 0.007469 mm): origin (10, -26, 45) vs "
        "(10, -26, 45), spacing (0.808, 0.9, 2.5) vs (0.8, 0.9, 2.5)",
    ]
    assert check_dataset(tmp_path, affine_tolerance_mm=0.01).lines() == report.lines()[:1]


@pytest.mark.parametrize("ending", [".nrrd", ".mha"])
def test_itk_endings_clean_and_nan(tmp_path, ending):
    written = write_nnunet_v2(tmp_path, ending=ending)
    assert check_dataset(tmp_path).ok
    case = written["case_001"]
    image = case.images[0].copy()
    image[2, 3, 4] = np.nan
    write_volume(image, case.affine, case.image_paths[0])
    assert check_dataset(tmp_path).lines() == [
        f"case_001: channel 0 (FLAIR) imagesTr/case_001_0000{ending} holds 1 NaN voxel(s): expected finite intensities"]


def test_nan_in_a_float_nifti_label(tmp_path):
    """SimpleITK reads NaN as 0 in NIfTI files: the check still sees it."""
    written = write_nnunet_v2(tmp_path, cases=("a", "b"))
    label = written["b"].label.astype(np.float32)
    label[1, 2, 3] = np.nan
    write_volume(label, written["b"].affine, written["b"].label_path)
    assert check_dataset(tmp_path).lines() == [
        "b: label labelsTr/b.nii.gz holds NaN or Inf values: expected integer class values"]


def test_zero_voxel_image(tmp_path):
    written = write_nnunet_v2(tmp_path, cases=("a", "b"))
    write_volume(np.zeros((0, 10, 8), np.float32), written["b"].affine, written["b"].image_paths[1])
    lines = check_dataset(tmp_path).lines()
    assert len(lines) == 1 and lines[0].startswith("b: channel 1 (T1c) imagesTr/b_0001.nii.gz is empty: shape (0")
