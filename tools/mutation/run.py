"""Mutation testing of dtlab's algorithm and data modules with cosmic-ray (docs/testing.md).

    python tools/mutation/run.py                       # every module in MODULES, a 25% sample of each
    python tools/mutation/run.py dtlab/algos/iql.py --fraction 1
    python tools/mutation/run.py --report              # the score and the survivors of the last runs

cosmic-ray edits the module in place, so each run works in a detached git worktree of HEAD (commit first:
uncommitted changes are not mutated). Sessions are kept in `--sessions` (one SQLite file per module), so a
stopped run resumes where it left off and `--report` reads them all.

Two kinds of mutant are not run:
- mutations inside annotations: every module has `from __future__ import annotations`, so annotations are
  strings that nothing evaluates (jsonargparse, which reads `__init__` signatures for the CLI, falls back to
  the default's type for one it cannot resolve: checked with a mutated `dict[str, Any] + None`);
- with `--fraction f < 1`, a uniform random sample (seeded) of the remaining mutants is run and the rest
  are marked "not sampled" (`--thin k` later keeps a seeded fraction k of a slow module's pending ones).
  The score is then an estimate; the report gives its 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

ROOT = Path(__file__).resolve().parents[2]
FAST = "python -m pytest -x -q -p no:cacheprovider"
VALUE_TESTS = "tests/test_losses.py tests/test_value_methods.py"
# module -> the tests that cover it (kept to the fast files: a mutant costs one run of these).
MODULES = {
    # the value tests first (seconds), then seeds as members, then the contract's budget, resume and checkpoint tests
    "dtlab/algos/base.py": (
        f"{FAST} {VALUE_TESTS} tests/test_members.py tests/test_contract.py tests/test_fast_path.py"
        " -k '(not test_contract and not test_fast_path) or fresh_process or trains_nothing or automatic_optimisation"
        " or runner or (resume_continues and (td3bc or iql or cql)) or (updates_are_the_unit and iql) or (two_process and td3bc)'"
    ),
    "dtlab/algos/actor_critic.py": f"{FAST} {VALUE_TESTS} tests/test_contract.py -k 'not test_contract or ((unit or ddp) and (td3bc or iql))'",
    "dtlab/algos/bc.py": f"{FAST} {VALUE_TESTS} -k bc",
    "dtlab/algos/td3bc.py": f"{FAST} {VALUE_TESTS} -k td3bc",
    "dtlab/algos/iql.py": f"{FAST} {VALUE_TESTS} tests/test_contract.py -k 'iql and (not test_contract or schedule)'",  # + the schedule warning
    "dtlab/algos/cql.py": f"{FAST} {VALUE_TESTS} -k 'cql'",
    # DT without its three end-to-end fits (CartPole, the conditioning slope, the CLI run): each takes 5-20 s
    "dtlab/algos/dt.py": f"{FAST} tests/test_dt.py tests/test_losses.py tests/test_fast_path.py -k '(dt or decision) and not cartpole and not rises and not config_runs'",
    "dtlab/data/samplers.py": f"{FAST} tests/test_samplers.py tests/test_trajectories.py tests/test_data.py",
    "dtlab/data/module.py": (
        f"{FAST} tests/test_samplers.py tests/test_trajectories.py tests/test_data.py tests/test_fast_path.py tests/test_reliability.py"
        " -k 'not test_reliability or impossible'"
    ),
    # with the Hub's dataset round trip (push-dataset, then training from hf:user/name; about 15 s)
    "dtlab/data/convert.py": (
        f"{FAST} tests/test_data.py tests/test_trajectories.py tests/test_reliability.py tests/test_hub.py -k 'not checkpoint and (not test_hub or dataset)'"
    ),
    "dtlab/data/recording.py": f"{FAST} tests/test_recording.py",
    "dtlab/data/paths.py": f"{FAST} tests/test_data.py tests/test_recording.py tests/test_reliability.py -k 'not checkpoint or staging or kill_during'",
    # what may run code when a file is loaded: hyperparameters and environments read as data
    "dtlab/checkpoints.py": (
        f"{FAST} tests/test_loading.py tests/test_safe_loading.py tests/test_reliability.py tests/test_members.py"
        " -k 'checkpoint or crafted or hyperparameters or tensor or newest or ordinary'"
    ),
    "dtlab/envs.py": (
        f"{FAST} tests/test_evaluation.py tests/test_safe_loading.py tests/test_reliability.py tests/test_online.py tests/test_cli.py"
        " -k 'test_evaluation or environment or crafted or transformers or nan or collector or video'"
    ),
}
NOT_SAMPLED = "not sampled"
ANNOTATION = "annotation"


def annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions (line 1-based, column 0-based) of every annotation in a module."""
    spans = []
    for node in ast.walk(ast.parse(path.read_text())):
        annotations = []
        if isinstance(node, ast.arg | ast.AnnAssign):
            annotations.append(node.annotation)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            annotations.append(node.returns)
        spans += [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in annotations if a is not None]
    return spans


def skip(db: WorkDB, job_id: str, why: str) -> None:
    db.set_result(job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=why))


def prepare(session: Path, module: str, fraction: float, seed: int, worktree: Path) -> None:
    spans = annotation_spans(worktree / module)
    with use_db(str(session)) as db:
        done = {job_id for job_id, _ in db.results}
        pending = []
        for item in db.work_items:
            if item.job_id in done:
                continue
            (mutation,) = item.mutations
            inside = any(start <= tuple(mutation.start_pos) and tuple(mutation.end_pos) <= end for start, end in spans)
            if inside:
                skip(db, item.job_id, ANNOTATION)
            else:
                pending.append(item.job_id)
        rng = random.Random(f"{seed}:{module}")
        for job_id in pending:
            if rng.random() >= fraction:
                skip(db, job_id, NOT_SAMPLED)


