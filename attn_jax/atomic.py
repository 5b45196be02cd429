"""Files written whole or not at all: a crash, a kill or a full disk mid-write leaves the previous
version (or nothing), never half a file."""

import os
from pathlib import Path


def write_text(path: str | Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same folder and an atomic rename."""
    write_bytes(path, text.encode())


def write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
