"""Ray's local processes die with the driver, however it dies: ``python -m search.reaper DRIVER_PID``.

A driver that ends normally shuts its local Ray cluster down. One killed with SIGKILL cannot: its
raylet and GCS go with it, but Ray's dashboard and runtime-env agents then wait up to a minute for
the dead GCS before they exit, and workers may linger. So while Ray runs, the driver keeps this small
process beside it (in its own session, so that a kill of the driver's process group spares it). It
notes the driver's descendants every half second. When its stdin closes without the driver having
written "done" first, the driver died: it kills those descendants that are still alive (the same
processes: their start times must match, since pids are reused).

A worker that starts after the reaper's last look is not among those: each trial's worker therefore also
asks the kernel to kill it when its parent (the raylet) dies (``die_with_parent``), rather than noticing
by itself, tens of seconds later, that its raylet is gone. A worker still starting (not yet in a trial)
has not asked yet: the driver's environment carries a mark (REAP_MARK, unique to the run) that every
Ray process inherits, and the reaper, once it has killed the processes it knew, also kills every
process that carries the mark, for a moment, as a dying raylet may still start one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

POLL_SECONDS = 0.5
PROC = Path("/proc")
DONE = b"done\n"
REAP_MARK = "MINBERT_REAP_MARK"  # environment variable: the run's mark, inherited by its Ray processes
SWEEP_SECONDS = 2.0  # how long after the driver's death marked processes are still looked for


@contextlib.contextmanager
def reaping() -> Iterator[None]:
    """While the block runs, this process's descendants are killed if it dies (Linux; elsewhere a no-op)."""
    if not PROC.is_dir():
        yield
        return
    mark, before = f"{os.getpid()}-{time.time_ns()}", os.environ.get(REAP_MARK)
    os.environ[REAP_MARK] = mark  # before Ray starts: its processes inherit the driver's environment
    reaper = subprocess.Popen(
        [sys.executable, "-m", "search.reaper", str(os.getpid()), mark],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            reaper.stdin.write(DONE)
            reaper.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            reaper.wait(timeout=5)
        if before is None:
            os.environ.pop(REAP_MARK, None)
        else:
            os.environ[REAP_MARK] = before


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process as soon as its parent dies (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # no libc to call: the reaper alone then
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def process_table() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time in clock ticks)} of every process, from /proc."""
    table = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of the descendants of ``root``, this reaper left out."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid != os.getpid() and pid not in found:
            found[pid] = table[pid][1]
            todo += children.get(pid, [])
    return found


def reap(known: dict[int, int]) -> None:
    """SIGKILL every process of ``known`` that is still the same process."""
    table = process_table()
    for pid, started in known.items():
        if table.get(pid, (0, None))[1] == started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def marked(mark: str) -> list[int]:
    """The processes, this reaper aside, whose environment holds REAP_MARK=``mark``."""
    needle = b"\0" + f"{REAP_MARK}={mark}".encode() + b"\0"
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in b"\0" + (entry / "environ").read_bytes() + b"\0":
                    found.append(int(entry.name))
    return found


def sweep(mark: str, seconds: float = SWEEP_SECONDS) -> None:
    """SIGKILL every process that carries ``mark``, again and again for ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        for pid in marked(mark):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            return
        time.sleep(0.1)


def watch(driver_pid: int, mark: str | None = None) -> None:
    said: list[bytes] = []
    ended = threading.Event()

    def read_stdin() -> None:
        said.append(sys.stdin.buffer.read())  # returns at EOF: the driver closed it, or died
        ended.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    known: dict[int, int] = {}
    while not ended.wait(POLL_SECONDS):
        known.update(descendants(driver_pid))
    if DONE not in b"".join(said):
        reap(known)
        if mark:
            sweep(mark)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
