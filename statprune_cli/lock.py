"""One run per output: an exclusive lock on the output folder, its temporary and its progress folders.

Two runs writing the same output would mix their layers (a streaming run writes a shard per layer
as it goes), so ``prune`` takes ``.NAME.lock`` beside the output before any heavy work, and a
second run on the same output stops at once (exit 1) with a line naming the holder.

The lock is ``fcntl.flock`` on that file, and the file records the holder (pid, host, start time)
for that line. The kernel drops the lock when its holder exits, however it exits (SIGKILL
included), so a run killed on this host never blocks the next: the next run takes the lock, finds
the dead run's record, says it takes over, and writes its own. A run that ends removes the file
while it still holds the lock; a run that locked the file just before it went checks that the path
still names the file it locked, else locks the new one.

Across hosts on a shared file system: on NFS, Linux implements flock with NFS byte-range locks, so
runs on two hosts exclude each other where the server supports locking. Where locks are local only
(NFS mounted with ``nolock`` or ``local_lock=all``, some FUSE and CIFS mounts), both could get the
lock; then a record left by another host still stops a run (exit 1), since a live run there cannot
be told from a dead one: delete the lock file once that run is known to be gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from statprune_cli.config import Config
from statprune_cli.distributed import is_main_process
from statprune_cli.errors import InputError, OutputLocked
from statprune_cli.export import check_output_room, leftovers, recover_output
from statprune_cli.load import output_bytes


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _holder(record: dict[str, Any] | None) -> str:
    if not record:  # a run that has not written its record yet, or was killed while writing it
        return "a run whose record is empty"
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"


def _read_record(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:  # a holder killed while writing its record
        return {}


def _write_record(fd: int, record: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)


@contextmanager
def output_lock(out: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold ``out``'s lock for the block; OutputLocked at once if a live run holds it."""
    path = lock_path(out)
    fd = _locked_fd(path, out)
    try:
        previous = _read_record(fd)
        host = socket.gethostname()
        if previous and previous.get("host", host) != host:
            raise OutputLocked(f"{out} is locked by a run on another host ({_holder(previous)}) that may still be "
                               f"running; once it is gone, delete {path}")
        if previous is not None:
            log(f"taking over the lock on {out} left by {_holder(previous)}, which is no longer running")
        _write_record(fd, {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S %z")})
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked: a run that opened it meanwhile sees it went
    finally:
        os.close(fd)  # releases the flock


def _locked_fd(path: Path, out: Path) -> int:
    """A descriptor of the lock file ``path``, flocked, and still the file at ``path``."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"output.dir: cannot create {path} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read_record(fd)
            os.close(fd)
            raise OutputLocked(f"{out} is in use by another statprune run ({_holder(record)}); wait for it to end or "
                               "choose another output") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it between our open and our lock: lock the next one


@contextmanager
def claimed_output(out: Path, log: Callable[[str], None]) -> Iterator[None]:
    """The lock, then whatever a killed run left beside ``out`` finished or removed (``recover_output``)."""
    with output_lock(out, log):
        recover_output(out, log)
        yield


@contextmanager
def one_writer(out: Path, log: Callable[[str], None]) -> Iterator[None]:
    """``claimed_output`` for an output written whole at the end (calibrate's statistics, export's folder), taken by
    rank 0 alone: it alone writes."""
    if not is_main_process():
        yield
        return
    with claimed_output(out, log):
        yield


@contextmanager
def prune_output(cfg: Config, log: Callable[[str], None]) -> Iterator[None]:
    """Everything ``prune`` settles about its output (``output.dir``, which ``run_prune`` requires) before the model
    loads: room for it (exit 2), the lock (exit 1), what a killed run left. Rank 0 alone writes, so it alone locks."""
    if not is_main_process():
        yield
        return
    out = Path(cfg.output.dir)
    check_output_room(out, output_bytes(cfg.model))
    with claimed_output(out, log):
        yield


def recover_if_idle(out: Path, log: Callable[[str], None]) -> None:
    """For commands that only read an output (eval, export): finish an interrupted replacement of it, unless a run
    holds its lock (that run finishes it). Nothing is created beside a folder that has no leftovers."""
    if not leftovers(out):
        return
    try:
        with claimed_output(out, log):
            pass
    except OutputLocked:
        pass
