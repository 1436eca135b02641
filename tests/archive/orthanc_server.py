"""A real Orthanc (with its DICOMweb plugin) as a child process on free loopback ports, for the archive tests.

``OrthancServer(tmp).start()`` writes a config (temporary storage, HTTP and DICOM ports both free,
DICOMweb at ``/dicom-web/``, optional basic-auth users), starts ``/usr/sbin/Orthanc CONFIG.json`` and
waits until ``/system`` answers; ``stop()`` ends it. ``skip_reason()`` says why the tests cannot run.
Uploads and deletions go through Orthanc's own REST API (``/instances``, ``/tools/lookup``), never through
the code under test.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def skip_reason() -> Optional[str]:
    """Why a real Orthanc cannot be started here (None: it can)."""
    if not (Path(ORTHANC).is_file() or shutil.which("Orthanc")):
        return f"Orthanc not installed ({ORTHANC}): install the Debian packages orthanc orthanc-dicomweb"
    if not Path(DICOMWEB_PLUGIN).exists():
        return f"Orthanc's DICOMweb plugin not installed ({DICOMWEB_PLUGIN}): install the Debian package orthanc-dicomweb"
    return None


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback TCP ports (held open together while chosen, so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class OrthancServer:
    def __init__(self, root: Path, users: Optional[dict] = None, lua: Optional[str] = None):
        """``lua``: a Lua script for Orthanc (e.g. a ``ReceivedInstanceFilter`` that refuses instances)."""
        self.root = Path(root)
        self.users = dict(users or {})
        self.lua = lua
        self.http_port, self.dicom_port = free_ports(2)
        self.process: Optional[subprocess.Popen] = None
        self.log_path = self.root / "orthanc.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root, as ``medseg segment`` takes it (``dicomweb+http://...``)."""
        return f"dicomweb+{self.base}/dicom-web"

    def start(self, timeout: float = 60.0) -> OrthancServer:
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medseg-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users), "RegisteredUsers": self.users,
            "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpThreadsCount": 8, "StableAge": 1, "SaveJobs": False,
            # One connection per request: with keep-alive, Orthanc closes an idle connection after 1 s, and a
            # request racing that close is reset rather than timed out; the frozen-archive test (SIGSTOP)
            # must see the timeout. The client copes with both (it retries a reset), but a test of one
            # reason must not get the other by chance.
            "KeepAlive": False,
        }
        if self.lua:
            script = self.root / "filter.lua"
            script.write_text(self.lua)
            config["LuaScripts"] = [str(script)]
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        binary = ORTHANC if Path(ORTHANC).is_file() else shutil.which("Orthanc")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([binary, str(path)], stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=self.root)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {self.log_tail()}") from None
            try:
                self.rest("GET", "/system")
                return self
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not answer /system within {timeout:.0f} s: {self.log_tail()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # --- Orthanc's REST API ------------------------------------------------------------------------

    def rest(self, method: str, path: str, data: Optional[bytes] = None, content_type: str = "application/json"):
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", content_type)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body and response.headers.get_content_type() == "application/json" else body

    def upload(self, files) -> int:
        """POST every DICOM file to ``/instances``; the number stored."""
        count = 0
        for path in files:
            answer = self.rest("POST", "/instances", Path(path).read_bytes(), "application/dicom")
            if answer.get("Status") in ("Success", "AlreadyStored"):
                count += 1
        return count

    def _lookup(self, uid: str, kind: str) -> Optional[str]:
        for item in self.rest("POST", "/tools/lookup", uid.encode(), "text/plain"):
            if item.get("Type") == kind:
                return item["ID"]
        return None

    def delete_series(self, series_uid: str) -> None:
        orthanc_id = self._lookup(series_uid, "Series")
        if orthanc_id is None:
            raise KeyError(f"series {series_uid} not in Orthanc")
        self.rest("DELETE", f"/series/{orthanc_id}")

    def series_instances(self, series_uid: str) -> list[dict]:
        orthanc_id = self._lookup(series_uid, "Series")
        return [] if orthanc_id is None else self.rest("GET", f"/series/{orthanc_id}/instances")

    def studies(self) -> list[str]:
        return self.rest("GET", "/studies")

    def modality_count(self, modality: str) -> int:
        """How many series of ``modality`` Orthanc holds."""
        found = self.rest("POST", "/tools/find", json.dumps({"Level": "Series", "Query": {"Modality": modality}})
                          .encode())
        return len(found)

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.rest("GET", f"/instances/{orthanc_id}/file")