def run_module(module: str, sessions: Path, fraction: float, seed: int) -> None:
    session = session_path(sessions, module)
    with tempfile.TemporaryDirectory(prefix="dtlab-mutation-") as tmp:
        worktree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(worktree), "HEAD"], cwd=ROOT, check=True)
        try:
            config = Path(tmp) / "cosmic-ray.toml"
            config.write_text(
                f'[cosmic-ray]\nmodule-path = "{module}"\ntimeout = 300.0\nexcluded-modules = []\n'
                f'test-command = "{MODULES[module].replace(chr(34), chr(92) + chr(34))}"\n'
                '[cosmic-ray.distributor]\nname = "local"\n'
            )
            env = {**os.environ, "PYTHONPATH": str(worktree)}
            if not session.exists():
                subprocess.run(["cosmic-ray", "init", str(config), str(session)], cwd=worktree, env=env, check=True)
                prepare(session, module, fraction, seed, worktree)
            print(f"{module}: running the pending mutants of {session}", flush=True)
            subprocess.run(["cosmic-ray", "exec", str(config), str(session)], cwd=worktree, env=env, check=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)


def session_path(sessions: Path, module: str) -> Path:
    return sessions / (module.replace("/", "_").removesuffix(".py") + ".sqlite")


def forget_survivors(sessions: Path, modules: list[str]) -> None:
    for module in modules:
        session = session_path(sessions, module)
        if session.exists():
            with sqlite3.connect(session) as db:  # cosmic-ray stores the enum's name
                db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")


def thin_pending(sessions: Path, modules: list[str], keep: float, seed: int) -> None:
    """A smaller sample for slow modules: each pending mutant stays with probability `keep` (seeded)."""
    for module in modules:
        session = session_path(sessions, module)
        if not session.exists():
            continue
        with use_db(str(session), WorkDB.Mode.open) as db:
            rng = random.Random(f"thin:{seed}:{module}")
            for item in db.pending_work_items:
                if rng.random() >= keep:
                    skip(db, item.job_id, NOT_SAMPLED)


def wilson(killed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = killed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def report(sessions: Path) -> None:
    total_killed = total_run = 0
    survivors = []
    for session in sorted(sessions.glob("*.sqlite")):
        with use_db(str(session), WorkDB.Mode.open) as db:
            items = {item.job_id: item for item in db.work_items}
            results = dict(db.results)
        run = {j: r for j, r in results.items() if r.worker_outcome != WorkerOutcome.SKIPPED}
        killed = sum(r.test_outcome != TestOutcome.SURVIVED for r in run.values())
        annotations = sum(r.output == ANNOTATION for r in results.values())
        pending = len(items) - len(results)
        low, high = wilson(killed, len(run))
        name = session.stem
        print(
            f"{name:24s} {len(items):4d} mutants, {annotations:3d} in annotations, {len(run):4d} run"
            f"{f', {pending} pending' if pending else ''}: {killed:4d} killed = {killed / max(len(run), 1):6.1%}"
            f" (95% CI {low:.0%}–{high:.0%})"
        )
        total_killed += killed
        total_run += len(run)
        for job_id, result in run.items():
            if result.test_outcome == TestOutcome.SURVIVED:
                (mutation,) = items[job_id].mutations
                survivors.append((name, mutation.start_pos[0], mutation.operator_name, result.diff))
    low, high = wilson(total_killed, total_run)
    print(f"{'all':24s} {total_run:4d} run: {total_killed} killed = {total_killed / max(total_run, 1):.1%} (95% CI {low:.0%}–{high:.0%})")
    for name, line, operator, diff in survivors:
        changed = [d for d in (diff or "").splitlines() if d[:1] in "+-" and d[:3] not in ("+++", "---")]
        print(f"  survived {name}:{line} {operator}: {' / '.join(c.strip() for c in changed)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", default=list(MODULES), help="modules to mutate (default: all in MODULES)")
    parser.add_argument("--fraction", type=float, default=0.25, help="fraction of the non-annotation mutants to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--sessions", type=Path, default=Path("mutation-sessions"), help="folder of the SQLite sessions")
    parser.add_argument("--report", action="store_true", help="only print the score and survivors of the sessions")
    parser.add_argument("--thin", type=float, default=None, help="keep this fraction of the pending mutants (seeded), mark the rest not sampled")
    parser.add_argument("--rerun-survivors", action="store_true", help="run the survivors again (after adding tests; the module must be unchanged)")
    args = parser.parse_args(argv)
    args.sessions = args.sessions.resolve()
    if not args.report:
        unknown = [m for m in args.modules if m not in MODULES]
        if unknown:
            sys.exit(f"no test command for {unknown}: add the module to MODULES in {__file__}")
        args.sessions.mkdir(parents=True, exist_ok=True)
        if args.rerun_survivors:
            forget_survivors(args.sessions, args.modules)
        if args.thin is not None:
            thin_pending(args.sessions, args.modules, args.thin, args.seed)
        for module in args.modules:
            run_module(module, args.sessions, args.fraction, args.seed)
    report(args.sessions)


if __name__ == "__main__":
    main()
