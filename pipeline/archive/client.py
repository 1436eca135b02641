"""A ``dicomweb-client`` session for one archive: auth, TLS verification, timeout, and a request count.

TLS certificates are verified by default (``ca_bundle``: a PEM file of the hospital's CA); ``insecure``
turns verification off, explicitly. The count of requests per method (``GET``/``POST``...) lets a run
show that a resumed run asked nothing it did not need.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from pipeline.archive.credentials import Credentials
from pipeline.archive.url import ArchiveURL
from pipeline.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_ATTEMPTS = 3


@dataclass
class ClientOptions:
    """How to reach the archive: ``timeout_s`` per attempt (connect and read), ``attempts`` per request
    (dicomweb-client retries timeouts, lost connections and HTTP 429/408/503/504 with exponential back-off),
    TLS settings."""

    ca_bundle: Optional[Union[str, Path]] = None
    insecure: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    attempts: int = DEFAULT_ATTEMPTS


@dataclass
class RequestCounter:
    """Requests sent, by method (``GET``, ``POST``, ...); thread safe."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hook(self, response, *args, **kwargs):
        with self._lock:
            self.counts[response.request.method] += 1
        return response

    def total(self) -> int:
        return sum(self.counts.values())


def make_client(url: ArchiveURL, credentials: Credentials, options: Optional[ClientOptions] = None,
                counter: Optional[RequestCounter] = None):
    """A :class:`dicomweb_client.DICOMwebClient` for ``url`` (its requests session carries the auth)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    options = options or ClientOptions()
    session = requests.Session()
    if credentials.kind == "basic":
        session.auth = (credentials.user, credentials.secret)
    elif credentials.kind == "bearer":
        session.headers["Authorization"] = f"Bearer {credentials.secret}"
    session.verify = _verify(url, options)
    if counter is not None:
        session.hooks["response"].append(counter.hook)
    client = DICOMwebClient(url.base, session=session, timeout=options.timeout_s)
    attempts = max(1, int(options.attempts))
    client.set_http_retry_params(retry=attempts > 1, max_attempts=attempts, wait_exponential_multiplier=500)
    return client


def _verify(url: ArchiveURL, options: ClientOptions):
    if options.insecure:
        if url.https:
            log.warning("TLS certificate verification is off (--insecure): the archive's identity is not checked")
        return False
    if options.ca_bundle is not None:
        path = Path(options.ca_bundle)
        if not path.is_file():
            raise InputError(f"CA bundle '{path}' not found: expected a PEM file of the certificate authority "
                             "that signed the archive's certificate")
        return str(path)
    return True
