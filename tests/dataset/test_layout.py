"""``read_dataset``: nnU-Net v2 (every ending), MSD 4D, plain folders and our synthetic layout list the right
cases, channels and labels; every layout problem is one line naming the case and the file; what cannot be
listed is an ``InputError`` saying what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.dataset import read_dataset
from pipeline.errors import InputError
from tests.dataset.builders import (
    CASES,
    LABELS,
    MSD_CASES,
    write_folder,
    write_msd_4d,
    write_nnunet_v2,
    write_synth,
)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_nnunet_v2_lists_cases_channels_and_labels(tmp_path, ending):
    written = write_nnunet_v2(tmp_path, channels=2, ending=ending)
    dataset = read_dataset(tmp_path)
    assert (dataset.layout, dataset.file_ending) == ("nnunetv2", ending)
    assert dataset.channel_names == ["FLAIR", "T1c"]
    assert dataset.labels == LABELS
    assert [c.case_id for c in dataset.cases] == list(CASES)
    assert dataset.problems == []
    for case in dataset.cases:
        assert case.images == [str(p) for p in written[case.case_id].image_paths]
        assert case.images[1].endswith(f"imagesTr/{case.case_id}_0001{ending}")
        assert case.label == str(tmp_path / "labelsTr" / f"{case.case_id}{ending}")
        assert case.four_d is False


@pytest.mark.parametrize("ending", [".nrrd", ".mha"])
def test_builders_write_itk_files_in_our_ras_geometry(tmp_path, ending):
    """The NRRD/MHA fixtures hold the arrays and the (oblique, LPS) RAS affines they claim."""
    from pipeline.io.reader import ScanReader

    written = write_nnunet_v2(tmp_path, ending=ending)
    for case in written.values():
        read = ScanReader().read(case.image_paths[1])
        np.testing.assert_array_equal(read.array, case.images[1])
        np.testing.assert_allclose(read.affine, case.affine, atol=1e-9)
        label = ScanReader().read(case.label_path)
        np.testing.assert_array_equal(label.array, case.label)


def test_nnunet_v2_ignores_extra_keys(tmp_path):
    write_nnunet_v2(tmp_path, extra={"overwrite_image_reader_writer": "SimpleITKIO", "description": "x",
                                     "reference": "", "licence": "CC-BY"})
    dataset = read_dataset(tmp_path)
    assert len(dataset.cases) == 3 and dataset.problems == []


@pytest.mark.parametrize("labels, extra, named", [
    ({"background": 0, "whole_tumor": [1, 2, 3], "enhancing": 3}, {}, "whole_tumor"),
    ({"background": 0, "edema": 1}, {"regions_class_order": [1, 2]}, "regions_class_order"),
])
def test_region_based_labels_are_refused(tmp_path, labels, extra, named):
    write_nnunet_v2(tmp_path, labels=labels, extra=extra)
    with pytest.raises(InputError, match="region-based labels are not supported yet") as info:
        read_dataset(tmp_path)
    assert named in str(info.value)


def test_nnunet_v2_layout_problems_are_all_listed(tmp_path):
    write_nnunet_v2(tmp_path, cases=("BRATS_001", "BRATS_002", "BRATS_003", "BRATS_004", "BRATS_005"))
    (tmp_path / "imagesTr" / "BRATS_003_0001.nii.gz").unlink()
    (tmp_path / "labelsTr" / "BRATS_004.nii.gz").unlink()
    (tmp_path / "imagesTr" / "BRATS_005_0000.nii.gz").unlink()
    (tmp_path / "imagesTr" / "BRATS_005_0001.nii.gz").unlink()
    (tmp_path / "imagesTr" / "BRATS_002_0000.nrrd").write_bytes(b"")  # the same case under a second ending
    (tmp_path / "imagesTr" / "._BRATS_001_0000.nii.gz").write_bytes(b"macOS")  # ignored
    dataset = read_dataset(tmp_path)
    assert dataset.problems == [
        "case 'BRATS_002': duplicate case id: found with .nii.gz and as imagesTr/BRATS_002_0000.nrrd; keep one copy",
        "case 'BRATS_003': channel 1 (T1c) missing: expected imagesTr/BRATS_003_0001.nii.gz",
        "case 'BRATS_004': image without label: expected labelsTr/BRATS_004.nii.gz",
        "case 'BRATS_005': label labelsTr/BRATS_005.nii.gz has no image: expected imagesTr/BRATS_005_0000.nii.gz",
    ]
    # a case missing an image file is left out; one missing its label is listed without it
    assert [(c.case_id, c.label is None) for c in dataset.cases] == [
        ("BRATS_001", False), ("BRATS_002", False), ("BRATS_004", True)]


def test_nnunet_v2_num_training_mismatch(tmp_path):
    write_nnunet_v2(tmp_path, extra={"numTraining": 5})
    assert read_dataset(tmp_path).problems == [
        "dataset.json numTraining is 5, but 3 case(s) were found in imagesTr/ and labelsTr/: fix numTraining or "
        "add the missing cases"]


def test_nnunet_v2_test_split_labels_optional(tmp_path):
    write_nnunet_v2(tmp_path)
    write_nnunet_v2(tmp_path, cases=("t_0", "t_1"), split="Ts")
    (tmp_path / "labelsTs" / "t_1.nii.gz").unlink()
    dataset = read_dataset(tmp_path, split="Ts")
    assert [(c.case_id, c.label is not None) for c in dataset.cases] == [("t_0", True), ("t_1", False)]
    assert dataset.problems == []


def test_msd_4d_lists_one_file_per_case(tmp_path):
    write_msd_4d(tmp_path, modalities=("FLAIR", "T1w", "T1gd", "T2w"))
    dataset = read_dataset(tmp_path)
    assert dataset.layout == "msd" and dataset.file_ending == ".nii.gz"
    assert dataset.channel_names == ["FLAIR", "T1w", "T1gd", "T2w"]
    assert dataset.labels == {"background": 0, "edema": 1, "tumour": 2}  # inverted from value -> name
    assert [c.case_id for c in dataset.cases] == list(MSD_CASES)
    case = dataset.cases[1]
    assert case.four_d is True
    assert case.images == [str(tmp_path / "imagesTr" / "BRATS_002.nii.gz")]
    assert case.label == str(tmp_path / "labelsTr" / "BRATS_002.nii.gz")
    assert dataset.problems == []


def test_msd_one_modality_is_3d(tmp_path):
    write_msd_4d(tmp_path, modalities=("CT",))
    dataset = read_dataset(tmp_path)
    assert dataset.channel_names == ["CT"] and all(not c.four_d for c in dataset.cases)


def test_msd_problems(tmp_path):
    write_msd_4d(tmp_path)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["training"].append(dict(meta["training"][0]))  # listed twice
    meta["training"].append({"image": "./imagesTr/BRATS_009.nii.gz", "label": "./labelsTr/BRATS_009.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    (tmp_path / "labelsTr" / "BRATS_002.nii.gz").unlink()
    (tmp_path / "imagesTr" / "BRATS_010.nii.gz").write_bytes(b"x")
    dataset = read_dataset(tmp_path)
    assert dataset.problems == [
        "case 'BRATS_002': label missing: expected labelsTr/BRATS_002.nii.gz (listed in dataset.json)",
        "case 'BRATS_001': duplicate case id: dataset.json training[3] (./imagesTr/BRATS_001.nii.gz) and "
        "training[0] are both case 'BRATS_001'; the first is used",
        "case 'BRATS_009': image missing: expected imagesTr/BRATS_009.nii.gz (listed in dataset.json)",
        "case 'BRATS_009': label missing: expected labelsTr/BRATS_009.nii.gz (listed in dataset.json)",
        "case 'BRATS_010': imagesTr/BRATS_010.nii.gz is not listed in dataset.json training: add it or remove the file",
        "dataset.json numTraining is 3, but its training list has 5 entries: fix numTraining",
    ]
    assert [(c.case_id, c.label is None) for c in dataset.cases] == [
        ("BRATS_001", False), ("BRATS_002", True), ("BRATS_003", False)]


def test_nnunet_v1_lists_case_names_of_channel_files(tmp_path):
    """nnU-Net v1's dataset.json: an MSD-style training list naming imagesTr/<case>.nii.gz, whose files are
    imagesTr/<case>_0000.nii.gz, _0001..."""
    write_nnunet_v2(tmp_path, cases=("la_003", "la_004", "la_005"))
    (tmp_path / "imagesTr" / "la_005_0001.nii.gz").unlink()
    meta = {"modality": {"0": "FLAIR", "1": "T1c"}, "labels": {"0": "background", "1": "edema", "2": "tumour"},
            "numTraining": 3, "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                                           for c in ("la_003", "la_004", "la_005")]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    dataset = read_dataset(tmp_path)
    assert dataset.layout == "msd" and dataset.labels == LABELS
    assert [c.case_id for c in dataset.cases] == ["la_003", "la_004"]
    assert dataset.cases[1].images == [str(tmp_path / "imagesTr" / f"la_004_000{c}.nii.gz") for c in (0, 1)]
    assert not dataset.cases[1].four_d
    assert dataset.problems == ["case 'la_005': channel 1 (T1c) missing: expected imagesTr/la_005_0001.nii.gz"]


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_plain_folder(tmp_path, ending):
    write_folder(tmp_path, cases=("a", "b", "c", "d"), channels=2, ending=ending)
    (tmp_path / "imagesTr" / f"c_0001{ending}").unlink()
    dataset = read_dataset(tmp_path)
    assert (dataset.layout, dataset.file_ending, dataset.labels) == ("folder", ending, {})
    assert dataset.channel_names == ["0", "1"]  # the majority has two channels
    assert [c.case_id for c in dataset.cases] == ["a", "b", "d"]
    assert dataset.problems == [f"case 'c': channel 1 (1) missing: expected imagesTr/c_0001{ending}"]


def test_plain_folder_image_without_label_and_misnamed_file(tmp_path):
    write_folder(tmp_path, cases=("a", "b"))
    (tmp_path / "labelsTr" / "b.nii.gz").unlink()
    (tmp_path / "imagesTr" / "stray.nii.gz").write_bytes(b"x")
    dataset = read_dataset(tmp_path)
    assert dataset.problems == [
        "case 'stray': imagesTr/stray.nii.gz is not named <case>_XXXX.nii.gz (a 4-digit channel index): rename "
        "it, e.g. stray_0000.nii.gz",
        "case 'b': image without label: expected labelsTr/b.nii.gz",
    ]


def test_our_synthetic_dataset_keeps_working(tmp_path):
    root = write_synth(tmp_path / "synth", cases=4)
    dataset = read_dataset(root)
    assert dataset.layout == "msd" and dataset.channel_names == ["CT"]
    assert dataset.labels == {"background": 0, "lesion": 1} and dataset.file_ending == ".nii.gz"
    assert [c.case_id for c in dataset.cases] == ["synth_000", "synth_001", "synth_002"]
    assert dataset.cases[0].images == [str(root / "imagesTr" / "synth_000_0000.nii.gz")]
    assert dataset.cases[0].label == str(root / "labelsTr" / "synth_000.nii.gz")
    assert dataset.problems == [] and not any(c.four_d for c in dataset.cases)
    test = read_dataset(root, split="Ts")
    assert [(c.case_id, Path(c.images[0]).name, Path(c.label).name) for c in test.cases] == [
        ("synth_003", "synth_003_0000.nii.gz", "synth_003.nii.gz")]


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="dataset folder not found.*imagesTr/ and labelsTr/"):
        read_dataset(tmp_path / "nowhere")


def test_invalid_dataset_json(tmp_path):
    write_nnunet_v2(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="dataset.json' is not valid JSON"):
        read_dataset(tmp_path)


def test_dataset_json_of_neither_dialect(tmp_path):
    write_nnunet_v2(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x", "labels": {"background": 0, "a": 1}}))
    with pytest.raises(InputError, match="neither an nnU-Net v2 dataset.json.*nor an MSD one"):
        read_dataset(tmp_path)


@pytest.mark.parametrize("with_json", [False, True])
def test_no_case_at_all(tmp_path, with_json):
    (tmp_path / "imagesTr").mkdir()
    if with_json:
        (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS,
                                                           "file_ending": ".nii.gz", "numTraining": 0}))
    with pytest.raises(InputError, match=r"no training cases in .*expected imagesTr/<case>_0000.nii.gz"):
        read_dataset(tmp_path)
