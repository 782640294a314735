"""Writing a file so that readers never see half of it: the one temp-file-then-rename of the project.

Every writer of a file that later code trusts (token caches, data files, checkpoints, outputs,
metrics, summaries, plots) goes through ``atomic_write``: the content goes to a temporary file in the
target's folder, then ``os.replace`` puts it in place in one step. A crash or a full disk leaves the
old file (or none) and no temporary file behind. The file gets the mode a plain ``open`` would give it
(0666 less the umask), not the temporary file's 0600: a results folder shared over NFS with the
other nodes of a Ray cluster must stay readable by them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(temp_path)`` in the target's directory, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask sets it, for a moment
    in which another thread's new file would get the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """``text`` as UTF-8, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))
