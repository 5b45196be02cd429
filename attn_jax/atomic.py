"""Files written whole or not at all: a crash, a kill or a full disk mid-write leaves the previous
version (or nothing), never half a file; and the run's JSON files read back, a damaged one (cut
short, overwritten or edited outside attn_jax) named in one line."""

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from attn_jax.errors import RunFault, reason


def write_text(path: str | Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same folder and an atomic rename."""
    write_bytes(path, text.encode())


def write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with naming(path):
            _write_whole(tmp, data)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create(path: str | Path, write: Callable[[Path], None]) -> None:
    """Creates `path` whole or not at all: `write(temporary)` in the same folder, then the temporary
    published by a hard link, which fails with FileExistsError, changing nothing, if `path` exists
    (so of two creators only one succeeds); the temporary goes either way."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with naming(path):
            write(tmp)
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_text(path: str | Path, text: str) -> None:
    """`create` of a file holding `text`."""
    create(path, lambda tmp: _write_whole(tmp, text.encode()))


def _write_whole(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Within the block, an OSError that names no file (a full disk met while writing, flushing or
    syncing an open file) is raised naming `path`, the file the caller is writing."""
    try:
        yield
    except OSError as e:
        if e.errno is None or (e.filename is not None and not Path(e.filename).name.startswith(
                f".{path.name}.")):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def read_json_object(path: str | Path, fix: str) -> dict:
    """The JSON object in `path` (a run's `run.json`, `summary.json`, ...); one that is not JSON, or
    not an object, is a `RunFault` naming the file, what is wrong and `fix`, how to go on."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RunFault(f"{path} is damaged ({reason(e)}): {fix}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(value), "a number")
        raise RunFault(f"{path} is damaged (it holds {kind}, not a JSON object): {fix}")
    return value
