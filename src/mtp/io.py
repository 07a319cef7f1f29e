"""Writing files so that an interrupted run never leaves a half-written one: temp name, then rename.

Temporary files and folders are siblings of their target named `.{target}.tmp-{pid}-{random}`. A run killed
mid-write (SIGKILL, power loss) leaves one behind; the next atomic write to the same target removes every such
sibling whose process is no longer alive on this machine, so a write in progress in another process is never
touched. A folder being replaced is first moved aside as `.{target}.replaced-{pid}`, a name no clean-up ever
deletes: what was there before is never lost to a kill, and a kill between the two renames is undone by the next
write, which moves it back. A disk that is full, read-only or over a size limit is one MTPError naming the target.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from mtp.errors import MTPError, first_line

# `.{name}.tmp-{pid}` or `.{name}.tmp-{pid}-{random}`: what this module names its temporaries;
# `.{name}-tmp-{pid}` is how `mtp train` named its model folder's before.
_TEMPORARY = re.compile(r"\.(?P<name>.+?)[.-]tmp-(?P<pid>\d+)(?:-[^/]*)?")
# `.{name}.replaced-{pid}`: a folder moved aside while its replacement is renamed into place.
_REPLACED = re.compile(r"\.(?P<name>.+?)\.replaced-(?P<pid>\d+)")
# What a write fails with when the disk, not the program, is at fault: the user can free space, raise the limit
# or write elsewhere.
DISK_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists but belongs to another user
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporaries in `folder` (of target `name`, or of any target) whose writing process is dead."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = _TEMPORARY.fullmatch(path.name)
        if not m or (name is not None and m.group("name") != name) or int(m.group("pid")) == os.getpid() \
                or pid_alive(int(m.group("pid"))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def temporary_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-"


def moved_aside(target: Path) -> Path:
    """Where a folder being replaced waits while its replacement is renamed into place."""
    return target.with_name(f".{target.name}.replaced-{os.getpid()}")


def restore_moved_aside(target: Path) -> Path | None:
    """A folder a killed replacement moved aside but never replaced goes back to its name; returns it."""
    if target.exists() or not target.parent.is_dir():
        return None
    for path in target.parent.iterdir():
        m = _REPLACED.fullmatch(path.name)
        if m and m.group("name") == target.name and not pid_alive(int(m.group("pid"))):
            path.rename(target)
            return path
    return None


@contextlib.contextmanager
def disk_errors(target: str | os.PathLike) -> Iterator[None]:
    """A full disk, a file-size limit or a read-only file system while writing `target`: one MTPError naming
    it (the atomic writes have left it as it was)."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        raise MTPError(f"cannot write {target}: {e.strerror or e} (nothing half-written was left)") from e


