"""Ensembles and mirror TTA: softmax probabilities averaged window batch by window batch, checked with
networks whose output is known (pointwise, or a function of the position in the window)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError
from pipeline.infer import Segmenter
from pipeline.infer.ensemble import averaged_probabilities, checkpoint_paths, mirror_flips, tta_label
from tests.helpers import Pointwise, tiny_checkpoint, tiny_config_overrides, torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


class Ramp(torch.nn.Module):
    """Ignores its input: logit 1 = the voxel's index along ``axis`` of the window, logit 0 = 0."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        n = x.shape[2 + self.axis]
        shape = [1, 1, 1, 1, 1]
        shape[2 + self.axis] = n
        ramp = torch.arange(n, dtype=torch.float32).view(shape).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([torch.zeros_like(ramp), ramp], dim=1)


def config(*extra):
    return load_config(None, ["preprocess.spacing=null", "preprocess.crop_foreground=false",
                              "preprocess.intensity.mode=zscore", "inference.roi_size=[8, 8, 4]",
                              "inference.overlap=0.5", "inference.min_component_mm3=0", *extra])


def image(shape=(12, 10, 7), seed=0):
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))


def softmax_of(net, x):
    with torch.no_grad():
        return torch.softmax(net(x[None]), dim=1)[0]


# --- the flips ------------------------------------------------------------------------------------


def test_mirror_flips_are_every_subset_of_the_allowed_axes():
    assert mirror_flips("none", None, 3) == [()]
    assert len(mirror_flips("mirror", None, 3)) == 8
    assert sorted(mirror_flips("mirror", None, 2)) == sorted([(), (2,), (3,), (2, 3)])
    assert mirror_flips("mirror", [2], 3) == [(), (4,)]
    assert tta_label("mirror", None) == "mirror" and tta_label("mirror", [2, 0]) == "mirror:0,2"


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flip_back_is_exact_for_a_position_dependent_network(axis):
    """Flip the window, run, flip back: a network writing its window position gives, per flip of its
    axis, the ramp and the reversed ramp; flips of the other axes change nothing."""
    x = torch.randn(2, 1, 6, 5, 4)
    n = x.shape[2 + axis]
    got = averaged_probabilities([Ramp(axis)], mirror_flips("mirror", None, 3))(x)
    ramp = torch.arange(n, dtype=torch.float32)
    expected_1d = (torch.sigmoid(ramp) + torch.sigmoid(ramp.flip(0))) / 2
    shape = [1, 1, 1]
    shape[axis] = n
    expected = expected_1d.view(shape).expand(*x.shape[2:])
    torch.testing.assert_close(got[:, 1], expected.expand(2, *x.shape[2:]), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(2, *x.shape[2:]))
    # restricted to another axis: the ramp is never flipped
    other = (axis + 1) % 3
    got = averaged_probabilities([Ramp(axis)], mirror_flips("mirror", [other], 3))(x)
    torch.testing.assert_close(got[:, 1], torch.sigmoid(ramp).view(shape).expand(2, *x.shape[2:]))


def test_mirror_tta_of_an_equivariant_network_equals_no_tta():
    net = Pointwise([0.5, -1.5], [0.2, 0.0])
    x = image()
    plain = Segmenter(net, config(), "cpu", backend="torch").probabilities(x)
    mirrored = Segmenter(net, config("inference.tta=mirror"), "cpu", backend="torch").probabilities(x)
    torch.testing.assert_close(mirrored, plain, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plain, softmax_of(net, x), atol=1e-6, rtol=1e-5)


def test_mirror_tta_averages_the_flipped_passes_of_a_position_network():
    """Every voxel is the blend of windows; each window's probability is mean(ramp, reversed ramp) along x."""
    seg = Segmenter(Ramp(0), config("inference.tta=mirror", "inference.tta_axes=[0]", "inference.blend=constant",
                                    "inference.overlap=0"), "cpu", backend="torch")
    got = seg.probabilities(image(shape=(16, 8, 4)))  # two windows along x, no overlap
    ramp = torch.arange(8, dtype=torch.float32)
    window = (torch.sigmoid(ramp) + torch.sigmoid(ramp.flip(0))) / 2
    torch.testing.assert_close(got[1, :, 0, 0], torch.cat([window, window]), atol=1e-6, rtol=0)


