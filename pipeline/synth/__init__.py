"""Synthetic CT lesion data: one phantom case (:func:`make_case`) or a whole dataset (:func:`synthesize`)."""

from __future__ import annotations

from pipeline.synth.dataset import synthesize
from pipeline.synth.phantom import SynthCase, make_case

__all__ = ["SynthCase", "make_case", "synthesize"]
