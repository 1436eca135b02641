"""Deep supervision with valid padding: every head learns from the label at its own voxels.

The centre of each head voxel is measured, not derived: a probe copy of the U-Net with averaging
convolutions, average pooling and the decoder's upsampled half switched off maps a coordinate ramp to the
coordinate of each output voxel's centre (the skip's grid, which the decoder's output lives on).
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceFocalLoss
from torch import nn

from pipeline.config import load_config
from pipeline.model import UNet
from pipeline.training.loss import build_loss, head_targets
from pipeline.training.trainer import Trainer
from tests.helpers import torch_threads, write_msd_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def centre_probe(spatial_dims: int, depth: int) -> UNet:
    """A valid U-Net whose every head outputs the input at its voxels' centres (for a linear input)."""
    probe = UNet(spatial_dims, 1, 2, features=2, depth=depth, norm="none", padding="valid",
                 deep_supervision=True).double().train()
    pool = nn.AvgPool2d if spatial_dims == 2 else nn.AvgPool3d
    for down in probe.encoders[1:]:
        down[0] = pool(2)
    with torch.no_grad():
        for module in probe.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                module.weight.fill_(1.0 / module.weight[0].numel())
                if module.bias is not None:
                    module.bias.zero_()
        for up in probe.decoders:
            first = up.conv[0][0]
            half = first.weight.shape[1] // 2  # [skip, upsampled]: keep the skip, drop the upsampled half
            first.weight.zero_()
            first.weight[:, :half] = 1.0 / (half * 3**spatial_dims)
    return probe


def voxel_centres(probe: UNet, size: tuple[int, ...]) -> list[list[torch.Tensor]]:
    """Per head, per axis: the input coordinate of each output voxel's centre."""
    per_axis = []
    for axis in range(len(size)):
        shape = [1] * len(size)
        shape[axis] = size[axis]
        ramp = (torch.arange(size[axis], dtype=torch.float64) + 1.0).reshape(shape).expand(*size)
        with torch.no_grad():
            outputs = probe(ramp[None, None].contiguous())
        per_axis.append([out[0, 0] - 1.0 for out in outputs])
    return [list(heads) for heads in zip(*per_axis)]


def label_at_centres(label: torch.Tensor, centres: list[torch.Tensor]) -> torch.Tensor:
    """``label`` (B, 1, *S) at each head voxel's centre; a centre between two voxels takes the upper one
    (MONAI's nearest-exact downsampling, which same-padding heads get)."""
    index = [torch.floor(torch.round(c * 2) / 2 + 0.5).long() for c in centres]  # centres are whole or halves
    return label[(slice(None), slice(None), *index)]


CASES = {  # spatial_dims, depth, patch (a valid input size)
    "2d_depth4": (2, 4, (100, 124)),
    "3d_depth3": (3, 3, (52, 60, 44)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_probe_centres_are_a_strided_grid(name):
    """Sanity of the probe itself: head k's centres step by 2**k and lie inside the input."""
    spatial_dims, depth, patch = CASES[name]
    for k, centres in enumerate(voxel_centres(centre_probe(spatial_dims, depth), patch)):
        for axis, c in enumerate(centres):
            line = c.movedim(axis, 0).reshape(c.shape[axis], -1)[:, 0]
            torch.testing.assert_close(line[1:] - line[:-1], torch.full_like(line[1:], 2.0**k))
            assert 0 <= line.min() and line.max() <= patch[axis] - 1


def trainer_for(tmp_path, spatial_dims, depth, patch) -> Trainer:
    root = write_msd_dataset(tmp_path / "data", n_cases=3)
    size = "[" + ", ".join(map(str, patch)) + "]"
    cfg = load_config(None, [
        f"data.root={root}", f"train.out_dir={tmp_path / 'run'}", "data.val_fraction=0",
        f"model.spatial_dims={spatial_dims}", "model.padding=valid", "model.features=2",
        f"model.depth={depth}",
        "model.deep_supervision=true", f"sampling.patch_size={size}", f"inference.roi_size={size}",
        "sampling.batch_size=1", "sampling.samples_per_volume=1", "preprocess.spacing=null",
        "preprocess.crop_foreground=false", "train.epochs=1", "train.steps_per_epoch=1",
    ])
    trainer = Trainer(cfg)
    trainer.setup(resume=False)
    trainer.close()
    return trainer


@pytest.mark.parametrize("name", list(CASES))
def test_each_head_learns_the_label_at_its_own_voxels(tmp_path, monkeypatch, name):
    spatial_dims, depth, patch = CASES[name]
    trainer = trainer_for(tmp_path, spatial_dims, depth, patch)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, *patch, generator=generator)
    label = (torch.rand(2, 1, *patch, generator=generator) > 0.5).float()  # a one-voxel shift changes ~half

    seen: list[tuple[tuple[int, ...], torch.Tensor]] = []
    original = DiceFocalLoss.forward

    def recording(self, input, target):
        seen.append((tuple(input.shape[2:]), target.detach().clone()))
        return original(self, input, target)

    monkeypatch.setattr(DiceFocalLoss, "forward", recording)
    trainer.model.train()
    trainer.train_step({"image": image, "label": label})

    centres = voxel_centres(centre_probe(spatial_dims, depth), patch)
    assert [shape for shape, _ in seen] == [trainer.model.output_size(patch, k) for k in range(depth - 1)]
    for k, ((shape, target), head_centres) in enumerate(zip(seen, centres)):
        expected = label_at_centres(label, head_centres)
        assert tuple(target.shape[2:]) == shape
        assert torch.equal(target.float(), expected), f"head {k} (1/{2**k} resolution) is misaligned"


def test_head_targets_of_same_padding_are_monais_nearest_downsampling():
    label = (torch.rand(2, 1, 16, 24, 8, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    sizes = [(16, 24, 8), (8, 12, 4), (4, 6, 2)]
    targets = head_targets(label, sizes)
    for target, size in zip(targets, sizes):
        assert torch.equal(target, nn.functional.interpolate(label, size=size, mode="nearest-exact"))


def test_head_targets_refuse_a_head_wider_than_the_label():
    with pytest.raises(ValueError, match="head 1"):
        head_targets(torch.zeros(1, 1, 10, 10), [(6, 6), (6, 6)])


def test_valid_deep_supervision_loss_is_finite_and_weighted():
    net = UNet(2, 1, 2, features=2, depth=3, padding="valid", deep_supervision=True).train()
    patch = net.valid_input_size((44, 52))
    label = (torch.rand(1, 1, *patch, generator=torch.Generator().manual_seed(2)) > 0.8).float()
    outputs = net(torch.rand(1, 1, *patch, generator=torch.Generator().manual_seed(3)))
    cfg = load_config(None, []).loss
    deep, base = build_loss(cfg, True), build_loss(cfg, False)
    targets = head_targets(label, [o.shape[2:] for o in outputs])
    expected = sum(w * base(o, t) for w, o, t in zip([1.0, 0.5], outputs, targets))
    value = deep(outputs, label)
    assert math.isfinite(value.item())
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
