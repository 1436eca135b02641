"""Wall time of the same series segmented from a real Orthanc (search + WADO-RS + STOW-RS) and from a local
folder holding the same files; both must give the same masks. Prints the figures (run with ``-s``); the
README's table quotes them."""

from __future__ import annotations

import shutil
import time

import nibabel as nib
import numpy as np
import pytest

from pipeline.archive.run import ArchiveOptions, segment_archive
from pipeline.batch import exit_code, segment_folder
from tests.archive.test_archive_orthanc import CREDENTIALS, segmenter  # noqa: F401  (fixture)
from tests.batch.test_batch import _one_thread  # noqa: F401  (fixture)


@pytest.mark.slow
def test_archive_run_against_the_same_folder_run(orthanc, ct_studies, real_series, tmp_path, segmenter):
    folder = tmp_path / "folder"
    for files in [*real_series.values(), *(f for f, _ in ct_studies.values())]:
        target = folder / files[0].parent.name
        target.mkdir(parents=True)
        for path in files:
            shutil.copy2(path, target / path.name)
    times = {}
    # warm-up (imports, first reads), outside the timings: the 3-slice CT alone
    segment_folder(folder / "ct3", tmp_path / "out_warmup", segmenter, dicom_seg=True, qc=False,
                   isolate_reading=False)
    start = time.perf_counter()
    local = segment_folder(folder, tmp_path / "out_folder", segmenter, dicom_seg=True, qc=False, isolate_reading=False)
    times["folder"] = time.perf_counter() - start
    for name, push in (("archive", False), ("archive_push", True)):
        start = time.perf_counter()
        run = segment_archive(orthanc.dicomweb, tmp_path / f"out_{name}", segmenter, dicom_seg=True, qc=False,
                              isolate_reading=False, archive=ArchiveOptions(credentials=CREDENTIALS, push=push))
        times[name] = time.perf_counter() - start
        assert exit_code(run.results) == 0 and run.retrieved == 5
    assert exit_code(local) == 0 and len(local) == 5
    # the same masks, series by series (matched by SeriesInstanceUID)
    by_uid = {r.series_uid: r for r in run.results}
    for result in local:
        ours = nib.load(by_uid[result.series_uid].output)
        theirs = nib.load(result.output)
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-6)
    voxels = sum(int(np.prod(r.shape)) for r in local)
    print(f"\n5 series, {voxels / 1e6:.1f} M voxels: folder {times['folder']:.2f} s; archive (search + retrieve) "
          f"{times['archive']:.2f} s; archive + push {times['archive_push']:.2f} s")
