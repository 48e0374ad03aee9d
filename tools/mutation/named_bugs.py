"""Inject the bugs that issue #12 named against the suite's once-weak tests, one at a time, and check each is caught.

    python tools/mutation/named_bugs.py

Each bug is a one-line patch of HEAD (in a detached worktree, as cosmic-ray's runs) and the test that is named
after the behaviour; the bug must make that test fail. Prints one line per bug and exits 1 if any survives.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]

# (what, file, original line fragment, bugged fragment, test selection)
BUGS = [
    (
        "DT windows: episodes drawn uniformly, not by length",
        "dtlab/data/samplers.py",
        "torch.multinomial(lengths.float(),",
        "torch.multinomial(torch.ones_like(lengths.float()),",
        ["tests/test_samplers.py", "-k", "windows_draw_episodes_by_length"],
    ),
    (
        "transitions: one index for the whole batch",
        "dtlab/data/samplers.py",
        "idx = torch.randint(len(self), (batch_size,), generator=generator)",
        "idx = torch.randint(len(self), (1,), generator=generator).expand(batch_size)",
        ["tests/test_samplers.py", "-k", "distinct_aligned_rows"],
    ),
    (
        "evaluation: every rank plays the same episodes",
        "dtlab/callbacks.py",
        "[rank::world_size]",
        "[0::world_size]",
        ["tests/test_evaluation.py", "-k", "split_across_ranks"],
    ),
    (
        "BC / TD3+BC actor: no tanh on the head",
        "dtlab/networks.py",
        "        return torch.tanh(self.net(observations))\n\n    def act",
        "        return self.net(observations)\n\n    def act",
        ["tests/test_losses.py", "-k", "policy_standardises"],
    ),
    (
        "TD3+BC target: bootstrapped from s, not s'",
        "dtlab/algos/td3bc.py",
        "next_obs = batch.next_observations",
        "next_obs = batch.observations",
        ["tests/test_losses.py", "-k", "td3bc_td_target"],
    ),
    (
        "Policy: observations centred but not scaled by std",
        "dtlab/policy.py",
        "return (observations - self.obs_mean) / self.obs_std",
        "return observations - self.obs_mean",
        ["tests/test_losses.py", "-k", "policy_standardises"],
    ),
    (
        "seeds as members: every member trains on the first seed's batches",
        "dtlab/data/module.py",
        "[self.seeded_batch(seed, update) for seed in self.members]",
        "[self.seeded_batch(self.members[0], update) for seed in self.members]",
        ["tests/test_members.py", "-k", "equals_the_single_seed_run_k and td3bc"],
    ),
    (
        "seeds as members: TD3+BC's target noise shared by every member",
        "dtlab/algos/members.py",
        "generator.manual_seed(stream_seed(seed, step))",
        "generator.manual_seed(stream_seed(seeds[0], step))",
        ["tests/test_members.py", "-k", "equals_the_single_seed_run_k and td3bc"],
    ),
]


def main() -> None:
    survived = 0
    with tempfile.TemporaryDirectory(prefix="dtlab-bugs-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), "HEAD"], cwd=ROOT, check=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            for what, file, original, bugged, tests in BUGS:
                path = tree / file
                source = path.read_text()
                if source.count(original) != 1:
                    sys.exit(f"{what}: '{original}' is not exactly once in {file}; update BUGS to the code")
                path.write_text(source.replace(original, bugged))
                try:
                    run = subprocess.run([*PYTEST, *tests], cwd=tree, env=env, capture_output=True, text=True, timeout=600)
                finally:
                    path.write_text(source)
                caught = run.returncode != 0
                survived += not caught
                print(f"{'caught  ' if caught else 'SURVIVED'} {what}  ({' '.join(tests)})", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
