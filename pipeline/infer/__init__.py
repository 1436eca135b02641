"""Inference: a trained model applied to scans, masks back in each scan's own geometry."""

from pipeline.infer.batch import MASK_SUFFIX, CaseResult, segment_folder
from pipeline.infer.segmenter import Segmentation, Segmenter

__all__ = ["MASK_SUFFIX", "CaseResult", "Segmentation", "Segmenter", "segment_folder"]
