"""``dicomweb+http://HOST:PORT/PATH`` (or ``dicomweb+https://``): a DICOMweb service root as an input "folder"."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import InputError

SCHEMES = ("dicomweb+http", "dicomweb+https")


def is_archive_url(text) -> bool:
    return isinstance(text, str) and text.lower().startswith(tuple(s + "://" for s in SCHEMES))


@dataclass(frozen=True)
class ArchiveURL:
    """``base``: the service root the client talks to (``http(s)://HOST:PORT/PATH``, no trailing slash);
    ``public``: how it is written in logs and the manifest (the same: it never holds credentials)."""

    base: str
    https: bool

    @property
    def public(self) -> str:
        return self.base


def parse_archive_url(text: str) -> ArchiveURL:
    """Refuses credentials inside the address: they would show in the process listing and the logs."""
    if not is_archive_url(text):
        raise InputError(f"not a DICOMweb address: {text!r}. Expected dicomweb+http://HOST:PORT/dicom-web "
                         "or dicomweb+https://HOST/PATH")
    parts = urlsplit(text[len("dicomweb+"):])
    if parts.username is not None or parts.password is not None:
        raise InputError("the DICOMweb address holds a user name or password: remove it (credentials never go on "
                         "the command line; set MEDSEG_DICOMWEB_USER/MEDSEG_DICOMWEB_PASSWORD or "
                         "MEDSEG_DICOMWEB_TOKEN, or pass --credentials FILE)")
    if not parts.hostname:
        raise InputError(f"DICOMweb address {text!r} names no host: expected dicomweb+http://HOST:PORT/dicom-web")
    if parts.query or parts.fragment:
        raise InputError(f"DICOMweb address {text!r} has a query or fragment: give the service root only, "
                         "and the search as --query \"Modality=CT&StudyDate=...\"")
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise InputError(f"DICOMweb address {text!r} has an invalid port: expected a number 1-65535") from None
    base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return ArchiveURL(base=base, https=parts.scheme == "https")
