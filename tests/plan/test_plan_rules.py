"""Each planning rule on known inputs, with the exact value it must choose."""

from __future__ import annotations

import math

import pytest

from pipeline.plan import rules
from pipeline.plan.cost import unet_cost


def test_target_spacing_anisotropic_takes_the_10th_percentile_of_the_coarse_axis():
    value, reason = rules.target_spacing([[1, 1, 5], [1, 1, 5], [0.8, 0.8, 4]])
    # median [1, 1, 5]: 5x coarser > 3; z: 10th percentile of [4, 5, 5] = 4 + 0.2 * 1 = 4.2
    assert value == [1.0, 1.0, 4.2]
    assert "anisotropic" in reason


def test_target_spacing_isotropic_is_the_median():
    value, reason = rules.target_spacing([[1, 1, 2], [0.8, 0.8, 2.5], [1, 1, 2]])
    assert value == [1.0, 1.0, 2.0]
    assert "median" in reason and "anisotropic" not in reason


def test_target_spacing_coarse_axis_never_finer_than_the_other_axes():
    # median [2, 2, 7] (3.5x): 10th percentile of [0.5, 7, 7] is 1.8, below the in-plane 2 mm -> 2
    value, _ = rules.target_spacing([[2, 2, 7], [2, 2, 7], [2, 2, 0.5]])
    assert value == [2.0, 2.0, 2.0]


def test_median_shape_at_the_target_spacing():
    shapes = [[100, 100, 40], [200, 200, 20]]
    spacings = [[1, 1, 2.5], [0.5, 0.5, 5]]
    assert rules.median_shape(shapes, spacings, [1, 1, 2.5]) == [100, 100, 40]
    assert rules.median_shape(shapes, spacings, [2, 2, 5]) == [50, 50, 20]


@pytest.mark.parametrize("target, shape, dims", [
    ([0.7, 0.7, 6.0], [96, 96, 12], 2),  # 8.6x thicker slices
    ([0.8, 0.8, 2.5], [160, 160, 48], 3),  # the CT demo
    ([1.0, 1.0, 3.0], [96, 96, 32], 3),  # the MR demo
    ([1.0, 1.0, 1.0], [128, 128, 10], 2),  # too few slices
    ([6.0, 0.7, 0.7], [12, 96, 96], 3),  # coarse axis not the slice axis: 2D slices would not help
])
def test_spatial_dims(target, shape, dims):
    assert rules.spatial_dims(target, shape)[0] == dims


@pytest.mark.parametrize("patch, depth", [
    ([160, 160, 48], 4), ([96, 96], 5), ([16, 16, 16], 3), ([8, 8, 8], 2), ([4, 4, 4], 2), ([512, 512, 512], 6),
])
def test_depth_pools_until_an_axis_has_4_to_7_voxels(patch, depth):
    assert rules.depth_for(patch) == depth


def test_fit_patch_with_room_is_the_median_shape_rounded_to_the_pooling():
    # isotropic-mm start [323, 323, 161] clipped to [300, 300, 161]; depth 6 -> multiples of 32
    value, _ = rules.fit_patch([300, 300, 300], [1, 1, 2], 3, 1e15, 1, 2, patches=2)
    assert value == {"patch_size": [288, 288, 160], "depth": 6, "features": 32}


def test_fit_patch_shrinks_the_axis_largest_relative_to_the_shape():
    budget = unet_cost([48, 64, 64], 32, 4, 1, 2, True).bytes(2)
    # [64]*3 (depth 5: steps of 16) -> axis 0 (ties: the first) -> [48, 64, 64], which fits exactly
    assert rules.fit_patch([64, 64, 64], [1, 1, 1], 3, budget, 1, 2, 2)[0]["patch_size"] == [48, 64, 64]
    # one byte less: axis 1 is now the largest relative to the shape, shrunk by 8 (depth 4)
    value, reason = rules.fit_patch([64, 64, 64], [1, 1, 1], 3, budget - 1, 1, 2, 2)
    assert value == {"patch_size": [48, 56, 64], "depth": 4, "features": 32}
    assert "GiB" in reason


def test_fit_patch_halves_features_when_the_smallest_patch_does_not_fit():
    budget = unet_cost([16, 16, 16], 16, 3, 1, 2, True).bytes(2)
    value, _ = rules.fit_patch([64, 64, 64], [1, 1, 1], 3, budget, 1, 2, 2)
    assert value == {"patch_size": [16, 16, 16], "depth": 3, "features": 16}


def test_batch_3d_is_two_patches():
    assert rules.batch(3, [96, 96, 32], 1e9, 8e9, 1e9)[0] == {"batch_size": 2, "samples_per_volume": 1}


