"""Evaluation: Dice and lesion-wise detection, per case and pooled."""

from pipeline.evaluate.folder import CaseMetrics, evaluate_case, evaluate_folder, summarise
from pipeline.evaluate.metrics import dice, lesion_detection

__all__ = ["CaseMetrics", "dice", "evaluate_case", "evaluate_folder", "lesion_detection", "summarise"]
