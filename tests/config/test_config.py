"""Configs: shipped YAML files load, ``extends`` merges, dotted overrides are typed, and every error is a
ConfigError that names the key, the bad value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Config, config_from_dict, config_to_dict, load_config, save_config
from pipeline.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    config = load_config(CONFIGS / name)
    assert isinstance(config, Config)
    dims = config.model.spatial_dims
    assert len(config.sampling.patch_size) == dims
    assert len(config.inference.roi_size) == dims
    assert config.num_classes == 2 and config.label_names == ["background", "lesion"]


def test_shipped_configs_exist():
    assert {"demo.yaml", "lesion2d.yaml", "lesion3d.yaml"} <= {p.name for p in CONFIGS.glob("*.yaml")}


def test_extends_changes_only_what_differs():
    base = load_config(CONFIGS / "lesion3d.yaml")
    child = load_config(CONFIGS / "lesion2d.yaml")
    assert base.model.spatial_dims == 3 and child.model.spatial_dims == 2
    assert child.model.features == 32 and child.model.depth == 5
    assert child.sampling.patch_size == [192, 192] and child.inference.roi_size == [192, 192]
    # untouched sections and untouched keys of touched sections come from lesion3d.yaml
    assert child.loss == base.loss
    assert child.model.norm == base.model.norm == "instance"
    assert child.model.deep_supervision is True
    assert child.preprocess == base.preprocess
    assert child.inference.overlap == base.inference.overlap == 0.5
    assert child.train.out_dir == "runs/lesion2d" and child.train.epochs == base.train.epochs == 300


def test_extends_chain_is_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\n  lr: 0.01\nmodel:\n  features: 4\n")
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../base.yaml\ntrain:\n  epochs: 3\n")
    config = load_config(tmp_path / "sub" / "child.yaml")
    assert (config.train.epochs, config.train.lr, config.model.features) == (3, 0.01, 4)


def test_extends_replaces_the_parents_labels(tmp_path):
    (tmp_path / "child.yaml").write_text(
        f"extends: {CONFIGS / 'lesion2d.yaml'}\ndata:\n  labels: {{background: 0, tumour: 1}}\n")
    config = load_config(tmp_path / "child.yaml")
    assert config.data.labels == {"background": 0, "tumour": 1}
    assert config.label_names == ["background", "tumour"]
    assert config.data.root == "data/demo" and config.model.spatial_dims == 2  # the rest still merges


def test_extends_replaces_labels_at_every_level_of_a_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  labels: {background: 0, a: 1, b: 2}\n  val_fraction: 0.3\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\ndata:\n  labels: {background: 0, c: 1}\n")
    (tmp_path / "leaf.yaml").write_text("extends: mid.yaml\ntrain:\n  epochs: 2\n")
    config = load_config(tmp_path / "leaf.yaml")
    assert config.data.labels == {"background": 0, "c": 1}
    assert config.data.val_fraction == 0.3 and config.train.epochs == 2


def test_extends_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")


def test_dotted_overrides_are_typed():
    overrides = ["train.epochs=5", "model.features=16", "preprocess.spacing=null"]
    config = load_config(CONFIGS / "demo.yaml", overrides)
    assert config.train.epochs == 5 and type(config.train.epochs) is int
    assert config.model.features == 16 and type(config.model.features) is int
    assert config.preprocess.spacing is None


def test_overrides_parse_lists_floats_bools_and_strings():
    config = load_config(None, [
        "inference.roi_size=[32, 32, 16]",
        "sampling.patch_size=[32,32,16]",
        "train.lr=0.5",
        "train.amp=false",
        "train.out_dir=runs/x",
        "preprocess.spacing=[1, 1, 2]",
        "inference.threshold=0.5",
    ])
    assert config.inference.roi_size == [32, 32, 16]
    assert config.sampling.patch_size == [32, 32, 16]
    assert config.train.lr == 0.5 and config.train.amp is False
    assert config.train.out_dir == "runs/x"
    assert config.preprocess.spacing == [1.0, 1.0, 2.0]
    assert all(type(s) is float for s in config.preprocess.spacing)
    assert config.inference.threshold == 0.5


def test_integral_float_is_accepted_for_int():
    assert load_config(None, ["train.epochs=5.0"]).train.epochs == 5


def test_defaults_without_file():
    config = load_config(None)
    assert config == Config()


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.epoch=5", ["train.epoch", "Did you mean 'train.epochs'?", "steps_per_epoch"]),
        ("model.featres=8", ["model.featres", "Did you mean 'model.features'?"]),
        ("trian.epochs=5", ["trian", "Did you mean 'train'?", "Allowed keys in '<root>'"]),
        ("nothing_like_it.x=1", ["'nothing_like_it'", "Allowed keys in '<root>'", "inference"]),
    ],
)
def test_unknown_key_or_section(override, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "override, key, value, allowed",
    [
        ("train.epochs=five", "train.epochs", "'five'", "an integer"),
        ("train.epochs=true", "train.epochs", "True", "an integer"),
        ("model.features=2.5", "model.features", "2.5", "an integer"),
        ("train.lr=fast", "train.lr", "'fast'", "a number"),
        ("train.amp=1", "train.amp", "1", "true or false"),
        ("sampling.patch_size=64", "sampling.patch_size", "64", "a list"),
        ("model.norm=5", "model.norm", "5", "a string"),
        ("inference.overlap=1.5", "inference.overlap", "1.5", "a number in [0.0, 0.95]"),
        ("model.norm=group", "model.norm", "'group'", "one of 'instance', 'batch', 'none'"),
        ("model.spatial_dims=4", "model.spatial_dims", "4", "one of 2, 3"),
        ("train.epochs=0", "train.epochs", "0", "a number > 0"),
        ("train.schedule=step", "train.schedule", "'step'", "one of 'poly', 'cosine'"),
        ("augment.flip_prob=-0.1", "augment.flip_prob", "-0.1", "a number in [0.0, 1.0]"),
        ("preprocess.spacing=[1, 1]", "preprocess.spacing", "[1.0, 1.0]", "three positive numbers"),
        ("preprocess.intensity.window=[250, -150]", "preprocess.intensity.window", "[250.0, -150.0]",
         "low < high"),
        ("inference.threshold=2", "inference.threshold", "2.0", "a number in [0.0, 1.0]"),
    ],
)
def test_bad_value_names_key_value_and_allowed(override, key, value, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert f"'{key}'" in message
    assert f"invalid value {value}" in message
    assert allowed in message


def test_allowed_values_are_listed_once_and_the_code_takes_them():
    from pipeline.cli import _parser
    from pipeline.config import schema
    from pipeline.infer import backend
    from pipeline.model import blocks, build_model

    assert backend.BACKENDS is schema.BACKENDS
    assert (blocks.NORMS, blocks.UPSAMPLES, blocks.PADDINGS) == (schema.NORMS, schema.UPSAMPLES, schema.PADDINGS)
    commands = {name: p for action in _parser()._subparsers._group_actions for name, p in action.choices.items()}
    flags = {a.dest: a.choices for p in commands.values() for a in p._actions if a.choices is not None}
    assert tuple(flags["backend"]) == schema.BACKENDS and tuple(flags["kind"]) == schema.SYNTH_KINDS
    for norm in schema.NORMS:  # every value the config accepts builds a network
        config = load_config(None, [f"model.norm={norm}", "model.features=2", "model.depth=2"])
        build_model(config.model, 1, 2)


def test_labels_must_be_consecutive():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.labels={background: 0, lesion: 2}"])
    message = str(info.value)
    assert "'data.labels'" in message and "'lesion': 2" in message
    assert "consecutive integers 0..N-1" in message


def test_labels_need_background_and_one_class():
    with pytest.raises(ConfigError, match="data.labels"):
        load_config(None, ["data.labels={background: 0}"])
    config = load_config(None, ["data.labels={background: 0, liver: 1, tumour: 2}"])
    assert config.num_classes == 3 and config.label_names == ["background", "liver", "tumour"]


@pytest.mark.parametrize(
    "overrides, key, expected",
    [
        (["sampling.patch_size=[32, 32]"], "sampling.patch_size", "a list of 3 positive integers"),
        (["inference.roi_size=[32, 32]", "sampling.patch_size=[32, 32, 16]"], "inference.roi_size",
         "a list of 3 positive integers"),
        (["model.spatial_dims=2", "inference.roi_size=[32, 32]"], "sampling.patch_size",
         "a list of 2 positive integers"),
        (["sampling.patch_size=[32, 0, 16]"], "sampling.patch_size", "a list of positive integers"),
    ],
)
def test_patch_size_must_match_spatial_dims(overrides, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert f"'{key}'" in str(info.value) and expected in str(info.value)


def test_2d_sizes_accepted_with_2d_model():
    config = load_config(
        None, ["model.spatial_dims=2", "sampling.patch_size=[32, 32]", "inference.roi_size=[32, 32]"]
    )
    assert config.model.spatial_dims == 2 and config.sampling.patch_size == [32, 32]


@pytest.mark.parametrize("override", ["train.epochs", "=5", "train.epochs:5"])
def test_malformed_override(override):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert repr(override) in str(info.value) and "key.subkey=value" in str(info.value)


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="'epochs' is a value, not a section"):
        load_config(None, ["train.epochs=5", "train.epochs.x=1"])


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "config file not found" in str(info.value) and str(path) in str(info.value)


def test_missing_parent_config(tmp_path):
    (tmp_path / "child.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml"):
        load_config(tmp_path / "child.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "not valid YAML" in message and str(path) in message
    assert "\n" not in message  # one line for the CLI


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, found list"):
        load_config(path)


def test_section_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="config section 'train' must be a mapping, found 5"):
        load_config(path)


@pytest.mark.parametrize("name", ["demo.yaml", "lesion2d.yaml", "lesion3d.yaml"])
def test_dict_round_trip(name):
    config = load_config(CONFIGS / name, ["inference.threshold=0.4", "data.val_cases=[a, b]"])
    raw = config_to_dict(config)
    assert isinstance(raw, dict) and raw["model"]["spatial_dims"] == config.model.spatial_dims
    assert config_from_dict(raw) == config


def test_saved_config_loads_back_equal(tmp_path):
    config = load_config(CONFIGS / "lesion2d.yaml", ["train.epochs=3"])
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


def test_config_from_dict_validates():
    raw = config_to_dict(Config())
    raw["inference"]["overlap"] = 1.5
    with pytest.raises(ConfigError, match="inference.overlap"):
        config_from_dict(raw)


def test_input_section_overrides_and_validation():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    config = load_config(None, ["input.modalities=[CT]", "input.on_gantry_tilt=resample", "input.min_slices=20"])
    assert config.input.modalities == ["CT"] and config.input.on_gantry_tilt == "resample"
    assert config.input.min_slices == 20 and config.input.on_missing_slices == "error"
    with pytest.raises(ConfigError, match="input.on_missing_slices.*'error', 'resample'"):
        load_config(None, ["input.on_missing_slices=interpolate"])
    with pytest.raises(ConfigError, match="input.series_description.*regular expression"):
        load_config(None, ["input.series_description=(unclosed"])