def test_batch_2d_fills_memory_within_5_percent_of_the_data():
    # memory holds 10 slices, 5% of 1e6 voxels holds 5 slices of 100x100 -> 5 -> 2 volumes x 2
    assert rules.batch(2, [100, 100], 1e6, 1e7, 1e6)[0] == {"batch_size": 2, "samples_per_volume": 2}
    # plenty of data: the memory's 10 -> 2 x 5
    assert rules.batch(2, [100, 100], 1e6, 1e7, 1e9)[0] == {"batch_size": 2, "samples_per_volume": 5}


def test_schedule_fills_the_budget_less_validation():
    value, reason = rules.schedule(1.0, 3600)
    # 3600 s x 0.85 = 3060 steps; 3060 // 20 = 153 steps per epoch, 20 epochs
    assert value == {"epochs": 20, "steps_per_epoch": 153, "val_every": 2, "warmup_epochs": 1}
    assert "measured" in reason
    value, _ = rules.schedule(0.01, 36000)  # 3,060,000 steps: 250 per epoch
    assert value == {"epochs": 12240, "steps_per_epoch": 250, "val_every": 1224, "warmup_epochs": 5}


def test_schedule_unmeasured_is_nnunet_default():
    value, reason = rules.schedule(None, None)
    assert (value["epochs"], value["steps_per_epoch"]) == (1000, 250)
    assert "not measured" in reason


def test_fits_minimum_is_500_steps_in_85_percent_of_the_budget():
    assert rules.fits_minimum(3.06, 1800)  # 500 x 3.06 = 1530 = 0.85 x 1800
    assert not rules.fits_minimum(3.07, 1800)


def test_normalization_ct_uses_foreground_percentiles_and_clipped_statistics():
    stats = {"percentile_00_5": -15.0, "percentile_99_5": 160.0, "clipped_mean": 84.3414, "clipped_std": 33.7471,
             "mean": 90.0, "std": 40.0}
    value, reason = rules.normalization(["CT"], {"CT": stats})
    assert value == [{"name": "CT", "scheme": "ct", "clip": [-15.0, 160.0], "mean": 84.341, "std": 33.747}]
    assert "0.5/99.5" in reason
    value, _ = rules.normalization(["FLAIR", "T1c"], {"FLAIR": stats, "T1c": stats})
    assert value == [{"name": "FLAIR", "scheme": "zscore"}, {"name": "T1c", "scheme": "zscore"}]


@pytest.mark.parametrize("fraction, ratio", [(1e-2, 1.0), (1e-3, 2.0), (1e-4, 3.0), (1e-7, 4.0), (0.5, 0.5)])
def test_pos_ratio_rises_as_lesions_get_rarer(fraction, ratio):
    value, _ = rules.pos_ratio({"background": 1 - fraction, "lesion": fraction}, 0.8)
    assert value == ratio


def test_pos_ratio_sums_the_lesion_classes_and_handles_none():
    assert rules.pos_ratio({"background": 0.999, "oedema": 0.0006, "core": 0.0004}, 1.0)[0] == 2.0
    assert rules.pos_ratio({"background": 1.0, "lesion": 0.0}, 0.0)[0] == 1.0


def test_min_component_is_half_the_smallest_lesion_at_most_10_mm3():
    assert rules.min_component_mm3({"lesion": {"volumes_mm3": [4.0, 100.0]}})[0] == 2.0
    assert rules.min_component_mm3({"a": {"volumes_mm3": [100.0]}, "b": {"volumes_mm3": [30.0]}})[0] == 10.0
    value, reason = rules.min_component_mm3({"lesion": {"volumes_mm3": []}})
    assert value == 0.0 and "no training lesion" in reason
    assert "medseg cv" in rules.min_component_mm3({"lesion": {"volumes_mm3": [4.0]}})[1]


def test_overlap_by_device():
    assert rules.overlap("cuda")[0] == 0.5
    assert rules.overlap("cpu")[0] == 0.5  # 0.25 failed the accuracy contract: an opt-in
    assert "accuracy contract" in rules.overlap("cpu")[1]


def test_learning_rate_by_training_length():
    assert rules.learning_rate(900)[0] == 0.003
    assert rules.learning_rate(250_000)[0] == 0.001


def test_shrink_for_time_features_then_patch_then_slices():
    net = {"patch_size": [64, 64, 32], "depth": 4, "features": 32}
    assert rules.shrink_for_time(net, 1, [64, 64, 32], [1, 1, 2.5])[0]["features"] == 16
    net8 = {**net, "features": 8}
    # ratios tie; axis 2 is the longest in mm (80): 32 - 8 = 24 -> depth 3
    smaller, per_volume, _ = rules.shrink_for_time(net8, 1, [64, 64, 32], [1, 1, 2.5])
    assert smaller == {"patch_size": [64, 64, 24], "depth": 3, "features": 8} and per_volume == 1
    smallest = {"patch_size": [32, 32], "depth": 3, "features": 8}
    assert rules.shrink_for_time(smallest, 4, [32, 32], [1, 1])[1] == 2
    assert rules.shrink_for_time(smallest, 1, [32, 32], [1, 1]) is None