# --- ensembles ------------------------------------------------------------------------------------


def test_ensemble_of_two_is_the_mean_of_their_probabilities():
    a, b = Pointwise([0.5, -1.5], [0.2, 0.0]), Pointwise([-0.3, 2.0], [0.0, -0.4])
    x = image()
    ensemble = Segmenter(a, config(), "cpu", model_sha256="a" * 64, backend="torch", members=[(b, "b" * 64)])
    got = ensemble.probabilities(x)
    torch.testing.assert_close(got, (softmax_of(a, x) + softmax_of(b, x)) / 2, atol=1e-6, rtol=1e-5)
    assert ensemble.model_sha256s == ["a" * 64, "b" * 64]
    assert len(ensemble.model_sha256) == 64 and ensemble.model_sha256 not in ("a" * 64, "b" * 64)


def test_ensemble_with_tta_on_the_streamed_binary_path():
    """predict(): P(lesion) (float16) of 2 models x 8 flips = the mean of the two models' P(lesion)."""
    a, b = Pointwise([0.5, -1.5], [0.2, 0.0]), Pointwise([-0.3, 2.0], [0.0, -0.4])
    x = image(shape=(20, 11, 9))
    seg = Segmenter(a, config("inference.tta=mirror"), "cpu", backend="torch", members=[(b, "")])
    prediction = seg._predict(x, None, keep_all=False)
    expected = (softmax_of(a, x)[1] + softmax_of(b, x)[1]) / 2
    assert prediction.binary and prediction.probs.dtype == torch.float16
    torch.testing.assert_close(prediction.probs[0].float(), expected, atol=1e-3, rtol=0)


def test_many_classes_keep_every_class_probability_when_asked():
    a, b = Pointwise([0.5, -1.5, 1.0], [0.2, 0.0, -0.3]), Pointwise([-0.3, 2.0, 0.1], [0.0, -0.4, 0.2])
    cfg = config("data.labels={background: 0, a: 1, b: 2}")
    x = image()
    seg = Segmenter(a, cfg, "cpu", backend="torch", members=[(b, "")])
    prediction = seg._predict(x, None, keep_all=False, keep_classes=True)
    expected = (softmax_of(a, x) + softmax_of(b, x)) / 2
    torch.testing.assert_close(prediction.class_probs.float(), expected, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(prediction.labels[0].numpy(), expected.argmax(0).numpy())
    assert seg._predict(x, None, keep_all=False).class_probs is None  # not kept unless asked


# --- checkpoints: files, folders, refusals ---------------------------------------------------------


def test_from_checkpoints_averages_real_checkpoints(tmp_path):
    import torch.nn.functional as F

    a = tiny_checkpoint(tmp_path / "a.pt")
    b = tiny_checkpoint(tmp_path / "b.pt", "model.features=3")  # another network, same preprocessing
    one_a, one_b = Segmenter.from_checkpoint(a, device="cpu"), Segmenter.from_checkpoint(b, device="cpu")
    both = Segmenter.from_checkpoints([a, b], device="cpu", backend="torch")
    assert both.model_sha256s == [one_a.model_sha256, one_b.model_sha256]
    x = image(shape=(16, 16, 8))  # exactly one window: blending changes nothing
    with torch.no_grad():
        expected = (F.softmax(one_a.network(x[None]), 1) + F.softmax(one_b.network(x[None]), 1))[0] / 2
    torch.testing.assert_close(both.probabilities(x), expected, atol=1e-5, rtol=1e-4)
    assert Segmenter.from_checkpoints(a, device="cpu", tta="mirror").tta == "mirror"


def test_a_training_folder_is_its_folds_sorted_or_its_best(tmp_path):
    for fold in (1, 0, 2):
        tiny_checkpoint(tmp_path / "cv" / f"fold_{fold}" / "best.pt")
    (tmp_path / "cv" / "fold_3").mkdir()  # a fold still training: no best.pt yet
    assert checkpoint_paths(tmp_path / "cv") == [tmp_path / "cv" / f"fold_{n}" / "best.pt" for n in (0, 1, 2)]
    single = tiny_checkpoint(tmp_path / "run" / "best.pt")
    assert checkpoint_paths(tmp_path / "run") == [single]
    assert checkpoint_paths([single, tmp_path / "cv"])[0] == single
    assert len(Segmenter.from_checkpoints(tmp_path / "cv", device="cpu").runners) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="fold_\\*/best.pt"):
        checkpoint_paths(tmp_path / "empty")


