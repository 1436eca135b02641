"""Multi-channel segmentation: the channels reach the network in order, on channel 0's grid, and the mask
is written in channel 0's geometry; a 4D NIfTI and the same case as _0000/_0001 files give equal masks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.batch import segment_folder
from pipeline.config import load_config
from pipeline.infer import Segmenter
from tests.conftest import blob_label, make_affine, save_nifti


class SecondChannelEcho(torch.nn.Module):
    """Stand-in network: the lesion is wherever channel 1 is bright; channel 0 is ignored."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        assert x.shape[1] == 2, x.shape
        return torch.cat([(0.5 - x[:, 1:2]) * 20, (x[:, 1:2] - 0.5) * 20], dim=1)


def two_channel_config(*extra):
    return load_config(None, [
        "data.channels=[FLAIR, T1c]",
        "preprocess.spacing=null",
        "preprocess.intensity.window=[0, 1]",
        "preprocess.crop_foreground=false",
        "inference.roi_size=[16, 16, 8]",
        "inference.min_component_mm3=0",
        *extra,
    ])


@pytest.fixture
def two_channel_case():
    affine = make_affine("oblique")
    decoy = blob_label(seed=3)[::-1].copy()  # channel 0: another pattern, which must not show up
    target = blob_label(seed=1)
    return affine, decoy.astype(np.float32), target.astype(np.float32)


def test_mask_follows_channel_one_in_channel_zero_geometry(tmp_path, two_channel_case):
    affine, decoy, target = two_channel_case
    save_nifti(decoy, affine, tmp_path / "in" / "case_0000.nii.gz")
    save_nifti(target, affine, tmp_path / "in" / "case_0001.nii.gz")

    results = segment_folder(tmp_path / "in", tmp_path / "out",
                             Segmenter(SecondChannelEcho(), two_channel_config(), "cpu"), qc=False)

    assert [(r.case_id, r.status) for r in results] == [("case", "done")]
    out = nib.load(str(tmp_path / "out" / "case_seg.nii.gz"))
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.dataobj), target.astype(np.uint8))


def test_4d_nifti_and_channel_files_give_identical_masks(tmp_path, two_channel_case):
    affine, decoy, target = two_channel_case
    save_nifti(decoy, affine, tmp_path / "files" / "case_0000.nii.gz")
    save_nifti(target, affine, tmp_path / "files" / "case_0001.nii.gz")
    save_nifti(np.stack([decoy, target], -1), affine, tmp_path / "four_d" / "case.nii.gz")
    segmenter = Segmenter(SecondChannelEcho(), two_channel_config("preprocess.spacing=[1.2, 1.1, 2.0]"), "cpu")

    segment_folder(tmp_path / "files", tmp_path / "out_files", segmenter, qc=False)
    segment_folder(tmp_path / "four_d", tmp_path / "out_4d", segmenter, qc=False)

    a = nib.load(str(tmp_path / "out_files" / "case_seg.nii.gz"))
    b = nib.load(str(tmp_path / "out_4d" / "case_seg.nii.gz"))
    assert np.asarray(a.dataobj).sum() > 100
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine)


def test_a_case_missing_a_channel_fails_alone(tmp_path, two_channel_case):
    affine, decoy, target = two_channel_case
    save_nifti(decoy, affine, tmp_path / "in" / "good_0000.nii.gz")
    save_nifti(target, affine, tmp_path / "in" / "good_0001.nii.gz")
    save_nifti(decoy, affine, tmp_path / "in" / "lonely_0000.nii.gz")

    results = {r.case_id: r for r in segment_folder(tmp_path / "in", tmp_path / "out",
                                                    Segmenter(SecondChannelEcho(), two_channel_config(), "cpu"),
                                                    qc=False)}

    assert results["good"].status == "done"
    assert results["lonely"].status == "failed"
    assert "channel 1 (T1c)" in results["lonely"].error and "lonely_0001.nii.gz" in results["lonely"].error
    assert not (tmp_path / "out" / "lonely_seg.nii.gz").exists()


def test_multichannel_checkpoint_builds_the_right_network(tmp_path):
    from pipeline.model import build_model
    from pipeline.model.checkpoint import Checkpoint, save_checkpoint

    config = load_config(None, ["data.channels=[FLAIR, T1c, DWI]", "model.features=4", "model.depth=2",
                                "inference.roi_size=[16, 16, 8]"])
    network = build_model(config.model, in_channels=config.in_channels, out_channels=config.num_classes)
    save_checkpoint(tmp_path / "m.pt", Checkpoint(config, network.state_dict()))

    segmenter = Segmenter.from_checkpoint(tmp_path / "m.pt", device="cpu", backend="torch")

    assert segmenter.config.data.channels == ["FLAIR", "T1c", "DWI"]
    assert segmenter.network.in_channels == 3
    out = segmenter.probabilities(torch.zeros(3, 16, 16, 8))
    assert tuple(out.shape) == (2, 16, 16, 8)


def _ball(shape, affine, centre, radius):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (np.linalg.norm(world - centre, axis=1) < radius).reshape(shape)


