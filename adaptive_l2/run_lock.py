"""One run per folder: a lock file naming the process that owns a folder, taken before anything is
written there.

Two runs started into one OUTPUT_DIR used to interleave their checkpoints and configs, and a rerun
without --resume silently overwrote a finished run. `PidLock` is an exclusive lock file (created
with O_EXCL, so it works on any filesystem that honours it, NFS included) that records the pid,
host, start time and command of its owner; a lock whose process is gone (same host) is stale and is
taken over with a warning. `claim_output_dir` adds the rule that a finished folder (it holds
final_results.json) is only reused by `--resume` or `--overwrite`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from typing import Dict, List, Optional

from adaptive_l2.run_files import RESULTS_FILE, RUN_LOCK_FILE

logger = logging.getLogger(__name__)


class FolderBusyError(RuntimeError):
    """The folder is owned by a live process (or by a process on another host)."""


class FinishedRunError(FileExistsError):
    """The folder holds a finished run that the command would overwrite."""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(owner: Dict) -> str:
    started = owner.get("start_time")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {when}, "
            f"command: {owner.get('command', '?')}")


class PidLock:
    """An exclusive lock file at `path`, owned by this process until `release()`.

    `acquire(wait_s=0)` refuses a live owner at once (FolderBusyError naming it); with `wait_s` > 0
    it polls until the owner is gone or the time is up. A stale lock (owner dead, same host) is
    renamed away atomically before ours is created, so two processes never both take it over.
    """

    def __init__(self, path: str, command: Optional[List[str]] = None, what: str = ""):
        self.path = os.path.abspath(path)
        self.command = " ".join(command if command is not None else sys.argv)
        self.what = what or os.path.dirname(self.path)
        self.held = False

    def _owner(self) -> Optional[Dict]:
        try:
            with open(self.path) as handle:
                text = handle.read()
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(text)
        except ValueError:
            owner = None
        if not isinstance(owner, dict):
            # being written right now by its owner, or torn: judged by its age below
            return {"pid": -1, "host": socket.gethostname(), "torn": True,
                    "mtime": os.path.getmtime(self.path)}
        return owner

    def _try_create(self) -> bool:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": time.time(),
                  "command": self.command}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        self.held = True
        return True

    def _take_over_if_stale(self, owner: Dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return False  # its pid means nothing here
        if owner.get("torn"):
            if time.time() - owner["mtime"] < 10:
                return False  # probably being written this instant
        elif pid_alive(int(owner.get("pid", -1))):
            return False
        aside = f"{self.path}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another process took it over first
        os.remove(aside)
        logger.warning("%s: took over the stale lock of a process that is gone (%s)", self.what,
                       _describe(owner))
        return True

    def acquire(self, wait_s: float = 0.0) -> "PidLock":
        deadline = time.monotonic() + wait_s
        while True:
            if self._try_create():
                return self
            owner = self._owner()
            if owner is None or self._take_over_if_stale(owner):
                continue
            if time.monotonic() >= deadline:
                where = "" if owner.get("host") == socket.gethostname() else \
                    " (another host: if that run is gone, delete the lock file)"
                raise FolderBusyError(
                    f"{self.what} is in use by another run: {_describe(owner)}{where}. Lock file: "
                    f"{self.path}. Wait for it to finish, or use another folder.")
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def release(self) -> None:
        if self.held:
            self.held = False
            owner = self._owner()
            if owner is not None and owner.get("pid") == os.getpid():
                os.remove(self.path)

    def __enter__(self) -> "PidLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def claim_output_dir(output_dir: str, *, resume: bool = False, overwrite: bool = False,
                     command: Optional[List[str]] = None) -> PidLock:
    """Lock `output_dir` for this run (create it if needed) and check the run may write there.

    Raises FolderBusyError if another live run holds it, and FinishedRunError if it holds a finished
    run (final_results.json) and neither `resume` nor `overwrite` is set. With `overwrite`, the old
    final_results.json is removed at once, so an interrupted rerun never looks finished. Release
    the returned lock (or use it as a context manager) when the run ends.
    """
    if not output_dir:
        raise ValueError("OUTPUT_DIR is empty: give the run a folder of its own")
    os.makedirs(output_dir, exist_ok=True)
    lock = PidLock(os.path.join(output_dir, RUN_LOCK_FILE), command,
                   what=f"OUTPUT_DIR {os.path.abspath(output_dir)}").acquire()
    results = os.path.join(output_dir, RESULTS_FILE)
    if os.path.isfile(results) and not resume:
        if not overwrite:
            lock.release()
            raise FinishedRunError(
                f"OUTPUT_DIR {os.path.abspath(output_dir)} holds a finished run ({RESULTS_FILE} "
                "exists). Pass --resume to continue or re-evaluate it, --overwrite to replace it, "
                "or set OUTPUT_DIR to another folder.")
        logger.warning("--overwrite: replacing the finished run in %s", output_dir)
        os.remove(results)
    return lock
