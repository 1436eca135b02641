"""`medseg cv` records the post-processing it chose in the plans.yaml the folds were trained from,
keeping the plan's comments, and replaces an earlier choice."""

from __future__ import annotations

from pipeline.config import load_config
from pipeline.plan.write import record_postprocessing

PLANS = """# Planned by `medseg plan data/x` for cpu
data:
  root: {root}  # the planned dataset (absolute path)
  labels: {{background: 0, oedema: 1, core: 2}}  # from the dataset
train:
  out_dir: {out}  # beside plans.yaml (absolute path)
inference:
  overlap: 0.25  # CPU: 0.25
  min_component_mm3: 1.5  # half the smallest training lesion (3.0 mm3), at most 10
"""


def test_chosen_rules_go_into_the_plan_and_replace_an_earlier_choice(tmp_path):
    plans = tmp_path / "plans.yaml"
    plans.write_text(PLANS.format(root=tmp_path / "data", out=tmp_path / "model"))

    record_postprocessing(plans, {"keep_largest": ["core"], "restrict_to_body": [], "min_component_mm3": 0.75},
                          "`medseg cv` (test)")
    record_postprocessing(plans, {"keep_largest": [], "restrict_to_body": ["oedema"], "min_component_mm3": 3.0},
                          "`medseg cv` (again)")

    config = load_config(plans)
    assert config.postprocess.keep_largest == [] and config.postprocess.restrict_to_body == ["oedema"]
    assert config.inference.min_component_mm3 == 3.0 and config.inference.overlap == 0.25
    text = plans.read_text()
    assert text.count("postprocess:") == 1 and "(test)" not in text
    assert "min_component_mm3: 3.0  # chosen by `medseg cv` (again)" in text
    assert "# Planned by `medseg plan data/x` for cpu" in text and "# CPU: 0.25" in text


def test_cv_finds_the_plan_whose_output_folder_it_evaluates(tmp_path):
    from pipeline.cv.run import _plans_of

    plans = tmp_path / "plan" / "plans.yaml"
    plans.parent.mkdir()
    plans.write_text(PLANS.format(root=tmp_path / "data", out=tmp_path / "plan" / "model"))
    assert _plans_of(tmp_path / "plan" / "model") == plans
    elsewhere = tmp_path / "plan" / "other"
    assert _plans_of(elsewhere) is None  # a plans.yaml that trains into another folder is left alone