def _world(mask, affine):
    ijk = np.argwhere(mask > 0)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def write_two_series_study(root, centre, radius=6.0):
    """One MR study, two series: FLAIR (channel 0, oblique 1x1x3 mm) and T1c on another grid (LPS,
    1.4x1.4x2 mm, shifted) showing a ball at ``centre`` (world RAS mm). Returns channel 0's affine/shape."""
    from pipeline.io.dicom_write import write_dicom_series

    shape0 = (40, 36, 12)
    affine0 = make_affine("oblique", spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0))
    affine0[:3, 3] = centre - affine0[:3, :3] @ np.array([18.3, 20.1, 5.6])
    shape1 = (34, 30, 20)
    affine1 = make_affine("LPS", spacing=(1.4, 1.4, 2.0))
    affine1[:3, 3] = centre - affine1[:3, :3] @ np.array([15.2, 13.7, 9.4])
    flair = np.full(shape0, 300, np.int16)
    t1c = np.where(_ball(shape1, affine1, centre, radius), 1000, 0).astype(np.int16)
    study = "1.2.826.0.1.3680043.8.498.424242"
    write_dicom_series(flair, affine0, root / "study" / "flair", series_description="AX FLAIR", series_number=3,
                       modality="MR", rescale_intercept=0.0, study_uid=study)
    write_dicom_series(t1c, affine1, root / "study" / "t1", series_description="AX T1 POST GAD", series_number=7,
                       modality="MR", rescale_intercept=0.0, study_uid=study)
    return shape0, affine0


def test_dicom_study_channels_land_at_the_same_millimetres(tmp_path):
    """A ball seen only in channel 1 (another series, another grid) is segmented at its place in world
    coordinates, on channel 0's grid; the manifest names both series."""
    from pipeline.io.geometry import closest_canonical

    centre = np.array([12.0, -30.0, 45.0])
    shape0, affine0 = write_two_series_study(tmp_path / "in", centre)
    config = two_channel_config("preprocess.intensity.window=[0, 1000]",
                                "input.channels=[{name: FLAIR, series_description: '*FLAIR*'},"
                                " {name: T1c, series_description: '*T1*POST*'}]")

    results = segment_folder(tmp_path / "in", tmp_path / "out", Segmenter(SecondChannelEcho(), config, "cpu"),
                             qc=False)

    assert [(r.case_id, r.status) for r in results] == [("study", "done")], [r.error for r in results]
    out = nib.load(str(tmp_path / "out" / "study_seg.nii.gz"))
    _, expected_affine = closest_canonical(np.zeros(shape0), affine0)  # channel 0's grid as it is read
    np.testing.assert_allclose(out.affine, expected_affine, atol=1e-4)
    mask = np.asarray(out.dataobj)
    assert mask.sum() > 50
    assert np.linalg.norm(_world(mask, out.affine).mean(0) - centre) < 1.0  # mm
    import json

    row = json.loads((tmp_path / "out" / "manifest.json").read_text())["cases"][0]
    assert len(row["channel_series_uids"]) == 2 and row["series_uid"] == row["channel_series_uids"][0]
    csv_text = (tmp_path / "out" / "manifest.csv").read_text()
    assert ";".join(row["channel_series_uids"]) in csv_text


def test_a_study_without_a_matching_series_fails_naming_the_channel(tmp_path):
    centre = np.array([0.0, 0.0, 0.0])
    write_two_series_study(tmp_path / "in", centre)
    config = two_channel_config("input.channels=[{name: FLAIR, series_description: '*FLAIR*'},"
                                " {name: DWI, series_description: '*DWI*'}]")

    results = segment_folder(tmp_path / "in", tmp_path / "out", Segmenter(SecondChannelEcho(), config, "cpu"),
                             qc=False)

    by_status = {r.status: r for r in results}
    assert "channel 1 (DWI): no series of the study match" in by_status["failed"].error
    assert "not a channel of input.channels" in by_status["skipped"].error  # the T1 series, unused


def test_convert_writes_a_study_as_channel_files(tmp_path):
    from pipeline.config.load import load_config as load
    from pipeline.convert import convert_folder
    from pipeline.io.geometry import closest_canonical

    centre = np.array([5.0, 5.0, 5.0])
    shape0, affine0 = write_two_series_study(tmp_path / "in", centre)
    grid, grid_affine = closest_canonical(np.zeros(shape0), affine0)
    select = load(None, ["input.channels=[{name: FLAIR, series_description: '*FLAIR*'},"
                         " {name: T1c, series_description: '*T1*'}]"]).input

    rows = convert_folder(tmp_path / "in", tmp_path / "out", select)

    assert [r.status for r in rows] == ["converted"]
    a = nib.load(str(tmp_path / "out" / "study_0000.nii.gz"))
    b = nib.load(str(tmp_path / "out" / "study_0001.nii.gz"))
    assert a.shape == b.shape == grid.shape
    np.testing.assert_allclose(a.affine, grid_affine, atol=1e-4)
    np.testing.assert_allclose(b.affine, grid_affine, atol=1e-4)
    assert (np.asarray(a.dataobj) == 300).all()  # FLAIR as written
    t1 = np.asarray(b.dataobj)
    assert np.linalg.norm(_world(t1 > 500, b.affine).mean(0) - centre) < 1.0
