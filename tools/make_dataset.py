"""Record episodes of a policy in a gymnasium environment into a local Minari dataset.

    # the embedded default (also built automatically on first use)
    python tools/make_dataset.py --embedded pendulum/scripted-v0
    # any policy: random, a scripted controller, a trained dtlab checkpoint, or a Python callable
    python tools/make_dataset.py --id pendulum/random-v0 --env Pendulum-v1 --policy random --episodes 100
    python tools/make_dataset.py --id halfcheetah/bc-v0 --env HalfCheetah-v5 --policy checkpoint:runs/bc/version_0/checkpoints/last.ckpt
    python tools/make_dataset.py --id cartpole/mine-v0 --env CartPole-v1 --policy mypkg.policies:balance

The dataset goes to MINARI_DATASETS_PATH (default ~/.minari/datasets) with reference returns for
normalised scores: the random policy's (measured) and --ref-max (default: the --expert policy's
measured return, else the recorded episodes' mean).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

import gymnasium as gym
import numpy as np

from dtlab.data.recording import EMBEDDED_DATASETS, PolicyAgent, cartpole_balance, pendulum_swingup, random_policy, record_dataset
from dtlab.envs import Agent

SCRIPTED = {"pendulum": pendulum_swingup, "cartpole": cartpole_balance}


def agent_factory(name: str, env_id: str, noise: float, seed: int) -> Callable[[int], Agent]:
    """'random' | 'scripted:<pendulum|cartpole>' | 'checkpoint:<path>' | '<module>:<callable obs -> action>'."""
    rng = np.random.default_rng(seed)
    if name == "random":
        env = gym.make(env_id)
        env.action_space.seed(seed)
        return lambda i: PolicyAgent(random_policy(env))
    kind, _, target = name.partition(":")
    if kind == "scripted":
        if target not in SCRIPTED:
            raise SystemExit(f"unknown scripted policy {target!r}; choose one of {sorted(SCRIPTED)}")
        return lambda i: PolicyAgent(SCRIPTED[target](noise, rng))
    if kind == "checkpoint":
        from dtlab.checkpoints import load_checkpoint

        model = load_checkpoint(target).eval()
        trained_on = (model.spec.env_spec or {}).get("id")
        if trained_on != env_id:
            raise SystemExit(f"--policy {name}: the model was trained on '{model.spec.dataset_id}' (env {trained_on}), not for --env {env_id}.")
        return lambda i: model.make_agent(1)
    if not target:
        raise SystemExit(f"--policy {name!r}: expected random, scripted:NAME, checkpoint:PATH or module:function")
    policy = getattr(importlib.import_module(kind), target)
    return lambda i: PolicyAgent(policy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedded", choices=sorted(EMBEDDED_DATASETS), help="build one of dtlab's embedded default datasets")
    parser.add_argument("--id", help="Minari dataset id to create, e.g. pendulum/mine-v0")
    parser.add_argument("--env", help="gymnasium environment id, e.g. Pendulum-v1")
    parser.add_argument("--policy", default="random", help="random | scripted:pendulum | scripted:cartpole | checkpoint:PATH | module:function")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.0, help="scripted policies: action noise std (pendulum) or random-action probability (cartpole)")
    parser.add_argument("--expert", default=None, help="policy (same syntax) whose return is the 100-point reference")
    parser.add_argument("--ref-min", type=float, default=None, help="random-policy return (default: measured)")
    parser.add_argument("--ref-max", type=float, default=None, help="expert return (default: --expert's, else the data's mean)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    if args.embedded:
        dataset = EMBEDDED_DATASETS[args.embedded](overwrite=args.overwrite)
    else:
        if not (args.id and args.env):
            parser.error("--id and --env are required (or --embedded)")
        expert = agent_factory(args.expert, args.env, 0.0, args.seed + 1) if args.expert else None
        dataset = record_dataset(
            args.id,
            args.env,
            agent_factory(args.policy, args.env, args.noise, args.seed),
            args.episodes,
            seed=args.seed,
            ref_min_score=args.ref_min,
            ref_max_score=args.ref_max,
            expert=(lambda: expert(0)) if expert else None,
            description=f"{args.policy} policy in {args.env}",
            algorithm_name=args.policy,
            overwrite=args.overwrite,
        )
    meta = dataset.storage.metadata
    print(
        f"{meta['dataset_id']}: {meta['total_episodes']} episodes, {meta['total_steps']} steps, refs random {meta['ref_min_score']:.1f} / expert {meta['ref_max_score']:.1f}"
    )


if __name__ == "__main__":
    main()
