"""``plan_dataset`` / ``medseg plan`` end to end: tiny synthetic CT, MR (2 channels) and strongly anisotropic
datasets are planned, ``plans.yaml`` loads as a valid config with a reason beside each planned value, and
``medseg train plans.yaml`` trains it without edits (only the length and the output folder overridden)."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.plan import default_out_dir, plan_dataset
from pipeline.plan.write import flow


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from pipeline.synth import synthesize, synthesize_mr

    root = tmp_path_factory.mktemp("plan-data")
    return {
        "ct": synthesize(root / "ct", cases=4, dicom_test_cases=0, shape=(48, 48, 16)),
        "mr": synthesize_mr(root / "mr", cases=4, dicom_test_cases=0, shape=(48, 48, 16)),
        "aniso": synthesize(root / "aniso", cases=4, dicom_test_cases=0, shape=(48, 48, 8), spacing=(0.7, 0.7, 6.0)),
    }


def test_cuda_plan_without_hours_is_not_timed_and_loads(datasets, tmp_path):
    result = plan_dataset(datasets["ct"], tmp_path / "plan", device="cuda", memory_gb=8)
    assert result.step_seconds is None
    config = load_config(result.plans)
    assert config.data.root == str(datasets["ct"].resolve()) and config.data.channels == ["CT"]
    assert config.preprocess.spacing == [0.8, 0.8, 2.5]
    assert config.model.spatial_dims == 3
    # the whole (48, 48, 16) median shape fits 8 GiB: depth 3 (16 -> 4 at the bottom), multiples of 4
    assert config.sampling.patch_size == [48, 48, 16] and config.model.depth == 3
    assert config.model.features == 32
    assert config.inference.roi_size == config.sampling.patch_size
    assert (config.train.epochs, config.train.steps_per_epoch) == (1000, 250)
    assert config.train.max_minutes == 0  # no time budget on a GPU without --hours
    assert config.inference.overlap == 0.5
    norm = config.preprocess.intensity.channels[0]
    assert config.preprocess.intensity.mode == "auto" and norm.resolved_scheme == "ct" and norm.complete
    fingerprint = json.loads(result.fingerprint.read_text())
    assert norm.clip == [round(fingerprint["intensity"]["CT"]["percentile_00_5"], 2),
                         round(fingerprint["intensity"]["CT"]["percentile_99_5"], 2)]
    assert fingerprint["num_cases"] == 3


def test_plans_yaml_has_a_reason_beside_each_planned_value(datasets, tmp_path):
    result = plan_dataset(datasets["mr"], tmp_path / "plan", device="cuda", memory_gb=8)
    text = result.plans.read_text()
    planned = {key for key, _, _ in result.choices}
    assert {"preprocess.spacing", "model.spatial_dims", "model.depth", "model.features", "sampling.patch_size",
            "sampling.pos_ratio", "sampling.batch_size", "train.epochs", "inference.roi_size",
            "inference.overlap", "inference.min_component_mm3", "preprocess.intensity.channels"} <= planned
    for key, _, reason in result.choices:
        leaf = key.rsplit(".", 1)[1]
        lines = [line for line in text.splitlines() if line.strip().startswith(f"{leaf}:")]
        assert any(line.endswith(f"  # {' '.join(reason.split())}") for line in lines), (key, lines)
    assert "\npostprocess:" not in text  # post-processing rules are not planned here
    assert "medseg cv" in text
    config = result.config
    assert config.data.channels == ["FLAIR", "T1c"] and config.num_classes == 3
    assert [c.resolved_scheme for c in config.preprocess.intensity.channels] == ["zscore", "zscore"]


def test_flow_values_read_back_as_yaml():
    import yaml

    for value in (1e-05, 0.25, [0.7, 0.7, 6.0], {"background": 0, "core": 2}, "yes", "/tmp/a b", None, True, "CT"):
        assert yaml.safe_load(f"k: {flow(value)}")["k"] == value


def test_cli_plan_stops_on_dataset_problems(datasets, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(datasets["ct"], broken)
    (broken / "labelsTr" / "synth_000.nii.gz").unlink()
    assert main(["-q", "plan", str(broken), "--out", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().out
    assert "error: synth_000: label missing" in out
    assert not (tmp_path / "out").exists()


def test_cli_plan_rejects_bad_hours(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "data/x", "--hours", "0"])
    assert exit_info.value.code == 2
    assert "expected a number > 0" in capsys.readouterr().err


def test_default_out_dir_is_named_after_the_dataset(tmp_path):
    assert default_out_dir(tmp_path / "Dataset001_Liver").as_posix() == "runs/plan/Dataset001_Liver"


@pytest.mark.slow
@pytest.mark.parametrize("kind, dims, channels", [("ct", 3, 1), ("mr", 3, 2), ("aniso", 2, 1)])
def test_plan_measures_and_trains_as_written(datasets, tmp_path, kind, dims, channels, capsys):
    out = tmp_path / "plan"
    assert main(["-q", "plan", str(datasets[kind]), "--out", str(out), "--hours", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "measured training step:" in printed and "train it: medseg train" in printed
    config = load_config(out / "plans.yaml")
    assert config.model.spatial_dims == dims and config.in_channels == channels
    assert len(config.sampling.patch_size) == dims
    assert all(p % 2 ** (config.model.depth - 1) == 0 for p in config.sampling.patch_size)
    assert config.train.epochs * config.train.steps_per_epoch >= 1
    if kind == "aniso":
        assert config.preprocess.spacing == [0.7, 0.7, 6.0]
    model_dir = tmp_path / "model"
    assert main(["-q", "train", str(out / "plans.yaml"), "train.epochs=1", "train.steps_per_epoch=2",
                 f"train.out_dir={model_dir}"]) == 0
    assert (model_dir / "best.pt").is_file()
    log = (model_dir / "log.csv").read_text().splitlines()
    assert len(log) == 2 and log[1].startswith("1,")


def test_cuda_timing_without_a_gpu_is_refused(datasets, tmp_path, monkeypatch):
    import pipeline.plan as plan
    from pipeline.errors import ConfigError

    monkeypatch.setattr(plan, "_cuda_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        plan_dataset(datasets["ct"], tmp_path / "plan", device="cuda", hours=1)
    assert not (tmp_path / "plan").exists()


def test_a_dataset_too_slow_to_read_whole_is_planned_and_trained_on_a_seeded_draw(tmp_path, monkeypatch):
    from pipeline.plan import fingerprint as fingerprint_module
    from pipeline.plan import rules
    from pipeline.synth import synthesize
    from pipeline.training.data import training_cases

    root = synthesize(tmp_path / "many", cases=24, dicom_test_cases=0, shape=(48, 48, 16), test_fraction=0.0)
    # as if each case took 10 s to read: 25% of 30 min reads 18 cases 2.5 times; the draw keeps the minimum 20
    monkeypatch.setattr(fingerprint_module, "probe_reads",
                        lambda items, channels, count=3: fingerprint_module.ReadProbe(10.0, 48 * 48 * 16, 3))
    result = plan_dataset(root, tmp_path / "plan", device="cpu")
    fingerprint = json.loads(result.fingerprint.read_text())
    assert fingerprint["dataset_cases"] == 24 and fingerprint["num_cases"] == rules.MIN_CASES == 20
    assert fingerprint["case_draw"]["max_cases"] == 20 and fingerprint["case_draw"]["read_seconds_per_case"] == 10.0
    assert result.config.data.max_cases == 20
    assert result.config.train.max_minutes == 30.0  # the CPU budget, held by the trainer
    drawn = [item["case_id"] for item in training_cases(root, 20, result.config.train.seed)]
    assert [case["case_id"] for case in fingerprint["cases"]] == drawn
    assert "20 of the 24 cases" in result.plans.read_text()
