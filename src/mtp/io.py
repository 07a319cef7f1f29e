"""Writing files so that an interrupted run never leaves a half-written one: temp name, then rename.

Temporary files and folders are siblings of their target named `.{target}.tmp-{pid}-{random}` (and
`.{target}.old-{pid}` for a folder being swapped out). A run killed mid-write (SIGKILL, power loss) leaves one
behind; the next atomic write to the same target removes every such sibling whose process is no longer alive
on this machine, so a write in progress in another process is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mtp.errors import MTPError

# `.{name}.tmp-{pid}` or `.{name}.tmp-{pid}-{random}` (and `.old-`): what this module names its temporaries;
# `.{name}-tmp-{pid}` is how `mtp train` named its model folder's before.
_TEMPORARY = re.compile(r"\.(?P<name>.+?)[.-](?:tmp|old)-(?P<pid>\d+)(?:-[^/]*)?")


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; when the block succeeds the file written there becomes `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    fd, name = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
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
    existing one is swapped out, then removed). On an error or interruption `folder` is left as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder.parent, folder.name)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(folder), dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_json_object(path: str | os.PathLike, what: str = "a JSON object") -> dict:
    """A JSON file that must hold an object; anything else is one clear MTPError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise MTPError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise MTPError(f"{path} is not {what} (expected a JSON object)")
    return data


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file; unreadable or binary content is one MTPError naming the file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise MTPError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise MTPError(f"{path}: cannot read ({e.strerror or e})") from None


def is_json_name(path: str | os.PathLike) -> bool:
    """A file named .json or .jsonl is read as JSON whatever it holds: anything else in it is an error."""
    return Path(path).suffix.lower() in (".json", ".jsonl")


def read_json_records(path: str | os.PathLike, text: str | None = None,
                      limit: int | None = None) -> list[tuple[int, Any]]:
    """The records of a JSON array or a JSONL file (blank lines skipped), each with the line it starts on.
    Content that is not JSON is an MTPError naming the file and the line."""
    path = Path(path)
    text = read_text(path) if text is None else text
    if text.lstrip().startswith("["):
        return _json_array(path, text)[:limit]
    records: list[tuple[int, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(records) >= limit:
            break
        if not line.strip():
            continue
        records.append((lineno, parse_json_line(path, lineno, line)))
    return records


def parse_json_line(path: str | os.PathLike, lineno: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise MTPError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


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
            records.append((text.count("\n", 0, pos) + 1, value))
            pos = ws.match(text, end).end()
            if text.startswith("]", pos):
                break
            if not text.startswith(",", pos):
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
            pos = ws.match(text, pos + 1).end()
    except json.JSONDecodeError as e:
        raise MTPError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
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
    for line in read_text(path).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def append_records(f, records: Iterable[dict]) -> None:
    """Append JSON lines to the open log `f` and force them to disk: a kill loses no finished work."""
    f.write("".join(json.dumps(r) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())
