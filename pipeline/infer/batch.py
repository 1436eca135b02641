"""``segment_folder``: every scan under a folder, one at a time, one bad scan never stops the batch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from pipeline.errors import InputError, describe_error
from pipeline.infer.segmenter import Segmenter
from pipeline.io.discover import Case, discover_cases
from pipeline.io.write import write_mask

log = logging.getLogger(__name__)

MASK_SUFFIX = "_seg.nii.gz"


@dataclass
class CaseResult:
    case_id: str
    source: str
    status: str  # done | failed
    output: str = ""
    error: str = ""
    seconds: float = 0.0
    shape: tuple = ()


def segment_folder(
    input_dir: Union[str, Path],
    output_dir: Union[str, Path],
    model: Union[str, Path, Segmenter],
    *,
    device: str = "auto",
    on_case: Optional[Callable[[CaseResult], None]] = None,
    progress: bool = False,
) -> list[CaseResult]:
    """Segment every scan under ``input_dir`` into ``output_dir/<case>_seg.nii.gz``.

    ``model`` is a checkpoint path or a ready :class:`Segmenter`. Returns one result per case; a case
    that fails is recorded with its error and the others go on.
    """
    cases = discover_cases(input_dir)
    if not cases:
        raise InputError(
            f"no scans found under '{input_dir}': expected NIfTI files (.nii/.nii.gz) or folders of "
            "DICOM files. Check the path"
        )
    segmenter = model if isinstance(model, Segmenter) else Segmenter.from_checkpoint(model, device=device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="segment", unit="case")
    for case in iterator:
        result = _segment_case(segmenter, case, output_dir)
        results.append(result)
        if on_case is not None:
            on_case(result)
    return results


def _segment_case(segmenter: Segmenter, case: Case, output_dir: Path) -> CaseResult:
    start = time.perf_counter()
    out_path = output_dir / f"{case.case_id}{MASK_SUFFIX}"
    try:
        seg = segmenter.segment(case.source)
        write_mask(seg.labels, seg.affine, out_path, source=case.source if case.kind == "nifti" else None)
    except Exception as exc:  # isolate the case: record why, go on with the others
        message = describe_error(exc)
        log.error("case %s failed: %s", case.case_id, message)
        log.debug("case %s traceback", case.case_id, exc_info=True)
        return CaseResult(case.case_id, case.display_source, "failed", error=message,
                          seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    log.info("case %s done in %.1f s -> %s", case.case_id, seconds, out_path)
    return CaseResult(case.case_id, case.display_source, "done", output=str(out_path), seconds=seconds,
                      shape=tuple(int(s) for s in seg.labels.shape))
