"""Start-up time of `dtlab` commands: this checkout against a git revision, in the same invocation.

    python tools/bench_startup.py --baseline 877c56c --runs 5

Each command runs `--runs` times in a fresh process per tree (the baseline is checked out in a temporary git
worktree and imported from it); the medians and their ratio are printed. Start-up is what `--help` costs: a
command that imports torch and Lightning for its help text pays seconds before it prints anything.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["--version"], ["plot", "--help"], ["evaluate", "--help"], ["fit", "--help"])
RUN = "import sys, dtlab; assert dtlab.__file__.startswith(sys.argv[1]), dtlab.__file__; from dtlab.cli import main; main(sys.argv[2:])"


def median_seconds(tree: Path, args: list[str], runs: int) -> float:
    """Median wall time of `dtlab ARGS` with dtlab imported from `tree` (its folder first on sys.path)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", RUN, str(tree), *args], cwd=tree, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if "AssertionError" in out.stderr:
            raise SystemExit(f"dtlab was not imported from {tree}: {out.stderr.strip().splitlines()[-1]}")
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="HEAD~1", help="git revision to compare with")
    p.add_argument("--runs", type=int, default=5, help="runs per command and tree (the median is reported)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtlab-baseline-") as tmp:
        baseline = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(baseline), args.baseline], check=True)
        try:
            for command in COMMANDS:
                before, now = median_seconds(baseline, command, args.runs), median_seconds(REPO, command, args.runs)
                print(f"dtlab {' '.join(command):<16} {args.baseline}: {before:5.2f} s   this tree: {now:5.2f} s   ({before / now:.1f}x)", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], check=True)


if __name__ == "__main__":
    main()
