"""Put the CS224N data files in place.

    python -m data.fetch --source ../shared/data      # copy from a local folder
    python -m data.fetch --download                   # from the public CS224N starter repository

Files go to --dest (default: $MINBERT_DATA, else ./datasets). Each file is written to a temp
file and renamed, so an interrupted fetch never leaves a half-written file behind.
"""

from __future__ import annotations

import argparse
import shutil
import urllib.request
from pathlib import Path

from data.atomic import atomic_write
from data.files import SPLITS, TASKS, resolve_data_dir

STARTER_REPO = "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project/main/data"


def data_file_names() -> list[str]:
    return [spec.path(split, ".").name for spec in TASKS.values() for split in SPLITS]


def place(dest: Path, name: str, write) -> None:
    """``write(binary_file)`` fills ``dest/name``, atomically."""

    def fill(tmp: str) -> None:
        with open(tmp, "wb") as out:
            write(out)

    atomic_write(dest / name, fill)


def fetch(dest: Path, source: Path | None = None, download: bool = False) -> list[str]:
    """Copy or download every data file into ``dest``; returns the names of files it could not get."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = []
    for name in data_file_names():
        if source is not None:
            if not (source / name).is_file():
                missing.append(name)
                continue
            with open(source / name, "rb") as src:
                place(dest, name, lambda out, src=src: shutil.copyfileobj(src, out))
        elif download:
            try:
                with urllib.request.urlopen(f"{STARTER_REPO}/{name}", timeout=60) as response:
                    place(dest, name, lambda out, r=response: shutil.copyfileobj(r, out))
            except OSError as err:
                print(f"could not download {name}: {err}")
                missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--source", type=Path, help="local folder holding the CS224N data files")
    group.add_argument("--download", action="store_true", help="download from the CS224N starter repository")
    parser.add_argument("--dest", type=Path, default=None, help="where to put them (default: $MINBERT_DATA or ./datasets)")
    args = parser.parse_args(argv)
    dest = resolve_data_dir(args.dest)
    if args.source is not None and args.source.resolve() == dest.resolve():
        print(f"{dest} already is the data directory")
        return 0
    missing = fetch(dest, args.source, args.download)
    print(f"data files in {dest}" + (f"; missing: {', '.join(missing)}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
