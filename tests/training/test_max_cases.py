"""``data.max_cases``: a seeded draw of the training cases, the same for training, folds and the plan; the
dataset check reads only the cases drawn."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError, InputError
from pipeline.training.data import select_cases, training_cases
from pipeline.training.dataset_config import load_training_data


def _items(n, unlabelled=()):
    return [{"case_id": f"c{i:02d}", "image": f"i{i}", "label": None if i in unlabelled else f"l{i}"}
            for i in range(n)]


def test_select_cases_is_a_seeded_draw_in_dataset_order():
    items = _items(30)
    chosen = select_cases(items, 10, seed=0)
    assert len(chosen) == 10 and chosen == sorted(chosen, key=lambda i: i["case_id"])
    assert chosen == select_cases(items, 10, seed=0)
    assert chosen != select_cases(items, 10, seed=1)
    assert select_cases(items, 0) == items and select_cases(items, 30) == items


def test_select_cases_never_draws_unlabelled_cases():
    items = _items(10, unlabelled={0, 1, 2})
    assert all(i["label"] for i in select_cases(items, 5))
    assert select_cases(items, 7) == items  # all 7 labelled cases: nothing to leave out


def test_max_cases_must_be_a_non_negative_integer():
    with pytest.raises(ConfigError, match="data.max_cases"):
        config_from_dict({"data": {"max_cases": -1}})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from pipeline.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("max-cases") / "ct", cases=8, dicom_test_cases=0,
                      shape=(48, 48, 16), test_fraction=0.0)


def test_training_reads_and_checks_only_the_cases_drawn(dataset, tmp_path):
    import shutil

    root = tmp_path / "ct"
    shutil.copytree(dataset, root)
    cfg = config_from_dict({"data": {"root": str(root), "max_cases": 3}})
    drawn = [item["case_id"] for item in training_cases(root, 3, cfg.train.seed)]
    _, items = load_training_data(cfg)
    assert [item["case_id"] for item in items] == drawn and len(drawn) == 3
    # a broken case outside the draw is not read; the same break inside it stops training
    outside = next(i for i in training_cases(root) if i["case_id"] not in drawn)
    open(outside["label"], "wb").write(b"not a NIfTI file")
    assert len(load_training_data(cfg)[1]) == 3
    with pytest.raises(InputError, match="problem"):
        load_training_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_cases=0)))
