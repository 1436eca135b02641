"""Benchmark: discovery + stacking of a DICOM series vs a plain SimpleITK ``ImageSeriesReader``.

    python -m pipeline.benchmarks.dicom_read [--shape 512 512 300] [--repeats 5]

Writes a synthetic uncompressed CT series (pydicom) to a temporary folder, then times, alternating
and with a warm page cache:

* ours: ``discover`` (header-only scan, grouping, selection) + ``ScanReader.read`` (geometry checks,
  GDCM decode with rescale, re-orientation) — everything ``segment``/``convert`` do to get the array;
* baseline: ``GetGDCMSeriesIDs`` + ``GetGDCMSeriesFileNames`` + ``ImageSeriesReader.Execute`` +
  ``GetArrayFromImage``.

Prints the medians and their ratio (target ≤ 1.2).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _ours(folder: Path) -> np.ndarray:
    from pipeline.io.discover import discover
    from pipeline.io.reader import ScanReader

    case = discover(folder).cases[0]
    reader = ScanReader()
    return reader.get_data(reader.read(case.reader_input))[0]


def _simpleitk(folder: Path) -> np.ndarray:
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return sitk.GetArrayFromImage(reader.Execute())


def run(shape=(512, 512, 300), repeats: int = 5) -> dict:
    from pipeline.io.dicom_write import write_dicom_series

    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 1500, size=shape, dtype=np.int16)
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        write_dicom_series(volume, affine, folder, uid_entropy=["bench"])
        ours_s, sitk_s = [], []
        _ours(folder), _simpleitk(folder)  # warm the page cache and imports
        for _ in range(repeats):
            t = time.perf_counter()
            a = _ours(folder)
            ours_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = _simpleitk(folder)
            sitk_s.append(time.perf_counter() - t)
        assert a.size == b.size
    result = {
        "shape": list(shape),
        "ours_seconds_median": statistics.median(ours_s),
        "simpleitk_seconds_median": statistics.median(sitk_s),
    }
    result["ratio"] = result["ours_seconds_median"] / result["simpleitk_seconds_median"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    r = run(tuple(args.shape), args.repeats)
    print(f"series {'x'.join(map(str, r['shape']))} uncompressed CT, medians of {args.repeats} runs")
    print(f"  discover + stack (ours):        {r['ours_seconds_median']:.3f} s")
    print(f"  SimpleITK ImageSeriesReader:    {r['simpleitk_seconds_median']:.3f} s")
    print(f"  ratio ours / SimpleITK:         {r['ratio']:.2f}  (target <= 1.2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
