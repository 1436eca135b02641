"""A briefly trained tiny U-Net (bright lesions in soft tissue) and held-out NIfTI cases, shared by the
export tests: every test here exports from it and compares with what ``segment`` gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_affine, save_nifti
from tests.helpers import ct_case, tiny_config_overrides, torch_threads

SHAPE = (40, 36, 14)
TRAIN_STEPS = 60
OVERRIDES = (
    "model.features=4",
    "preprocess.spacing=[1.2, 1.2, 2.5]",
    "preprocess.crop_foreground=true",
    "inference.roi_size=[24, 24, 8]",
    "inference.sw_batch_size=2",
    "inference.min_component_mm3=4",
)


def train_tiny(path: Path, *extra: str) -> Path:
    """A tiny U-Net fitted for TRAIN_STEPS Adam steps to windowed (or z-scored, with
    ``preprocess.intensity.mode=zscore``) synthetic CT volumes (seeded), saved as a
    medseg checkpoint: its masks are non-empty and follow the lesions, so Dice against it means something."""
    from pipeline.config import load_config
    from pipeline.model import build_model
    from pipeline.model.checkpoint import Checkpoint, save_checkpoint

    config = load_config(None, tiny_config_overrides(*OVERRIDES, *extra))
    torch.manual_seed(0)
    network = build_model(config.model, in_channels=1, out_channels=config.num_classes)
    low, high = config.preprocess.intensity.window
    pairs = [ct_case(SHAPE, seed=s) for s in range(3)]
    if config.preprocess.intensity.mode == "zscore":
        inputs = [(i - i.mean()) / i.std() for i, _ in pairs]
    else:
        inputs = [np.clip((i - low) / (high - low), 0, 1) for i, _ in pairs]
    x = torch.from_numpy(np.stack(inputs)[:, None]).float()
    y = torch.from_numpy(np.stack([lab for _, lab in pairs])).long()
    x, y = x[..., :8], y[..., :8]  # the depth must divide by 2^(depth-1): 8 slices
    optimiser = torch.optim.Adam(network.parameters(), lr=0.03)
    weight = torch.tensor([1.0, 3.0])
    with torch_threads(1):
        for _ in range(TRAIN_STEPS):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(network(x), y, weight=weight)
            loss.backward()
            optimiser.step()
    return save_checkpoint(path, Checkpoint(config=config, state_dict=network.state_dict(), epoch=1))


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("export-model") / "best.pt")


@pytest.fixture(scope="session")
def held_out_cases(tmp_path_factory) -> Path:
    """Four unseen cases as NIfTI: RAS, LPS, feet-first and oblique (rotated about two axes: MONAI's
    Spacingd then centres its grid instead of anchoring it at a corner), with other spacings than the
    training's."""
    folder = tmp_path_factory.mktemp("export-cases")
    for n, (orientation, spacing) in enumerate([("RAS", (1.0, 1.0, 2.5)), ("LPS", (0.9, 1.1, 2.5)),
                                                 ("feet_first", (1.3, 1.0, 2.0)), ("oblique", (0.8, 0.8, 2.5))]):
        image, _ = ct_case(SHAPE, seed=10 + n)
        save_nifti(image.astype(np.int16), make_affine(orientation, spacing=spacing), folder / f"case_{n}_0000.nii.gz")
    return folder


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