def _umask() -> int:
    """The process's umask: what `open` applies to a new file's mode. Linux shows it in /proc; elsewhere it is read
    by setting it and setting it back, which another thread creating a file in between would see."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; when the block succeeds the file written there becomes `path`.
    A link's target is what is replaced (the link stays); a path that is no regular file (/dev/null, a named pipe)
    is written as it is: renamed over, it would become a file (as root, /dev/null)."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file() and not path.is_dir():
        with disk_errors(path):
            yield path
        return
    with disk_errors(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent, path.name)
            fd, name = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=path.suffix, dir=path.parent)
        except OSError as e:  # a folder that takes no new files (/proc, a file in the way): name the target
            if e.errno in DISK_ERRORS:
                raise
            raise MTPError(f"cannot write {path}: {e.strerror or e}") from e
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private (0600); the result is a file like any other
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; when the block succeeds it takes `folder`'s place (an
    existing one is moved aside, then removed). On an error or interruption `folder` is left as it was. A file
    at `folder` is refused before anything is written. A symbolic link's target is replaced, the link kept (as
    `atomic_path` does: renamed into, the link itself became a folder, and its target stayed as it was)."""
    folder = Path(folder)
    if folder.is_symlink():
        folder = Path(os.path.realpath(folder))
    if folder.exists() and not folder.is_dir():
        raise MTPError(f"{folder} is a file, not a folder; nothing was written")
    with disk_errors(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder.parent, folder.name)
        restore_moved_aside(folder)
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(folder), dir=folder.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private (0700)
        try:
            yield tmp
            if folder.exists():
                old = moved_aside(folder)
                folder.rename(old)
                tmp.rename(folder)
                shutil.rmtree(old)
            else:
                tmp.rename(folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def check_replaceable(folder: str | os.PathLike, ours: Collection[str], overwrite: bool = False) -> None:
    """Before replacing `folder` (`atomic_folder`): refuse a file, and, unless `overwrite`, a folder holding
    anything but the names in `ours` (what the writer puts there), which replacing it would delete."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MTPError(f"{folder} is a file, not a folder; nothing was written")
    if overwrite or not folder.is_dir():
        return
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in ours)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise MTPError(f"{folder} holds files that saving would delete ({shown}); save to another folder, or "
                       "pass overwrite=True to replace it")


def read_json_object(path: str | os.PathLike, what: str = "a JSON object") -> dict:
    """A JSON file that must hold an object; anything else is one clear MTPError naming the file."""
    path = Path(path)
    try:
        data = json.loads(read_text(path))
    except ValueError as e:
        raise MTPError(f"{path} is not valid JSON: {e}") from e
    except RecursionError:
        raise MTPError(f"{path} is not valid JSON: it nests too deep") from None
    if not isinstance(data, dict):
        raise MTPError(f"{path} is not {what} (expected a JSON object)")
    return data


def as_path(value, name: str) -> Path:
    """A path argument of the Python API: a str or an os.PathLike; anything else is one MTPError."""
    if not isinstance(value, str | os.PathLike):
        raise MTPError(f"{name} must be a path (a str or a pathlib.Path), got {type(value).__name__}")
    return Path(value)


def input_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a file to read: a missing one, or a folder, is one MTPError saying which."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MTPError(f"{path} is a folder, not a {what} file")
    if not path.is_file():
        raise MTPError(f"{path}: {what} file not found")
    return path


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file, without the byte-order mark some editors put first; unreadable or binary content is
    one MTPError naming the file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except IsADirectoryError:
        raise MTPError(f"{path} is a folder, not a file") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise MTPError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise MTPError(f"{path}: cannot read ({e.strerror or e})") from None


def unused_path(path: Path) -> Path:
    """`path`, or the first of `path`-2, -3, ... that does not exist: where something set aside goes (never over
    what an earlier set-aside left)."""
    names = (path if n == 1 else path.with_name(f"{path.name}-{n}") for n in range(1, 10_000))
    return next(p for p in names if not p.exists())


def utf8_text(text: str, where: str) -> str:
    """`text` from the command line or standard input, which Python decodes with `surrogateescape` under a C or
    POSIX locale: bytes that are not UTF-8 come as lone surrogates, which no tokenizer takes (a TypeError from
    deep inside it). One MTPError naming where they are, as `read_text` says of a file."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        place = f"{where}:{text.count(chr(10), 0, e.start) + 1}" if "\n" in text else where
        column = e.start - text.rfind("\n", 0, e.start)  # (from 1)
        raise MTPError(f"{place}: not UTF-8 text (a byte that is no character's, at character {column})") from None
    return text


def text_lines(text: str) -> list[str]:
    """The lines of a file's text, split where a file's lines end (\\n, \\r\\n or \\r), as iterating the open file
    splits them and JSONL readers do: not `str.splitlines()`, which also splits at characters a line may hold (a
    form feed, U+0085, U+2028 and U+2029, which JSON writes unescaped with ensure_ascii=False), cutting a prompt in
    two or a JSON record into two lines that are not JSON."""
    return re.split(r"\r\n|\r|\n", text)


def is_json_name(path: str | os.PathLike) -> bool:
    """A file named .json or .jsonl is read as JSON whatever it holds: anything else in it is an error."""
    return Path(path).suffix.lower() in (".json", ".jsonl")


def check_messages(messages, where: str) -> None:
    """A conversation record's "messages" is a list of {"role", "content"} objects with string values (an
    MTPError saying where if not)."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise MTPError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects with "
                       "string values")


def read_json_records(path: str | os.PathLike, text: str | None = None,
                      limit: int | None = None) -> list[tuple[int, Any]]:
    """The records of a JSON array or a JSONL file (blank lines skipped), each with the line it starts on.
    Content that is not JSON is an MTPError naming the file and the line."""
    path = Path(path)
    text = read_text(path) if text is None else text
    if text.lstrip().startswith("["):
        return _json_array(path, text)[:limit]
    records: list[tuple[int, Any]] = []
    for lineno, line in enumerate(text_lines(text), start=1):
        if limit is not None and len(records) >= limit:
            break
        if not line.strip():
            continue
        records.append((lineno, parse_json_line(path, lineno, line)))
    return records


def parse_json_line(path: str | os.PathLike, lineno: int, line: str) -> Any:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise MTPError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; arrays nested thousands deep
        raise MTPError(f"{path}:{lineno}: not valid JSON ({_unparsable(e)})") from None
    check_characters(path, lineno, line, value)
    return value


def _unparsable(error: Exception) -> str:
    """Why Python's JSON parser refused text that is JSON, in a few words."""
    return "it nests too deep" if isinstance(error, RecursionError) else first_line(error).split(": value has")[0]


def check_characters(path: str | os.PathLike, lineno: int, text: str, value: Any) -> None:
    """JSON text may escape half of a character's UTF-16 pair alone ("\\ud800", as JavaScript writes a cut
    emoji), which parses into a string holding no character: tokenizers refuse it with a TypeError (a traceback
    at the first prompt or training row). One MTPError naming the line instead."""
    if not _SURROGATE_ESCAPE.search(text):  # (the check below re-serialises the record: only where it could be)
        return
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise MTPError(f"{path}:{lineno}: holds a lone surrogate (half of a character's UTF-16 pair, "
                       "\\ud800-\\udfff, escaped alone), which is no character") from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _json_array(path: Path, text: str) -> list[tuple[int, Any]]:
    """Parse a JSON array element by element, so each record keeps the line it starts on for error messages."""
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any]] = []
    pos = text.index("[") + 1
    ws = re.compile(r"\s*")
    try:
        pos = ws.match(text, pos).end()
        if text.startswith("]", pos):
            return records
        while True:
            value, end = decoder.raw_decode(text, pos)
            check_characters(path, text.count("\n", 0, pos) + 1, text[pos:end], value)
            records.append((text.count("\n", 0, pos) + 1, value))
            pos = ws.match(text, end).end()
            if text.startswith("]", pos):
                break
            if not text.startswith(",", pos):
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
            pos = ws.match(text, pos + 1).end()
    except json.JSONDecodeError as e:
        raise MTPError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        raise MTPError(f"{path}:{text.count(chr(10), 0, pos) + 1}: not valid JSON ({_unparsable(e)})") from None
    if text[pos + 1 :].strip():
        raise MTPError(f"{path}:{text.count(chr(10), 0, pos) + 1}: unexpected text after the JSON array")
    return records


def read_complete_records(path: str | os.PathLike) -> list[dict]:
    """The JSON-object lines of a log appended to as work finishes; a line cut off by an interruption (or any
    line that is not an object) is skipped. A missing file has none."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in text_lines(read_text(path)):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def open_append(path: str | os.PathLike):
    """A JSONL file opened to append lines; a last line cut off by an interruption is ended first, so it stays on
    its own (and is skipped when read) instead of swallowing the next line."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sink = Path(path).open("a", encoding="utf-8")
    if sink.tell() > 0:
        with Path(path).open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                sink.write("\n")
    return sink


def append_records(f, records: Iterable[dict]) -> None:
    """Append JSON lines to the open log `f` and force them to disk: a kill loses no finished work (a full disk
    may cut the last line short; readers skip such a line)."""
    with disk_errors(f.name):
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
