"""What one run of a command owns and how it stops: its output folder (one writer at a time) and the signals.

A run that writes a folder (`mtp train`, `eval`, `bench`) holds an exclusive OS lock on a file in it
(`.mtp-lock`, `fcntl.flock`, the file removed when the run ends): the kernel releases the lock when the process
ends however it ends, kill -9 included, so there is never a stale lock to clear by hand, and a second run on the
same folder is refused at once, naming the first.

SIGTERM (what schedulers, `timeout`, containers and torchrun send) is Ctrl-C: the CLI raises `Terminated`, a
KeyboardInterrupt, wherever SIGINT would raise one, so every command saves what it saves on Ctrl-C; the
training loop finishes its step and checkpoints first. The exit code is 128 + the signal: 130 or 143.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
import typing
from collections.abc import Iterator
from pathlib import Path

from mtp.errors import MTPError
from mtp.io import disk_errors

LOCK_NAME = ".mtp-lock"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt."""


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def interrupt_for(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


_THREADS_LEFT = threading.Event()


def leaves_threads_running() -> None:
    """Said by a command whose daemon threads may still run when it returns (a server's connection threads): the
    command-line process then ends without the interpreter's finalization (`end_process`)."""
    _THREADS_LEFT.set()


def end_process(code: int) -> typing.NoReturn:
    """End the command-line process with `code`. Where a command left daemon threads, without finalizing: CPython
    before 3.14 ends a daemon thread that wakes during finalization with pthread_exit, whose unwinding aborts the
    process in C++ code ("terminate called without an active exception": a SIGTERM'd `mtp serve` exited with
    SIGABRT about once in a hundred suite runs), and nothing is left to write once such a command has stopped."""
    if _THREADS_LEFT.is_set():
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (elsewhere: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, flag: str = "--output") -> Iterator[Path]:
    """Hold `folder` (created if missing) for this process: a second holder is refused with one MTPError
    naming the process that has it. Released when the block ends or the process dies."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MTPError(f"{flag} {folder} is a file, not a folder")
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    with disk_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    fd = _lock_file(lock, f"{flag} {folder}")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        lock.unlink(missing_ok=True)  # while still held: the next holder creates a new one (see _lock_file)
        _remove_empty(created)  # a run stopped before writing anything leaves no folder (nor `eval/` above it)
        os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while each is empty; another run's files in one keep it and those above."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): what is above stays too
            return


def _lock_file(path: Path, what: str) -> int:
    """An open descriptor of `path` holding its exclusive lock. A holder removes the file when it is done, so a
    lock taken on a file that is no longer at `path` is a stale one: take the new file's."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise MTPError(f"{what} is in use by another mtp run (pid {holder}); wait for it to end, or choose "
                           "another folder") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
