"""Keeping patient identity out of what we write: case ids, paths and messages.

Source folders are often named after the patient or the accession number
(``/data/DOE^JOHN/PID12345/ACC998877/CT``). The rule, applied to every output (file names, manifest,
sidecars, ``index.html``, ``lesions.csv``, logs, ``convert``'s index):

* a path is written relative to the input folder, which is named by its own last component only
  (never an absolute path, never the folders above the input folder);
* a path component *holding* (case- and punctuation-insensitively) a PatientName, PatientID or
  AccessionNumber seen in the input (or a part of the name of at least 3 letters, e.g. the family
  name) becomes ``patient-<8 hex digits of its SHA-256>`` (:func:`patient_token`: stable, distinct per
  component, not the identifier itself);
* free text (error messages, skip reasons, log lines) gets the same treatment: the input folder's
  absolute path becomes its public name, and every identifier and redacted component found in it
  becomes its token.

``keep_paths=True`` (``--keep-paths``) turns the path rule off: full paths as given. The tokens are
unsalted hashes: the same component always gets the same token (runs and sites can be matched), and
whoever knows an identifier can recompute its token, so they pseudonymise, they do not anonymise.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Union

PATIENT_KEYWORDS = ("PatientName", "PatientID", "AccessionNumber")
MIN_IDENTIFIER_LENGTH = 3  # shorter values ("1", "CT") would match half the folder names


def normalise(text) -> str:
    """Lower case, letters and digits only: ``"Doe^John"`` -> ``"doejohn"``."""
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


def patient_token(text: str) -> str:
    """``patient-<8 hex>``: the stable stand-in for a path component or value holding an identifier."""
    return "patient-" + hashlib.sha256(normalise(text).encode()).hexdigest()[:8]


def identifiers(values: Iterable[str]) -> set[str]:
    """Normalised identifiers of DICOM patient values (whole values, and the parts of names)."""
    found = set()
    for value in values:
        for piece in [value, *re.split(r"[\^=]", str(value))]:
            normalised = normalise(piece)
            if len(normalised) >= MIN_IDENTIFIER_LENGTH:
                found.add(normalised)
    return found


def holds_identifier(part: str, idents: Iterable[str]) -> bool:
    normalised = normalise(part)
    return any(i in normalised for i in idents)


def redact_part(part: str, idents: Iterable[str]) -> str:
    """``part`` itself, or its :func:`patient_token` when it holds one of ``idents``."""
    return patient_token(part) if holds_identifier(part, idents) else part


class Redactor:
    """Public forms of the paths and messages of one run over ``root`` (see the module docstring).

    ``values``: the raw PatientName/PatientID/AccessionNumber values seen in the input.
    ``keep_paths``: nothing is changed (paths in full, messages as they are): the user asked for them.
    """

    def __init__(self, root: Union[str, Path], values: Iterable[str] = (), keep_paths: bool = False):
        self.root = Path(root)
        self.keep_paths = keep_paths
        values = sorted({str(v).strip() for v in values if str(v).strip()})
        self.idents = identifiers(values)
        self.root_name = redact_part(Path(os.path.abspath(self.root)).name or "input", self.idents)
        self._replacements: dict[str, str] = {}  # raw text -> public text, for messages
        for value in values:
            if len(normalise(value)) >= MIN_IDENTIFIER_LENGTH:
                self._replacements[value] = patient_token(value)
            for piece in re.split(r"[\^=]", value):
                if piece != value and len(normalise(piece)) >= MIN_IDENTIFIER_LENGTH:
                    self._replacements[piece] = patient_token(piece)
        self._pattern: Optional[re.Pattern] = None
        self._root = self._root_pattern()

    def path(self, path: Union[str, Path, None]) -> str:
        """``path`` relative to the input folder (prefixed by its public name), components redacted."""
        if path is None or str(path) == "":
            return ""
        if self.keep_paths:
            return str(path)
        parts = self._relative_parts(Path(path))
        public = [redact_part(p, self.idents) for p in parts]
        for raw, token in zip(parts, public):
            if raw != token and raw not in self._replacements:
                self._replacements[raw] = token
                self._pattern = None
        return "/".join([self.root_name, *public])

    def text(self, text) -> str:
        """A message with the input folder's path made public and every identifier replaced."""
        text = "" if text is None else str(text)
        if self.keep_paths or not text:
            return text
        if self._root is not None:
            text = self._root.sub(self.root_name, text)
        pattern = self._compiled()
        if pattern is None:
            return text
        return pattern.sub(lambda m: self._token_for(m.group(0)), text)

    def log_filter(self) -> logging.Filter:
        """A handler filter that passes every record through :meth:`text` (message, arguments, exception)."""
        redactor = self

        class _Redact(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                record.msg, record.args = redactor.text(record.getMessage()), None
                if record.exc_info and not record.exc_text:
                    record.exc_text = logging.Formatter().formatException(record.exc_info)
                if record.exc_text:
                    record.exc_text = redactor.text(record.exc_text)
                return True

        return _Redact()

    # --- internals --------------------------------------------------------------------------------

    def _relative_parts(self, path: Path) -> list[str]:
        for root in (self.root, Path(os.path.abspath(self.root))):
            for candidate in (path, Path(os.path.abspath(path))):
                try:
                    return [p for p in candidate.relative_to(root).parts if p not in ("", ".")]
                except ValueError:
                    continue
        return [path.name]  # outside the input folder (should not happen): its name only

    def _root_pattern(self) -> Optional[re.Pattern]:
        """The input folder's path as given and absolute (not a bare name: "in" is in many words)."""
        forms = {str(self.root).rstrip("/"), os.path.abspath(self.root)}
        forms = sorted((f for f in forms if "/" in f and f != "/"), key=len, reverse=True)
        if not forms:
            return None
        return re.compile(r"(?<![\w./-])(?:" + "|".join(re.escape(f) for f in forms) + r")(?![\w.-])")

    def _compiled(self) -> Optional[re.Pattern]:
        if self._pattern is None and self._replacements:
            alternatives = []
            for raw in sorted(self._replacements, key=len, reverse=True):
                pieces = re.findall(r"[A-Za-z0-9]+", raw)
                if not pieces:
                    continue
                # any punctuation (or none) between the letters and digits of the value; a short one
                # ("DOE") only as a word of its own, a long one ("PID12345") inside words too
                body = r"[^A-Za-z0-9]*".join(re.escape(p) for p in pieces)
                short = len(normalise(raw)) < 6
                alternatives.append(rf"(?<![A-Za-z0-9]){body}(?![A-Za-z0-9])" if short else body)
            self._pattern = re.compile("|".join(alternatives), re.IGNORECASE) if alternatives else None
        return self._pattern

    def _token_for(self, found: str) -> str:
        key = normalise(found)
        for raw, token in self._replacements.items():
            if normalise(raw) == key:
                return token
        return patient_token(found)



# --- logs -----------------------------------------------------------------------------------------


class HeldLogs(logging.Handler):
    """Records kept back (see :func:`held_logs`) until the identifiers they must not show are known."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self) -> None:
        """Hand the held records to their loggers' handlers as if logged now (filters apply)."""
        records, self.records = self.records, []
        for record in records:
            logging.getLogger(record.name).handle(record)


@contextlib.contextmanager
def held_logs(name: str = "pipeline"):
    """Keep the records of logger ``name`` (and its children) from every handler during the block;
    :meth:`HeldLogs.replay` them afterwards, e.g. inside :func:`redacted_logging`."""
    logger = logging.getLogger(name)
    held = HeldLogs()
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [held], False
    try:
        yield held
    finally:
        logger.handlers, logger.propagate = handlers, propagate


@contextlib.contextmanager
def redacted_logging(redactor: Redactor, name: str = "pipeline"):
    """During the block every handler of the root logger and of ``name`` (console, files; Python's
    last-resort handler too) writes records through :meth:`Redactor.text`."""
    if redactor.keep_paths:
        yield
        return
    log_filter = redactor.log_filter()
    handlers = {*logging.getLogger().handlers, *logging.getLogger(name).handlers}
    if logging.lastResort is not None:
        handlers.add(logging.lastResort)
    for handler in handlers:
        handler.addFilter(log_filter)
    try:
        yield log_filter
    finally:
        for handler in handlers:
            handler.removeFilter(log_filter)
