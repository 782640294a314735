"""Writing a file so that readers never see half of it: the one temp-file-then-rename of the project.

Every writer of a file that later code trusts (token caches, data files, checkpoints, outputs,
metrics, summaries, plots) goes through ``atomic_write``: the content goes to a temporary file in the
target's folder, then ``os.replace`` puts it in place in one step. A crash or a full disk leaves the
old file (or none) and no temporary file behind. The file gets the mode a plain ``open`` would give it
(0666 less the umask), not the temporary file's 0600: a results folder shared over NFS with the
other nodes of a Ray cluster must stay readable by them.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# A write that failed with less than this free in its folder failed for lack of space: torch.save and
# safetensors report a failed write as errors of their own, without an errno (RuntimeError "unexpected
# pos ...", SafetensorError "I/O error ... (os error 28)").
FULL_DISK_BYTES = 1 << 20


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(temp_path)`` in the target's directory, then rename it to ``path``. A write that fails on a
    full disk raises OSError(ENOSPC) whatever the writer raised, so callers recognise it by its errno."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as error:
        # Asked before the temp file goes: its bytes may be what filled the disk.
        full = isinstance(error, Exception) and not is_disk_full_oserror(error) and disk_full(error, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, f"No space left on device ({type(error).__name__}: {error})", str(path)) from error
        raise


def is_disk_full_oserror(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error``, raised while writing into ``folder``, means the disk is full: an ENOSPC or EDQUOT
    OSError anywhere in its chain, a library's message with that errno, or (its writer said nothing
    more) less than FULL_DISK_BYTES left in ``folder``."""
    seen: BaseException | None = error
    while seen is not None:
        if is_disk_full_oserror(seen) or any(f"os error {code})" in str(seen) for code in DISK_FULL_ERRNOS):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


def replace_folder(path: str | Path, fill: Callable[[Path], None]) -> None:
    """``fill(staging)`` into a new folder beside ``path``, then that folder put in the place of ``path``
    (two renames: the old one aside, the new one in). Readers see the old folder whole or the new one,
    never a mix of the two; a crash while filling leaves the old one and no staging folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new"))
    try:
        fill(staging)
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide it from a cluster's other nodes
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        os.replace(path, old)  # onto the empty folder just made: rename(2) replaces an empty directory
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
