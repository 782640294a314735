"""One driver per study: a lease with a heartbeat, kept in the Optuna storage itself.

Two drivers running the same study (a ``--resume`` while the first still runs, on this machine or
another one sharing the PostgreSQL storage) would both sample trials and overrun the budget. The
driver that runs a study therefore holds a lease: the study user attribute ``driver_lease`` =
{host, machine, pid, token, beat (UNIX time), interval}. A background thread rewrites ``beat`` every
``interval`` seconds. Another driver refuses to run while the lease is live, naming its holder.

A lease is stale, and can be taken over, when its holder missed ``MISSED_BEATS`` beats (a driver
killed with SIGKILL, a machine that died), or at once when its holder ran on this machine and its
process no longer exists. "This machine" is the host name and ``machine``: the boot id and the PID
namespace, since containers may share a host name while each has its own pids. Staleness compares
the writer's clock with the reader's, so machines sharing a study need clocks that agree within a
few beats (NTP).

Taking, renewing and releasing the lease are each a compare-and-set in one transaction of the
storage's database (search.adapters.swap_study_user_attr): the new record is written only if the
record read just before is still there, so two drivers never both hold it.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from search.adapters import read_study_user_attr, swap_study_user_attr

logger = logging.getLogger(__name__)

LEASE_ATTR = "driver_lease"
BEAT_SECONDS = 10.0
MISSED_BEATS = 3


class LeaseError(RuntimeError):
    """Another live driver holds the study; the message names it."""


@functools.cache
def machine_id() -> str:
    """What tells apart machines that share a host name: the boot id and the PID namespace (a container's
    own). Empty where /proc has neither; a lease without it is then judged by its heartbeat alone."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(f"pidns:{os.stat('/proc/self/ns/pid').st_ino}")
    return "/".join(parts)


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    token: str
    beat: float
    interval: float
    machine: str = ""  # machine_id() of the holder; "" in leases written before it was recorded

    @classmethod
    def from_attr(cls, value: Any) -> Holder | None:
        if not isinstance(value, dict) or not value.get("token"):
            return None  # never held, or released
        return cls(
            str(value["host"]),
            int(value["pid"]),
            str(value["token"]),
            float(value["beat"]),
            float(value["interval"]),
            str(value.get("machine", "")),
        )

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.beat

    def is_live(self, now: float | None = None) -> bool:
        on_this_machine = self.host == socket.gethostname() and self.machine == machine_id()
        if on_this_machine and not process_exists(self.pid):
            return False  # its process is gone: no need to wait for the beats to run out
        return self.age(now) <= MISSED_BEATS * self.interval

    def describe(self) -> str:
        return f"driver pid {self.pid} on {self.host} (last heartbeat {max(0.0, self.age()):.0f} s ago)"


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def current_holder(study: optuna.Study) -> Holder | None:
    """The live holder of the study's lease, or None when it is free or stale."""
    holder = Holder.from_attr(study.user_attrs.get(LEASE_ATTR))
    return holder if holder is not None and holder.is_live() else None


def refuse_if_held(study: optuna.Study, what: str) -> None:
    """LeaseError when another live driver holds the study (``what``: the refused action, for the message)."""
    holder = current_holder(study)
    if holder is not None:
        raise held_error(study.study_name, holder, what)


def held_error(study_name: str, holder: Holder, what: str) -> LeaseError:
    return LeaseError(
        f"study {study_name!r} is being run by {holder.describe()}; refusing to {what}. "
        f"Wait for it to end, or stop it (Ctrl-C or SIGTERM); a killed driver's lease expires "
        f"{MISSED_BEATS * holder.interval:.0f} s after its last heartbeat."
    )


class DriverLease:
    """Context manager: hold the study's lease while the block runs, refreshing it in a thread.

    If another driver takes the lease over (ours went stale, e.g. this process was suspended), the
    heartbeat thread interrupts the main thread as Ctrl-C would, so that this driver stops cleanly."""

    def __init__(self, study_name: str, storage: optuna.storages.RDBStorage, interval: float = BEAT_SECONDS) -> None:
        self.storage, self.interval = storage, interval
        self.study = optuna.load_study(study_name=study_name, storage=storage)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "machine": machine_id(),
            "pid": os.getpid(),
            "token": self.token,
            "beat": time.time(),
            "interval": self.interval,
        }

    def _read(self) -> tuple[str | None, Holder | None]:
        """The lease's stored text (what a compare-and-set compares) and its holder."""
        text = read_study_user_attr(self.storage, self.study.study_name, LEASE_ATTR)
        return text, Holder.from_attr(None if text is None else json.loads(text))

    def _swap(self, expected: str | None, value: dict) -> bool:
        return swap_study_user_attr(self.storage, self.study.study_name, LEASE_ATTR, expected, value) is not None

    def acquire(self) -> None:
        text, holder = self._read()
        if holder is not None and holder.is_live():
            raise held_error(self.study.study_name, holder, "run it")
        if not self._swap(text, self._record()):  # another driver wrote the lease since we read it
            _, holder = self._read()
            raise LeaseError(
                f"study {self.study.study_name!r}: another driver took it at the same moment"
                + (f" ({holder.describe()})" if holder else "")
            )
        self._thread = threading.Thread(target=self._beat, name="study-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                text, holder = self._read()
                # Renewed only if still ours, unchanged since this read.
                if holder is not None and holder.token == self.token and self._swap(text, self._record()):
                    continue
                _, holder = self._read()
                if holder is None or holder.token != self.token:
                    self.lost = True
                    logger.error(
                        "another driver took over study %r: %s; stopping this one",
                        self.study.study_name,
                        holder.describe() if holder else "the lease was released",
                    )
                    _thread.interrupt_main(signal.SIGINT)
                    return
            except Exception as error:  # a storage hiccup: try again at the next beat
                logger.warning("could not refresh the lease of study %r: %s", self.study.study_name, error)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            text, holder = self._read()
            if holder is not None and holder.token == self.token:
                self._swap(text, {"released": time.time()})
        except Exception as error:  # the lease then expires by itself
            logger.warning("could not release the lease of study %r: %s", self.study.study_name, error)

    def __enter__(self) -> DriverLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
