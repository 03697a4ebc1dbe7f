"""Errors and files for the distill_slm scripts: a user's mistake is one line and exit code 2 (UserError,
user_errors), a NOTE is said once (note), data files are read with errors that name the file and its line
(read_records), and outputs are checked before anything loads and written whole or not at all (atomic_open,
write_json, write_jsonl, write_outputs).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path


# ----------------------------------------------------------------------------------------------------------------
# errors and files

class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr with exit code 2, never a traceback."""


@contextlib.contextmanager
def user_errors():
    """Wrap a script's main(): a UserError (or a missing file / interrupted run) becomes one line and exit code 2."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


_notes_said: set[str] = set()


def note(msg: str, once: bool = True) -> None:
    """Print 'NOTE: …' to stderr (once per message), for inherited or overridden values and fallbacks."""
    if once and msg in _notes_said:
        return
    _notes_said.add(msg)
    print(f"NOTE: {msg}", file=sys.stderr, flush=True)


def need_file(path: str | os.PathLike, what: str = "file") -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    return p


def read_text(path: str | os.PathLike, what: str = "data file") -> str:
    """A file's text as UTF-8 (a leading BOM is dropped). Not UTF-8: one line naming the file, line and column."""
    p = need_file(path, what)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col}); "
                        "save the file as UTF-8") from None


def jsonl_lines(text: str) -> list[tuple[int, str]]:
    """(line number of the file, line) of each non-blank line. Splits on "\\n" only (a "\\r" before it is dropped):
    str.splitlines() would also split inside a JSON string at U+2028, U+2029, U+0085 and other separators."""
    return [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def jsonl_dumps(obj) -> str:
    """One JSONL line (no newline): UTF-8 kept, but the three line separators that are not ASCII control characters
    escaped, so even a reader that splits with str.splitlines() gets one record per line."""
    s = json.dumps(obj, ensure_ascii=False)
    return s.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")


def parse_json(text: str, path, expect: type):
    """The JSON document `text` of file `path`, whose top level must be an `expect` (dict or list); anything else
    is one line naming the file (and the line, for a syntax error)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, expect):
        want = "an object" if expect is dict else "a list of objects"
        raise UserError(f"{path}: expected a JSON {want.split(' ', 1)[1]}, found a {type(obj).__name__}")
    return obj


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in file `path`; anything else is one line naming the file."""
    return parse_json(read_text(path, "file"), path, dict)


def read_records_placed(path: str | os.PathLike, required: tuple[str, ...] = (),
                        nonempty: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """read_records, each record with its place for messages: 'line N' (the line of the file, blank lines counted)
    of a JSONL file, 'record N' of a .json list."""
    p = Path(path)
    text = read_text(p, "data file")
    if p.suffix == ".json":
        data = parse_json(text, p, list)
        rows = [(f"record {i + 1}", r) for i, r in enumerate(data)]
    else:
        rows = []
        for lineno, line in jsonl_lines(text):
            try:
                rows.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{lineno}: invalid JSON ({e.msg})") from None
    for where, r in rows:
        if not isinstance(r, dict):
            raise UserError(f"{p}: {where}: expected a JSON object")
        for f in required:
            if f not in r:
                raise UserError(f"{p}: {where}: missing field '{f}'")
        for f in nonempty:
            if not isinstance(r.get(f), str) or not r[f].strip():
                raise UserError(f"{p}: {where}: field '{f}' must be a non-empty string")
    if not rows:
        raise UserError(f"{p}: no records")
    return rows


def read_records(path: str | os.PathLike, required: tuple[str, ...] = (), nonempty: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file, or a .json file holding a list of objects. Each record must be an object with the
    `required` fields; fields in `nonempty` must also be non-empty strings. Errors name the file and its line."""
    return [r for _, r in read_records_placed(path, required, nonempty)]


def record_places(path: str | os.PathLike) -> list[str]:
    """The place ('line N' of the file, or 'record N' of a .json list) of each record read_records returns."""
    return [where for where, _ in read_records_placed(path)]


# ----------------------------------------------------------------------------------------------------------------
# output paths: checked before anything loads, written whole or not at all

def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_parent(p: Path, what: str) -> None:
    anc = _nearest_existing(p.parent)
    if not anc.is_dir():
        raise UserError(f"{what} {p}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"{what} {p}: cannot write in {anc} (read-only or no permission)")


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, before any model or data loads, if `path` cannot be written as a file."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder: a file goes there; remove it or choose another path")
    _check_writable_parent(p, what)
    return p


def check_output_dir(path: str | os.PathLike, what: str = "--save_dir") -> Path:
    """Fail now, before any model or data loads, if `path` cannot be a folder we write in."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is a file, not a folder; remove it or choose another path")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"{what} {p}: cannot write in it (read-only or no permission)")
    else:
        _check_writable_parent(p, what)
    return p


def _stage(path: Path, mode: str = "w"):
    """(temp file object, temp path) beside `path`, for a rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a normal file is what users expect
    return os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8"), tmp


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w"):
    """Write to a temp file beside `path` and rename it into place on success: never a half-written file."""
    path = Path(path)
    f, tmp = _stage(path, mode)
    try:
        with f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _dump(f, obj, jsonl: bool) -> int:
    """Rows as JSONL (returns how many), or one object as indented JSON (returns 1)."""
    if jsonl:
        n = 0
        for r in obj:
            f.write(jsonl_dumps(r) + "\n")
            n += 1
        return n
    json.dump(obj, f, indent=2, default=str)
    f.write("\n")
    return 1


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_open(path) as f:
        _dump(f, obj, jsonl=False)


def write_jsonl(path: str | os.PathLike, rows) -> int:
    with atomic_open(path) as f:
        return _dump(f, rows, jsonl=True)


def write_outputs(files: dict) -> dict[str, int]:
    """Write several output files all or none: {path: rows (a .jsonl path) or an object (JSON)}. Each is written to
    a temp file beside it; only when all are written are they renamed into place. Returns {path: records}."""
    paths = [Path(p) for p in files]
    for p in paths:
        check_output_file(p)
    staged, counts = [], {}
    try:
        for p, obj in zip(paths, files.values()):
            f, tmp = _stage(p)
            staged.append((tmp, p))
            with f:
                counts[str(p)] = _dump(f, obj, jsonl=p.suffix == ".jsonl")
        for tmp, p in staged:
            os.replace(tmp, p)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return counts


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
