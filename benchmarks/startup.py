"""How long `capfilt` takes to answer the commands that load no model, each run as a new process.

    python benchmarks/startup.py [--repeats 7]

Runs `capfilt --help`, `--version`, `presets`, `show` and `summary` of a small output, and an argument error,
several times each, and prints the median, fastest and slowest wall time of each. The small output is made
first by a `bootstrap --preset demo` of the bundled example (not timed). Plain `python -c pass` is timed too,
as the floor any command starts from.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The console script as a user runs it, else the module.
SCRIPT = Path(sys.executable).parent / "capfilt"
CAPFILT = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "capfilt"]


def timed(command: list[str], repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` runs of `command` (one untimed run first, to warm the file cache)."""
    subprocess.run(command, check=False, capture_output=True, cwd=ROOT)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=False, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each command")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="capfilt-startup-"))
    try:
        output = workdir / "shapes"
        made = subprocess.run([*CAPFILT, "bootstrap", "examples/shapes", str(output), "--preset", "demo", "--quiet"],
                              check=False, capture_output=True, text=True, cwd=ROOT)
        if made.returncode != 0:
            sys.exit(f"could not make the small output to show: {made.stderr}")
        commands = {
            "python -c pass (the floor)": [sys.executable, "-c", "pass"],
            "capfilt --help": [*CAPFILT, "--help"],
            "capfilt --version": [*CAPFILT, "--version"],
            "capfilt presets": [*CAPFILT, "presets"],
            "capfilt show OUTPUT": [*CAPFILT, "show", str(output)],
            "capfilt summary OUTPUT": [*CAPFILT, "summary", str(output)],
            "capfilt bootstrap IN OUT --top-p 0 (argument error)": [*CAPFILT, "bootstrap", "IN", "OUT", "--top-p", "0"],
        }
        print(f"{'command':55} {'median':>8} {'min':>8} {'max':>8}   ({args.repeats} runs each)")
        for name, command in commands.items():
            times = timed(command, args.repeats)
            print(f"{name:55} {statistics.median(times):7.3f}s {min(times):7.3f}s {max(times):7.3f}s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
