"""Cross-validation results: out-of-fold predictions, their evaluation and the post-processing they choose
(``medseg cv``)."""

from pipeline.cv.run import CVResult, run_cv

__all__ = ["CVResult", "run_cv"]
