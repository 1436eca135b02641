"""Credentials for a DICOMweb archive: basic (user + password) or a bearer token, never from the command line.

Where they come from, first found wins:

* ``--credentials FILE`` (``credentials_file``): refused unless only its owner may read it (mode 0600 or
  0400). JSON (``{"user": ..., "password": ...}`` or ``{"token": ...}``) or one line: ``user:password``
  or ``bearer TOKEN``.
* the environment: ``MEDSEG_DICOMWEB_TOKEN``, or ``MEDSEG_DICOMWEB_USER`` + ``MEDSEG_DICOMWEB_PASSWORD``.

A :class:`Credentials` never shows its secret in ``repr``/``str``, so it cannot leak into a log line.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

from pipeline.errors import InputError

ENV_TOKEN = "MEDSEG_DICOMWEB_TOKEN"
ENV_USER = "MEDSEG_DICOMWEB_USER"
ENV_PASSWORD = "MEDSEG_DICOMWEB_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    """``kind``: ``basic`` | ``bearer`` | ``none``; ``origin``: where they came from (for messages)."""

    kind: str = "none"
    user: str = ""
    secret: str = field(default="", repr=False)  # the password or the token
    origin: str = ""

    def __str__(self) -> str:
        if self.kind == "none":
            return "no credentials"
        who = f" as {self.user!r}" if self.kind == "basic" else ""
        return f"{self.kind} auth{who} (from {self.origin})"

    def secrets(self) -> list[str]:
        """What must never be written anywhere (tests look for these)."""
        return [s for s in (self.secret,) if s]


def load_credentials(credentials_file: Union[str, Path, None] = None,
                     environ: Optional[Mapping[str, str]] = None) -> Credentials:
    if credentials_file is not None:
        return _from_file(Path(credentials_file))
    env = os.environ if environ is None else environ
    if env.get(ENV_TOKEN):
        return Credentials("bearer", secret=env[ENV_TOKEN], origin=ENV_TOKEN)
    user, password = env.get(ENV_USER, ""), env.get(ENV_PASSWORD, "")
    if user or password:
        if not (user and password):
            missing = ENV_PASSWORD if user else ENV_USER
            raise InputError(f"{missing} is not set: basic auth needs both {ENV_USER} and {ENV_PASSWORD} "
                             f"(or set {ENV_TOKEN} for a bearer token)")
        return Credentials("basic", user=user, secret=password, origin=f"{ENV_USER}/{ENV_PASSWORD}")
    return Credentials()


def _from_file(path: Path) -> Credentials:
    try:
        info = path.stat()
    except OSError as exc:
        raise InputError(f"credentials file '{path}' cannot be read ({exc.strerror}): expected a file of mode 0600 "
                         "holding user:password, bearer TOKEN or JSON") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"credentials file '{path}' is not a regular file: expected a file of mode 0600")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise InputError(f"credentials file '{path}' has mode {mode:04o}: others may read it. Expected 0600 "
                         f"(only you); fix with: chmod 600 '{path}'")
    text = path.read_text(encoding="utf-8").strip()
    origin = f"file {path.name}"
    if text.startswith("{"):
        return _from_json(text, path, origin)
    if text.lower().startswith("bearer "):
        token = text[len("bearer "):].strip()
        if token:
            return Credentials("bearer", secret=token, origin=origin)
    elif ":" in text and "\n" not in text:
        user, _, password = text.partition(":")
        if user and password:
            return Credentials("basic", user=user, secret=password, origin=origin)
    raise InputError(f"credentials file '{path}' is not understood: expected one line 'user:password' or "
                     "'bearer TOKEN', or JSON {\"user\": ..., \"password\": ...} / {\"token\": ...}")


def _from_json(text: str, path: Path, origin: str) -> Credentials:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"credentials file '{path}' is not valid JSON (line {exc.lineno}): expected "
                         "{\"user\": ..., \"password\": ...} or {\"token\": ...}") from None
    if isinstance(data, dict) and data.get("token"):
        return Credentials("bearer", secret=str(data["token"]), origin=origin)
    if isinstance(data, dict) and data.get("user") and data.get("password"):
        return Credentials("basic", user=str(data["user"]), secret=str(data["password"]), origin=origin)
    keys = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise InputError(f"credentials file '{path}' holds {keys}: expected the keys user + password, or token")
