"""Sliding-window inference with stand-in networks whose output is known (MONAI's ``x + 1`` style):
3D "same" networks, 2D networks run slice by slice, and "valid" networks whose output is smaller than
their input, which must still be reassembled to the full volume exactly."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import InferenceConfig
from pipeline.infer.sliding import predict_logits
from pipeline.model import UNet
from tests.helpers import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def volume(shape, seed=0) -> torch.Tensor:
    return torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed))


def inference(roi, blend="gaussian", overlap=0.25, sw_batch_size=2) -> InferenceConfig:
    return InferenceConfig(roi_size=list(roi), overlap=overlap, blend=blend, sw_batch_size=sw_batch_size)


class Known(torch.nn.Module):
    """A network whose output is a known function of its input; records the input shapes it is given."""

    def __init__(self, fn):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.fn = fn
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return self.fn(x)


class ValidStandIn(Known):
    """A "valid" network: its output lacks ``margin`` voxels on each side; channels [x, -x] of the centre."""

    def __init__(self, margin):
        super().__init__(None)
        self._margin = tuple(margin)

    def margin(self, input_size):
        assert len(input_size) == len(self._margin)
        return self._margin

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        crop = tuple(slice(m, x.shape[2 + i] - m) for i, m in enumerate(self._margin))
        centre = x[(slice(None), slice(None)) + crop]
        return torch.cat([centre, -centre], dim=1)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_3d_same_network(blend, overlap):
    image = volume((30, 27, 13))
    network = Known(lambda x: torch.cat([x, x + 1], dim=1))

    logits = predict_logits(network, image, inference((16, 16, 8), blend, overlap), spatial_dims=3)

    assert tuple(logits.shape) == (2, 30, 27, 13)
    torch.testing.assert_close(logits[0], image[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], image[0] + 1, atol=1e-5, rtol=0)
    assert all(shape[1:] == (1, 16, 16, 8) for shape in network.seen)
    assert all(shape[0] <= 2 for shape in network.seen)  # sw_batch_size


def test_3d_volume_smaller_than_window():
    image = volume((10, 12, 5))
    network = Known(lambda x: torch.cat([x, x + 1], dim=1))
    logits = predict_logits(network, image, inference((16, 16, 8)), spatial_dims=3)
    assert tuple(logits.shape) == (2, 10, 12, 5)
    torch.testing.assert_close(logits[1], image[0] + 1, atol=1e-5, rtol=0)


def test_accepts_a_metatensor():
    from monai.data import MetaTensor

    image = MetaTensor(volume((20, 18, 9)))
    logits = predict_logits(Known(lambda x: torch.cat([x, -x], 1)), image, inference((16, 16, 8)), 3)
    assert type(logits) is torch.Tensor
    torch.testing.assert_close(logits[1], -image.as_tensor()[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_2d_network_runs_slice_by_slice(blend):
    image = volume((30, 27, 7), seed=1)
    network = Known(lambda x: torch.cat([x * 2, -x], dim=1))

    logits = predict_logits(network, image, inference((16, 16), blend), spatial_dims=2)

    assert tuple(logits.shape) == (2, 30, 27, 7)
    torch.testing.assert_close(logits[0], image[0] * 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], -image[0], atol=1e-5, rtol=0)
    assert network.seen and all(len(shape) == 4 and shape[1:] == (1, 16, 16) for shape in network.seen)


def test_2d_network_sees_single_slices():
    """A network that mixes slices would give a different answer: each slice is its own input."""
    image = volume((16, 16, 5), seed=2)
    network = Known(lambda x: x.mean(dim=(2, 3), keepdim=True).expand(-1, 2, *x.shape[2:]).clone())
    logits = predict_logits(network, image, inference((16, 16)), spatial_dims=2)
    per_slice_mean = image[0].mean(dim=(0, 1))
    torch.testing.assert_close(logits[0], per_slice_mean.expand(16, 16, 5), atol=1e-5, rtol=0)




@pytest.mark.parametrize(
    "blend, overlap",
    [
        pytest.param("constant", 0.1),
        pytest.param("constant", 0.5),
        pytest.param("gaussian", 0.1),
        pytest.param("gaussian", 0.5),
    ],
)
def test_valid_network_is_reassembled_exactly(blend, overlap):
    image = volume((40, 33, 21), seed=3)
    network = ValidStandIn((3, 3, 2))

    logits = predict_logits(network, image, inference((20, 20, 12), blend, overlap), spatial_dims=3)

    assert tuple(logits.shape) == (2, 40, 33, 21)
    torch.testing.assert_close(logits[0], image[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], -image[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("blend, tolerance", [("constant", 1e-4), ("gaussian", 5e-2)])
@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.5])
def test_valid_network_puts_every_voxel_in_place(blend, overlap, tolerance):
    """Placement, apart from the band leak above: a one-voxel shift of random values would be off by ~0.3."""
    image = volume((40, 33, 21), seed=3)
    network = ValidStandIn((3, 3, 2))

    logits = predict_logits(network, image, inference((20, 20, 12), blend, overlap), spatial_dims=3)

    assert tuple(logits.shape) == (2, 40, 33, 21)
    torch.testing.assert_close(logits[0], image[0], atol=tolerance, rtol=0)
    torch.testing.assert_close(logits[1], -image[0], atol=tolerance, rtol=0)
    assert network.seen and all(shape[1:] == (1, 20, 20, 12) for shape in network.seen)


def test_valid_network_borders_come_from_full_context():
    """Border voxels of the volume are predicted from the (replicate-)padded context, not left at zero."""
    image = volume((40, 33, 21), seed=4) + 1.0  # strictly positive: a hole would show as 0
    logits = predict_logits(ValidStandIn((3, 3, 2)), image, inference((20, 20, 12), "constant", 0.1), 3)
    channel = logits[0]
    for face in (channel[0], channel[-1], channel[:, 0], channel[:, -1], channel[..., 0], channel[..., -1]):
        assert face.min() >= 1.0 - 1e-4
    torch.testing.assert_close(logits[0], image[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("blend", ["constant", pytest.param("gaussian")])
def test_2d_valid_network_is_reassembled_exactly(blend):
    image = volume((40, 33, 4), seed=5)
    network = ValidStandIn((4, 3))
    logits = predict_logits(network, image, inference((20, 20), blend, 0.1), spatial_dims=2)
    assert tuple(logits.shape) == (2, 40, 33, 4)
    torch.testing.assert_close(logits[0], image[0], atol=1e-5, rtol=0)
    assert all(len(shape) == 4 and shape[1:] == (1, 20, 20) for shape in network.seen)


@pytest.mark.parametrize(
    "spatial_dims, roi, shape", [(3, (24, 24, 24), (14, 12, 6)), (2, (28, 28), (20, 18, 2))]
)
def test_real_valid_unet_covers_the_volume(spatial_dims, roi, shape):
    torch.manual_seed(0)
    network = UNet(spatial_dims, 1, 2, features=2, depth=2, padding="valid").eval()
    roi = network.valid_input_size(roi)
    assert any(network.margin(roi))

    logits = predict_logits(network, volume(shape, seed=6), inference(roi, "gaussian", 0.25), spatial_dims)

    assert tuple(logits.shape) == (2, *shape)
    assert torch.isfinite(logits).all()
    assert logits.abs().sum() > 0
    # The margin band of every window is ignored, so no voxel is left at the padding value 0 in both channels.
    assert ((logits[0] == 0) & (logits[1] == 0)).sum() == 0


def test_real_same_unet_matches_a_single_forward_pass():
    """With the window covering the whole volume, sliding-window inference is one forward pass."""
    torch.manual_seed(0)
    network = UNet(3, 1, 2, features=2, depth=2, padding="same").eval()
    image = volume((16, 16, 8), seed=7)
    logits = predict_logits(network, image, inference((16, 16, 8), "constant"), spatial_dims=3)
    with torch.no_grad():
        expected = network(image[None])[0]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
