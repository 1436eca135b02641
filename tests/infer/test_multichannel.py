"""Multi-channel segmentation: the channels reach the network in order, on channel 0's grid, and the mask
is written in channel 0's geometry; a 4D NIfTI and the same case as _0000/_0001 files give equal masks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.infer import Segmenter, segment_folder
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
def two_channel_case(tmp_path):
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