@pytest.mark.parametrize("override, key", [
    ("preprocess.spacing=[1.0, 1.0, 2.0]", "preprocess.spacing"),
    ("preprocess.orientation=LPS", "preprocess.orientation"),
    ("data.labels={background: 0, tumour: 1}", "data.labels"),
    ("inference.roi_size=[16, 16, 4]", "inference.roi_size"),
    ("data.channels=[CT]", "data.channels"),
])
def test_models_that_cannot_be_averaged_are_refused_naming_the_key(tmp_path, override, key):
    a = tiny_checkpoint(tmp_path / "a.pt")
    b = tiny_checkpoint(tmp_path / "b.pt", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        Segmenter.from_checkpoints([a, b], device="cpu")
    assert str(tmp_path / "b.pt") in str(info.value)


def test_ct_statistics_must_agree(tmp_path):
    stats = "preprocess.intensity.channels=[{name: CT, clip: [-100, 200], mean: %s, std: 50}]"
    common = ("preprocess.intensity.mode=auto", "data.channels=[CT]")
    a = tiny_checkpoint(tmp_path / "a.pt", *common, stats % 40)
    b = tiny_checkpoint(tmp_path / "b.pt", *common, stats % 45)
    with pytest.raises(ConfigError, match=r"preprocess\.intensity\.channels\[0\]\.mean"):
        Segmenter.from_checkpoints([a, b], device="cpu")


def test_tta_keys_are_validated():
    with pytest.raises(ConfigError, match="inference.tta"):
        load_config(None, tiny_config_overrides("inference.tta=flip"))
    with pytest.raises(ConfigError, match="inference.tta_axes"):
        load_config(None, tiny_config_overrides("inference.tta_axes=[3]"))
    with pytest.raises(ConfigError, match="inference.tta_axes"):
        load_config(None, ["model.spatial_dims=2", "sampling.patch_size=[16, 16]", "inference.roi_size=[16, 16]",
                           "inference.tta_axes=[2]"])
    assert load_config(None, ["inference.tta=mirror", "inference.tta_axes=[0, 1]"]).inference.tta_axes == [0, 1]


class Pointwise2D(torch.nn.Module):
    def __init__(self, weights, biases):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(weights, dtype=torch.float32).view(1, -1, 1, 1))
        self.b = torch.nn.Parameter(torch.tensor(biases, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        assert x.ndim == 4, "a 2D network gets (B, C, X, Y)"
        return x[:, :1] * self.w + self.b


class ValidPointwise(Pointwise):
    """Pointwise, then a crop of (2, 2, 1) voxels per side, as a valid-padding network returns less."""

    def margin(self, roi):
        return [2, 2, 1]

    def forward(self, x):
        return super().forward(x)[..., 2:-2, 2:-2, 1:-1]


def test_mirror_tta_on_2d_networks_flips_the_two_in_plane_axes():
    net = Pointwise2D([0.5, -1.5], [0.2, 0.0])
    cfg = ["model.spatial_dims=2", "sampling.patch_size=[8, 8]", "inference.roi_size=[8, 8]"]
    x = image()
    plain = Segmenter(net, config(*cfg), "cpu", backend="torch").probabilities(x)
    mirrored = Segmenter(net, config(*cfg, "inference.tta=mirror"), "cpu", backend="torch")
    calls = []
    mirrored.runner._forward = lambda batch: calls.append(batch.shape) or net(batch)
    torch.testing.assert_close(mirrored.probabilities(x), plain, atol=1e-6, rtol=1e-5)
    assert calls and len(calls) % 4 == 0 and all(len(shape) == 4 for shape in calls)  # 4 flips per batch


def test_mirror_tta_on_a_valid_padding_network():
    net = ValidPointwise([0.5, -1.5], [0.2, 0.0])
    x = image(shape=(14, 12, 9))
    plain = Segmenter(net, config(), "cpu", backend="torch").probabilities(x)
    mirrored = Segmenter(net, config("inference.tta=mirror"), "cpu", backend="torch").probabilities(x)
    torch.testing.assert_close(mirrored, plain, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain, softmax_of(Pointwise([0.5, -1.5], [0.2, 0.0]), x), atol=1e-5, rtol=1e-4)
