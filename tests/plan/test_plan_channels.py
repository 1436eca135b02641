"""``input.channels`` rules that ``medseg plan`` derives from the dataset's channel names: recognised
sequences get a commented rule, an unknown name a placeholder that makes a DICOM study fail clearly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.config import ChannelRule, load_config, save_config
from pipeline.plan.channels import PLACEHOLDER, channel_rule, channel_rules

EXPECTED = [ChannelRule(name="FLAIR", series_description="*FLAIR*"),
            ChannelRule(name="T1w", series_description="*T1*", contrast=False),
            ChannelRule(name="t1gd", series_description="*T1*", contrast=True),
            ChannelRule(name="T2w", series_description="*T2*")]


@pytest.mark.parametrize("name, fields", [
    ("T2-FLAIR", {"series_description": "*FLAIR*"}), ("T1", {"series_description": "*T1*", "contrast": False}),
    ("T1c", {"series_description": "*T1*", "contrast": True}), ("T1ce", {"series_description": "*T1*", "contrast": True}),
    ("T1-Gd", {"series_description": "*T1*", "contrast": True}),
    ("t1_precontrast", {"series_description": "*T1*", "contrast": False}),
    ("DWI", {"series_description": "*DWI*"}), ("ADC", {"series_description": "*ADC*"}),
    ("CT", {"series_description": "*CT*"}), ("PET", {"series_description": "*PET*"})])
def test_recognised_names(name, fields):
    rule, note = channel_rule(name)
    assert rule == {"name": name, **fields}
    assert f"derived from the channel name {name!r}, check it" in note


def test_one_channel_gets_no_rules():
    assert channel_rules(["CT"]) == ([], [], "")


def test_unknown_name_gets_a_placeholder_that_fails_a_study_clearly():
    from pipeline.io.channel_cases import group_studies

    rules, notes, reason = channel_rules(["FLAIR", "SWI*map"])
    assert rules[1] == {"name": "SWI*map", "series_description": PLACEHOLDER.format(name="SWI_map")}
    assert notes[1].startswith("PLACEHOLDER: 'SWI*map' is not a sequence we recognise")
    assert "no rule could be derived for SWI*map: set it" in reason

    def series(description, number):
        info = SimpleNamespace(series_description=description, sequence_name="", contrast_agent="",
                               study_uid="1.2.3")
        return SimpleNamespace(volume=SimpleNamespace(series=info), series_uid=f"1.2.3.{number}",
                               series_description=description, series_number=number, files=[], case_id="x")

    study = [series("t2_tirm_FLAIR", 1), series("SWI_Images", 2), series("mIP_Images(SW)", 3)]
    (case,), _ = group_studies(study, [ChannelRule(**r) for r in rules], lambda members: "study")
    assert case.channels.sources == (study[0].volume,)  # FLAIR matched, nothing guessed for the other
    assert case.channels.missing == (
        "channel 1 (SWI*map): no series of the study match input.channels[1] (series_description "
        "'no rule derived for channel SWI_map - set input.channels in plans.yaml'); the study's series: "
        "'SWI_Images', 'mIP_Images(SW)', 't2_tirm_FLAIR'",)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from pipeline.plan import plan_dataset
    from tests.dataset.builders import write_msd_4d

    root = tmp_path_factory.mktemp("four-channel")
    write_msd_4d(root / "data", modalities=("FLAIR", "T1w", "t1gd", "T2w"))
    return plan_dataset(root / "data", root / "plan", device="cuda", memory_gb=8)


def test_four_channel_plan_writes_the_rules_and_round_trips(planned, tmp_path):
    config = load_config(planned.plans)
    assert config.data.channels == ["FLAIR", "T1w", "t1gd", "T2w"]
    assert config.input.channels == EXPECTED
    text = planned.plans.read_text()
    assert "channels:  # derived from the dataset's channel names, not from any DICOM study: check" in text
    assert ("- {name: t1gd, series_description: \"*T1*\", contrast: true}  # contrast-enhanced T1 (a T1 series "
            "with a contrast agent): derived from the channel name 't1gd', check it") in text
    saved = tmp_path / "saved.yaml"
    save_config(config, saved)
    again = load_config(saved)
    assert again.input.channels == EXPECTED and again == config
    assert ("input.channels", [dict(r) for r in (
        {"name": "FLAIR", "series_description": "*FLAIR*"},
        {"name": "T1w", "series_description": "*T1*", "contrast": False},
        {"name": "t1gd", "series_description": "*T1*", "contrast": True},
        {"name": "T2w", "series_description": "*T2*"})]) in [(k, v) for k, v, _ in planned.choices]
