"""The bench's CPU figures: vector extensions and the FMA peak from /proc/cpuinfo text, the conv3d ceiling."""

from __future__ import annotations

import math

import pytest

from pipeline.benchmarks.measure import conv3d_ceiling, cpu_flags, fma_peak

EPYC = """processor\t: 0
model name\t: AMD EPYC
cpu MHz\t\t: 2445.430
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
processor\t: 1
model name\t: AMD EPYC
cpu MHz\t\t: 2445.430
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
"""

XEON = """processor\t: 0
cpu MHz\t\t: 2000.000
flags\t\t: fpu avx fma avx2 avx512f avx512_vnni amx_tile amx_int8
"""


def test_cpu_flags_lists_the_vector_extensions_in_the_flags_line():
    assert cpu_flags(EPYC) == ["avx", "avx2", "fma"]
    assert cpu_flags(XEON) == ["avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"]
    assert cpu_flags("no flags here") == []


def test_fma_peak_avx2_from_cpu_mhz(monkeypatch):
    monkeypatch.delenv("MEDSEG_FMA_UNITS", raising=False)
    peak = fma_peak(EPYC, cores=2, max_freq_khz="")
    # 2 cores x 8 fp32 lanes x 2 FMA units x 2 FLOPs x 2.44543 GHz
    assert peak["gflops"] == pytest.approx(2 * 8 * 2 * 2 * 2.44543)
    assert (peak["vector_bits"], peak["fma_units"], peak["fma_units_source"]) == (256, 2, "assumed")
    assert peak["clock_source"] == "cpu MHz" and peak["fma"] is True


def test_fma_peak_avx512_prefers_max_freq_and_honours_the_override(monkeypatch):
    monkeypatch.setenv("MEDSEG_FMA_UNITS", "1")
    peak = fma_peak(XEON, cores=4, max_freq_khz="3500000\n")
    assert peak["gflops"] == pytest.approx(4 * 16 * 1 * 2 * 3.5)
    assert peak["clock_source"] == "cpuinfo_max_freq" and peak["fma_units_source"] == "MEDSEG_FMA_UNITS"
    assert fma_peak(XEON, cores=4, fma_units=2, max_freq_khz="3500000")["gflops"] == pytest.approx(896.0)


def test_fma_peak_without_a_clock_is_nan():
    assert math.isnan(fma_peak("flags : avx2\n", cores=1, max_freq_khz="")["gflops"])


def test_conv3d_ceiling_is_a_positive_rate():
    gflops = conv3d_ceiling(threads=1, channels=8, spatial=(4, 8, 8), repeats=1)
    assert gflops > 0 and math.isfinite(gflops)
