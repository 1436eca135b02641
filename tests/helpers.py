"""Small builders shared by several test files: synthetic CT-like volumes, an MSD-layout dataset, DICOM
folders and a tiny checkpoint. Everything is seeded and written under the caller's ``tmp_path``."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tests.conftest import blob_label, make_affine, save_nifti


def hu_volume(shape=(24, 24, 12), seed=0) -> np.ndarray:
    """int16 HU values spanning air to bone, with the extreme values DICOM must keep."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(-1000, 2000, size=shape).astype(np.int16)
    volume.flat[0] = -1024
    volume.flat[-1] = 3071
    return volume


def ct_case(shape=(24, 24, 12), seed=0, label_value=1) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like (image, label) pair: air border around a soft-tissue body holding bright lesions."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000.0, np.float32)
    body = tuple(slice(3, s - 3) if s > 8 else slice(1, s - 1) for s in shape)
    image[body] = 40.0 + rng.normal(0, 5, size=image[body].shape)
    label = blob_label(shape, seed=seed)
    body_mask = np.zeros(shape, bool)
    body_mask[body] = True
    label = (label.astype(bool) & body_mask).astype(np.uint8) * label_value
    image[label > 0] = 150.0
    return image, label


def write_msd_dataset(root: Path, n_cases=3, shape=(24, 24, 12), spacing=(1.0, 1.0, 2.5), label_values=None,
                      with_manifest=True) -> Path:
    """``root/imagesTr/case_XXX_0000.nii.gz`` + ``root/labelsTr/case_XXX.nii.gz`` (+ ``dataset.json``)."""
    affine = make_affine("RAS", spacing=spacing, origin=(0.0, 0.0, 0.0))
    training = []
    for n in range(n_cases):
        value = 1 if label_values is None else label_values[n]
        image, label = ct_case(shape, seed=n, label_value=value)
        case = f"case_{n:03d}"
        save_nifti(image, affine, root / "imagesTr" / f"{case}_0000.nii.gz")
        save_nifti(label, affine, root / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}_0000.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    if with_manifest:
        manifest = {"name": "tiny", "labels": {"background": 0, "lesion": 1}, "numTraining": n_cases,
                    "training": training}
        (root / "dataset.json").write_text(json.dumps(manifest))
    return root


def merge_series(folders: Sequence[Path], target: Path) -> list[Path]:
    """Move the slice files of several DICOM series folders into one folder (names made unique)."""
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for n, folder in enumerate(folders):
        for path in sorted(folder.iterdir()):
            dest = target / f"s{n}_{path.name}"
            shutil.move(str(path), dest)
            moved.append(dest)
        folder.rmdir()
    return moved


def tiny_config_overrides(*extra: str) -> list[str]:
    """Overrides for a U-Net small enough to run on a CPU in well under a second."""
    return [
        "model.features=2",
        "model.depth=2",
        "model.deep_supervision=false",
        "preprocess.spacing=null",
        "preprocess.crop_foreground=false",
        "inference.roi_size=[16, 16, 8]",
        "inference.sw_batch_size=1",
        "sampling.patch_size=[16, 16, 8]",
        *extra,
    ]


def tiny_checkpoint(path: Path, *extra_overrides: str) -> Path:
    """A randomly initialised tiny U-Net saved as a medseg checkpoint."""
    import torch

    from pipeline.config import load_config
    from pipeline.model import build_model
    from pipeline.model.checkpoint import Checkpoint, save_checkpoint

    torch.manual_seed(0)
    config = load_config(None, tiny_config_overrides(*extra_overrides))
    network = build_model(config.model, in_channels=1, out_channels=config.num_classes)
    return save_checkpoint(path, Checkpoint(config=config, state_dict=network.state_dict()))


@contextmanager
def torch_threads(n: int):
    """Run with ``n`` intra-op threads, then restore. Tiny tensors gain nothing from threads, and on a
    busy 2-core machine two spinning OpenMP threads make a 50 ms segmentation take seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_corners_at_same_world_position(volume, affine, read_array, read_affine) -> None:
    """Each corner voxel of ``volume`` is found, with its value, at the same world position after reading."""
    shape = np.array(volume.shape)
    for corner in np.ndindex(2, 2, 2):
        index = np.array(corner) * (shape - 1)
        world = affine @ [*index, 1]
        read_index = np.rint(np.linalg.solve(read_affine, world)[:3]).astype(int)
        np.testing.assert_allclose(read_affine @ [*read_index, 1], world, atol=1e-4)
        assert read_array[tuple(read_index)] == volume[tuple(index)]


class Pointwise(torch.nn.Module):
    """logit_c = w_c * x + b_c per voxel (x: the windowed intensity, 0..1): a known probability per voxel,
    and flip-equivariant, so every window (and every mirror of it) agrees on every voxel."""

    def __init__(self, weights, biases):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(weights, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.b = torch.nn.Parameter(torch.tensor(biases, dtype=torch.float32).view(1, -1, 1, 1, 1))

    def forward(self, x):
        return x[:, :1] * self.w + self.b
