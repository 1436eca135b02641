"""Synthetic lesion data: CT (one case :func:`make_case`, a dataset :func:`synthesize`) and two-sequence
MR (FLAIR + T1c: one case :func:`make_mr_case`, a dataset :func:`synthesize_mr`)."""

from __future__ import annotations

from pipeline.synth.dataset import synthesize
from pipeline.synth.mr import synthesize_mr
from pipeline.synth.mr_phantom import MRCase, make_mr_case
from pipeline.synth.phantom import SynthCase, make_case

__all__ = ["MRCase", "SynthCase", "make_case", "make_mr_case", "synthesize", "synthesize_mr"]
