"""Where a batch run writes: the per-case files, the per-run (per-shard) files, and shards themselves.

Per case (``OUTPUT_DIR/``): ``<case>_seg.nii.gz`` (mask), ``<case>_seg.dcm`` (DICOM SEG, DICOM
sources with ``dicom_seg``), ``<case>_prob.nii.gz`` (probabilities, with ``save_probabilities``),
``qc/<case>.png`` (QC picture) and ``<case>_seg.json`` (sidecar, always
written last). Per run: ``manifest.csv``/``.json``, ``lesions.csv``, ``index.html``, ``segment.log``
and the lock ``.medseg.lock``; a shard ``I`` of ``N`` writes ``manifest.shard-I-of-N.csv`` and so on
instead (merged by ``medseg manifest``), and no ``index.html``.

Every file is written under a temporary name (``.<name>.XXXXXXXX.<suffix>``) and renamed into place;
temporaries left by a killed run are removed by the next run (only its own: a shard cleans the names
of its own cases, so shards running side by side never delete each other's work).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, TypeVar, Union

from pipeline.batch.report.lock import pid_alive
from pipeline.errors import InputError

MASK_SUFFIX = "_seg.nii.gz"
SIDECAR_SUFFIX = "_seg.json"
DICOM_SEG_SUFFIX = "_seg.dcm"
RTSTRUCT_SUFFIX = "_rtstruct.dcm"
PROBABILITY_SUFFIX = "_prob.nii.gz"  # written by pipeline.io.probabilities
QC_FOLDER = "qc"
_PROBE = ".medseg-write-test."

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``: every ``count``-th case of the sorted list, from ``index``."""

    index: int
    count: int

    @classmethod
    def parse(cls, value: Union[None, str, Shard, Sequence[int]]) -> Optional[Shard]:
        if value is None or isinstance(value, Shard):
            return value
        text = value if isinstance(value, str) else "/".join(str(v) for v in value)
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise InputError(f"shard {text!r} is not of the form I/N: expected e.g. 1/4 (shard 1 of 4; 1-based)")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 1 <= index <= count:
            raise InputError(
                f"shard {text!r} is out of range: expected I/N with 1 <= I <= N (shards are numbered "
                f"from 1), e.g. 1/{max(count, 2)} ... {max(count, 2)}/{max(count, 2)}"
            )
        return cls(index, count)

    def select(self, items: Sequence[T]) -> list[T]:
        """Round-robin on the (already sorted) list: deterministic and balanced within one case."""
        return [item for n, item in enumerate(items) if n % self.count == self.index - 1]

    @property
    def tag(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class RunFiles:
    """The files of one run (or one shard of it) in ``output_dir``."""

    output_dir: Path
    shard: Optional[Shard] = None

    def _name(self, stem: str, ext: str) -> Path:
        middle = f".{self.shard.tag}" if self.shard else ""
        return self.output_dir / f"{stem}{middle}{ext}"

    @property
    def manifest_csv(self) -> Path:
        return self._name("manifest", ".csv")

    @property
    def manifest_json(self) -> Path:
        return self._name("manifest", ".json")

    @property
    def lesions_csv(self) -> Path:
        return self._name("lesions", ".csv")

    @property
    def log(self) -> Path:
        return self._name("segment", ".log")

    @property
    def lock(self) -> Path:
        return self.output_dir / (f".medseg.{self.shard.tag}.lock" if self.shard else ".medseg.lock")

    def conflicting_locks(self) -> list[Path]:
        """Locks of runs that must not share the folder with this one: a whole-folder run excludes every
        shard, and a shard excludes whole-folder runs and shards of another split (``N``)."""
        same_split = f".medseg.shard-*-of-{self.shard.count}.lock" if self.shard else None
        siblings = set(self.output_dir.glob(same_split)) if same_split else set()
        return [p for p in self.output_dir.glob(".medseg*.lock") if p != self.lock and p not in siblings]

    @property
    def index_html(self) -> Optional[Path]:
        return None if self.shard else self.output_dir / "index.html"

    def own_files(self) -> list[Path]:
        files = [self.manifest_csv, self.manifest_json, self.lesions_csv]
        return files + ([self.index_html] if self.index_html else [])


@dataclass(frozen=True)
class CaseOutputs:
    output_dir: Path
    case_id: str

    @property
    def mask(self) -> Path:
        return self.output_dir / f"{self.case_id}{MASK_SUFFIX}"

    @property
    def sidecar(self) -> Path:
        return self.output_dir / f"{self.case_id}{SIDECAR_SUFFIX}"

    @property
    def dicom_seg(self) -> Path:
        return self.output_dir / f"{self.case_id}{DICOM_SEG_SUFFIX}"

    @property
    def rtstruct(self) -> Path:
        return self.output_dir / f"{self.case_id}{RTSTRUCT_SUFFIX}"

    @property
    def qc_png(self) -> Path:
        return self.output_dir / QC_FOLDER / f"{self.case_id}.png"

    @property
    def probabilities(self) -> Path:
        return self.output_dir / f"{self.case_id}{PROBABILITY_SUFFIX}"

    def all(self) -> list[Path]:
        return [self.mask, self.dicom_seg, self.rtstruct, self.qc_png, self.probabilities, self.sidecar]

    def remove(self) -> None:
        """Delete this case's outputs, sidecar first (so a mask never looks finished on its own)."""
        for path in [self.sidecar, self.mask, self.dicom_seg, self.rtstruct, self.qc_png, self.probabilities]:
            path.unlink(missing_ok=True)


def prepare_output_dir(output_dir: Union[str, Path]) -> Path:
    """Create ``output_dir`` (and ``qc/``) and prove it writable, or raise one clear :class:`InputError`."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder '{out}' is a file: expected a folder (it is created if missing)")
    probe = out / f"{_PROBE}{os.getpid()}"
    try:
        (out / QC_FOLDER).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"medseg\n")  # some bytes: a disk without a free block fails here, not on case 1
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise InputError(
            f"cannot write to output folder '{out}': {exc.strerror or exc}. "
            + ("Free space on that disk or choose another folder" if full else "Choose a folder you can write to")
        ) from None
    for debris in out.glob(f"{_PROBE}*"):  # probes of runs killed right here
        pid = debris.name[len(_PROBE):]
        if pid.isdigit() and not pid_alive(int(pid)):
            debris.unlink(missing_ok=True)
    return out


def temp_name_pattern(target_name: str) -> re.Pattern:
    """Temporary names :func:`pipeline.io.atomic.atomic_path` gives ``target_name``."""
    return re.compile(re.escape(f".{target_name}.") + r"[a-z0-9_]{8}\..+")


def remove_temporaries(targets: Iterable[Path]) -> list[Path]:
    """Delete temporaries of ``targets`` a killed run left behind; return what was removed."""
    by_folder: dict[Path, list[re.Pattern]] = {}
    for target in targets:
        by_folder.setdefault(target.parent, []).append(temp_name_pattern(target.name))
    removed = []
    for folder, patterns in by_folder.items():
        try:
            names = [e.name for e in os.scandir(folder) if e.name.startswith(".")]
        except OSError:
            continue
        for name in names:
            if any(p.fullmatch(name) for p in patterns):
                (folder / name).unlink(missing_ok=True)
                removed.append(folder / name)
    return removed
