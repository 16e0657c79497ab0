"""How the package writes files: atomically, so that nothing it wrote is ever seen half-written.

Checkpoints, metrics, test results, tables, figures and the README's pasted sections all go
through `write_atomic`: the bytes go to a temporary file in the same folder, are flushed to
the disk, and the temporary file then replaces the target in one `os.replace`. A reader (or a
run interrupted by Ctrl-C, SIGTERM or a full disk) sees the old file or the new one, never a
mixture; a failed write leaves the old file as it was and removes the temporary one.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path, data) -> Path:
    """Write `data` (str: UTF-8 text, or bytes) to `path` atomically; returns the path."""
    if not isinstance(data, (str, bytes)):
        raise TypeError(f"data must be str or bytes, got {type(data).__name__}")
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: os.replace stays one rename
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
