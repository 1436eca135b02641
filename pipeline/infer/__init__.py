"""Inference: a trained model applied to scans, masks back in each scan's own geometry."""

from pipeline.infer.batch import MASK_SUFFIX, CaseResult, exit_code, segment_folder, summarise
from pipeline.infer.segmenter import Prepared, Segmentation, Segmenter

__all__ = ["MASK_SUFFIX", "CaseResult", "Prepared", "Segmentation", "Segmenter", "exit_code", "segment_folder",
           "summarise"]
