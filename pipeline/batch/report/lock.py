"""One run per output folder (per shard): a lock file holding the owner's pid, host and start time.

The lock is created complete and atomically (written to a temporary name, then hard-linked into
place, which fails if a lock exists). A lock left by a run that died (``kill -9``, power loss) is
recognised as stale when it names this host and its pid no longer runs, and is taken over with a
warning. A lock from another host cannot be checked and is always respected: delete it by hand if
that run is gone. (A pid reused by an unrelated process makes a stale lock look alive; the message
says which pid to check.)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterable, Optional, Union

from pipeline.errors import InputError

log = logging.getLogger(__name__)

_UNREADABLE_GRACE_S = 10.0  # a lock file without content this old is debris, not a run starting up


class OutputLockedError(InputError):
    """Another run holds the output folder's lock."""


class OutputLock:
    """Context manager: ``with OutputLock(out / ".medseg.lock"): ...``.

    ``conflicts``: other lock files that must not be held by a live run either (e.g. a whole-folder
    run and its shards exclude each other). They are checked after this lock is taken, so two runs
    starting at the same moment cannot both miss each other.
    """

    def __init__(self, path: Union[str, Path], what: str = "output folder", conflicts: Iterable[Path] = ()):
        self.path = Path(path)
        self.what = what
        self.conflicts = list(conflicts)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        # no command line: its paths may name the patient (pipeline.io.privacy)
        self._held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(5):
            if self._create():
                self._held = True
                self._remove_debris()
                self._check_conflicts()
                return
            holder = read_lock(self.path)
            if not self._is_stale(holder):
                raise self._locked_error(holder)
            self._remove_stale(holder)
        raise self._locked_error(read_lock(self.path))

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        holder = read_lock(self.path)
        mine = holder is not None and (holder.get("pid"), holder.get("host")) == (self.info["pid"], self.info["host"])
        if mine:
            self.path.unlink(missing_ok=True)

    # --- internals --------------------------------------------------------------------------------

    def _create(self) -> bool:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        tmp.write_text(json.dumps(self.info))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create instead
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(self.info))
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _check_conflicts(self) -> None:
        for other in self.conflicts:
            holder = read_lock(other)
            if holder is not None and not OutputLock(other)._is_stale(holder):
                self.release()
                raise OutputLock(other, self.what)._locked_error(holder)

    def _remove_debris(self) -> None:
        """Temporary lock files (``<lock>.<pid>.<n>.tmp``, ``<lock>.stale.<pid>``) of processes that died."""
        for path in self.path.parent.glob(f"{self.path.name}.*"):
            parts = path.name[len(self.path.name) + 1:].split(".")
            pid = parts[1] if parts[0] == "stale" and len(parts) > 1 else parts[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                path.unlink(missing_ok=True)

    def _is_stale(self, holder: Optional[dict]) -> bool:
        if holder is None:  # vanished meanwhile, or debris without content
            try:
                return time.time() - self.path.stat().st_mtime > _UNREADABLE_GRACE_S
            except FileNotFoundError:
                return True
        if holder.get("host") != self.info["host"]:
            return False
        return not pid_alive(holder.get("pid"))

    def _remove_stale(self, holder: Optional[dict]) -> None:
        if holder is not None:
            log.warning("taking over the stale lock %s of pid %s on %s (started %s): that process has ended",
                        self.path, holder.get("pid"), holder.get("host"), holder.get("started"))
        moved = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        try:
            os.replace(self.path, moved)
        except FileNotFoundError:
            return
        if read_lock(moved) != holder:  # another run took over in between: give its lock back
            try:
                os.link(moved, self.path)
            except OSError:
                pass
        moved.unlink(missing_ok=True)

    def _locked_error(self, holder: Optional[dict]) -> OutputLockedError:
        who = "another medseg run"
        if holder:
            who = (f"another medseg run (pid {holder.get('pid')} on host {holder.get('host')}, "
                   f"since {holder.get('started')})")
        return OutputLockedError(
            f"{self.what} '{self.path.parent}' is in use by {who}: its lock file is '{self.path}'. Wait for that "
            "run to finish or use another output folder; if that run is gone, delete the lock file"
        )


def read_lock(path: Path) -> Optional[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid) -> bool:
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
