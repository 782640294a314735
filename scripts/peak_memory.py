"""Peak memory of a command and every process it starts (Ray's raylet and workers included), as
Linux accounts it. A measurement, not a test:

    python scripts/peak_memory.py -- python run_search.py --study sts

Every ``--every`` seconds it reads, for each process of the command's tree, VmRSS from
/proc/PID/status and Pss from /proc/PID/smaps_rollup (PSS counts a page shared by n processes as
1/n, so the sum over processes does not count shared libraries twice). It prints the peaks of the
largest process and of the sum, then exits with the command's exit status.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))  # fields[1]: the parent's pid
    return tree


def descendants(root: int) -> list[int]:
    tree, found, todo = children_of(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def kib(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    process = subprocess.Popen(command)
    largest = total_rss = total_pss = 0
    while process.poll() is None:
        pids = descendants(process.pid)
        rss = [kib(Path(f"/proc/{pid}/status"), "VmRSS:") for pid in pids]
        largest, total_rss = max(largest, max(rss, default=0)), max(total_rss, sum(rss))
        total_pss = max(total_pss, sum(kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss:") for pid in pids))
        time.sleep(args.every)
    gib = 1024 * 1024
    print(
        f"peak memory of {' '.join(command)!r} and its processes, sampled every {args.every:g} s: "
        f"largest process {largest / gib:.2f} GiB RSS; all together {total_rss / gib:.2f} GiB RSS, {total_pss / gib:.2f} GiB PSS",
        file=sys.stderr,
    )
    return process.returncode


if __name__ == "__main__":
    raise SystemExit(main())