@pytest.mark.parametrize("dims, deep", [(3, True), (2, False)])
def test_cost_counts_the_parameters_of_our_unet(dims, deep):
    from pipeline.model import UNet

    model = UNet(dims, 2, 3, features=8, depth=4, deep_supervision=deep)
    assert unet_cost([32] * dims, 8, 4, 2, 3, deep).parameters == sum(p.numel() for p in model.parameters())


def test_cost_memory_grows_with_patch_and_features():
    small = unet_cost([32, 32, 32], 8, 3)
    assert unet_cost([64, 32, 32], 8, 3).activation_elements == pytest.approx(2 * small.activation_elements, rel=0.01)
    assert unet_cost([32, 32, 32], 16, 3).macs == pytest.approx(4 * small.macs, rel=0.05)
    assert math.isclose(small.bytes(2) - small.bytes(1), small.activation_elements * 4 * 1.5)


def test_training_budget_leaves_the_data_reads_out():
    seconds, reason = rules.training_budget(1800.0, 60.0)
    assert seconds == pytest.approx(1800.0 - rules.DATA_PASSES * 60.0)
    assert "measured" in reason
    assert rules.training_budget(1800.0, 2000.0)[0] == pytest.approx(450.0)  # never below a quarter


def test_cache_only_where_the_preprocessed_cases_fit_half_the_ram():
    gib = 2**30
    # 20 cases x 1M voxels x (4 x 2 channels + 12) bytes = 400 MB
    assert rules.cache(20, 2, (100, 100, 100), 8 * gib)[0] is True
    # 484 four-channel brains of 140x170x140 voxels: ~87 GiB, more than half of 24 GiB
    keep, reason = rules.cache(484, 4, (140, 170, 140), 24 * gib)
    assert keep is False and "read as it is drawn" in reason


def test_validation_fits_its_share_of_the_time():
    # 10 cases: 2 validation cases; a 64^3 volume and a 32^3 patch at overlap 0.5: 3^3 = 27 windows
    value, _ = rules.validation(10, 1.2, 2, (64, 64, 64), (32, 32, 32), 0.5, 20, 1800.0)
    # a window: 1.2 / (3 x 2) = 0.2 s; 27 x 0.2 x 2 cases = 10.8 s a validation; 15% of 1800 s holds 25: 10
    assert value == {"val_fraction": 0.2, "val_every": 2}
    many, _ = rules.validation(400, 1.2, 2, (64, 64, 64), (32, 32, 32), 0.5, 20, 1800.0)
    assert many["val_fraction"] == pytest.approx(rules.MAX_VALIDATION_CASES / 400, abs=1e-3)
    # 25 cases x 5.4 s = 135 s a validation: 2 fit in 270 s -> every 10 epochs
    assert many["val_every"] == 10
    slices, _ = rules.validation(10, 1.2, 2, (64, 64, 8), (32, 32), 0.5, 20, 1800.0)
    assert slices["val_every"] >= 2  # 2D: every slice's windows count


def test_case_count_keeps_every_case_that_fits_the_time_and_the_ram():
    gib = 2**30
    # 40 cases at 1 s a read: 2.5 x 40 = 100 s, within 25% of 30 min; 40 x 100 MiB within half of 24 GiB
    assert rules.case_count(40, 1.0, 100 * 2**20, 1800.0, 24 * gib)[0] == 0
    assert rules.case_count(40, 1.0, 100 * 2**20, None, None) == (0, "all 40 cases")


def test_case_count_draws_what_the_time_budget_reads():
    # 484 brains at 1.5 s a read: 25% of 1800 s = 450 s holds 450 / (2.5 x 1.5) = 120 cases
    n, reason = rules.case_count(484, 1.5, 100 * 2**20, 1800.0, 24 * 2**30)
    assert n == 120 and "120 of the 484 cases" in reason and "measured" in reason


def test_case_count_draws_what_the_cache_holds_and_never_below_the_minimum():
    # 12 GiB (half of 24) holds 12 * 1024 / 300 = 40 cases of 300 MiB
    assert rules.case_count(484, 0.1, 300 * 2**20, 1800.0, 24 * 2**30)[0] == 40
    # a budget that reads 4 cases still trains on 20
    n, reason = rules.case_count(100, 20.0, 2**20, 1800.0, 24 * 2**30)
    assert n == rules.MIN_CASES and f"at least {rules.MIN_CASES}" in reason
    assert rules.case_count(rules.MIN_CASES, 20.0, 2**20, 1800.0, None)[0] == 0
