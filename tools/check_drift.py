"""Dependency drift: what changes for a user who installs dtlab today without constraints.txt.

    python tools/check_drift.py                   # build a venv of the newest releases, list what differs from the lock, run QUICK tests
    python tools/check_drift.py --versions-only   # the table only, no tests
    python tools/check_drift.py --full            # the whole suite (as .ci/run) instead of QUICK
    python tools/check_drift.py --reuse -- tests/test_dt.py -k cache   # an existing drift venv, chosen tests
    python tools/check_drift.py --write-lock      # then rewrite constraints.txt from that venv (run the tests, commit)

The venv gets torch at the lock's version (the local CPU wheel where pip's find-links has it), then
`pip install -e ".[dev]"` with no constraints: the newest releases pyproject.toml's ranges allow. Not part of
CI (.ci/run): drift is news, not a failure of the change under test. Exits 1 when the tests fail.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "constraints.txt"
# the files whose subject rests most on outside releases: torch numerics, transformers' GPT-2, datasets/minari
# conversion, gymnasium rollouts (a few minutes on one core)
QUICK = ["tests/test_losses.py", "tests/test_dt.py", "tests/test_data.py", "tests/test_evaluation.py", "tests/test_samplers.py"]
HEADER = """\
# The exact releases CI tests (.ci/run) and the README's set-up installs: a pip constraints file, read as
#   pip install torch=={torch} && pip install -c constraints.txt -e ".[dev]"
# pyproject.toml keeps ranges (a library must not pin); this file pins the install we test.
# Made on Linux x86_64, Python 3.11, from a fresh venv (torch first, then -e ".[dev]", no constraints); it needs
# Python >= 3.11 (numpy, transformers and minari here do). torch's local label is dropped so that a CUDA {torch}
# satisfies it too. To regenerate, and see what changed:
#   python tools/check_drift.py --write-lock      (then run the tests and commit the file)
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(lines: list[str]) -> dict[str, tuple[str, str]]:
    """`name==version` lines (comments skipped, local labels such as +cpu dropped) -> {canonical name: (name, version)}."""
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = (name, version.split("+")[0])
    return pins


def build(venv: Path, torch_version: str) -> None:
    print(f"building {venv}: torch=={torch_version}, then the newest releases of the rest (a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, f"torch=={torch_version}"], check=True)
    subprocess.run([*pip, "-e", ".[dev]"], cwd=REPO, check=True)


def diff_table(locked: dict[str, tuple[str, str]], newest: dict[str, tuple[str, str]]) -> list[str]:
    rows = []
    for key in sorted(locked.keys() | newest.keys()):
        old, new = (pins[key][1] if key in pins else "-" for pins in (locked, newest))
        if old != new:
            rows.append(f"{(locked.get(key) or newest[key])[0]:<28} {old:>14} {new:>14}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1]
    )
    parser.add_argument("--venv", type=Path, default=Path("/tmp/dtlab-drift"), help="where to build the venv of the newest releases (default %(default)s)")
    parser.add_argument("--reuse", action="store_true", help="use the venv at --venv as it is instead of rebuilding it")
    parser.add_argument("--versions-only", action="store_true", help="print the version table and run no tests")
    parser.add_argument("--full", action="store_true", help="run the whole suite (python -m pytest -q -n 2) instead of the quick subset")
    parser.add_argument("--write-lock", action="store_true", help=f"rewrite {LOCK.name} from the venv's releases")
    parser.add_argument("pytest_args", nargs="*", help="tests to run instead of the quick subset (after --)")
    args = parser.parse_args()

    locked = parse_pins(LOCK.read_text().splitlines())
    python = args.venv / "bin" / "python"
    if not args.reuse:
        build(args.venv, locked["torch"][1])
    elif not python.exists():
        parser.error(f"--reuse: no venv at {args.venv}; run without --reuse to build one")
    freeze = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True, text=True).stdout.splitlines()
    newest = parse_pins(freeze)

    rows = diff_table(locked, newest)
    print(f"\n{len(rows)} of {len(locked.keys() | newest.keys())} packages differ from {LOCK.name} ('-': not installed)")
    if rows:
        print(f"{'package':<28} {'lock':>14} {'newest':>14}\n" + "\n".join(rows))
    if args.write_lock:
        LOCK.write_text(HEADER.format(torch=newest["torch"][1]) + "".join(line.split("+")[0] + "\n" for line in freeze))
        print(f"wrote {LOCK}")
    if args.versions_only:
        return 0

    tests = ["-n", "2"] if args.full else args.pytest_args or QUICK
    command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    print(f"\n$ {shlex.join(command)}", flush=True)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"MPLBACKEND": "Agg"}  # dtlab from this checkout, via the venv
    passed = subprocess.run(command, cwd=REPO, env=env).returncode == 0
    print(f"\ndrift check: tests {'passed' if passed else 'FAILED'} on the newest releases")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
