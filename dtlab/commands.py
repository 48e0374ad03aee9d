"""dtlab's subcommands besides `fit`: typed functions that jsonargparse turns into `dtlab <name>` (cli.py).

    dtlab make-dataset --dataset_id pendulum/random-v0 --env Pendulum-v1 --policy random --expert scripted:pendulum
    dtlab evaluate runs/iql/version_0/checkpoints/last.ckpt --episodes 20 --json true
    dtlab plot runs/iql runs/td3bc --out curves.png

Each function's docstring is its `--help`; its signature is its options.
"""

# No `from __future__ import annotations` here: jsonargparse evaluates postponed annotations with the module's
# TYPE_CHECKING imports executed, which would import dtlab.envs (torch, gymnasium) for every `dtlab <command> --help`.

import importlib
import inspect
import json as jsonlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # each command imports what it runs: `dtlab <command> --help` imports no torch
    import gymnasium as gym

    from dtlab.algos import OfflineRLModule
    from dtlab.data.recording import Policy
    from dtlab.envs import Agent


class UsageError(ValueError):
    """A command's options do not fit together or name something that does not exist: printed as one line."""


def trust(env_entry_point: str | None) -> None:
    """--env_entry_point: the one entry point the user allows environments to be built from (dtlab.envs)."""
    if env_entry_point:
        from dtlab.envs import trust_entry_point

        trust_entry_point(env_entry_point)


POLICY_SYNTAX = "random | scripted:pendulum | scripted:cartpole | checkpoint:PATH | module:function"


def build_env(env_id: str) -> "gym.Env":
    """`--env` as a gymnasium environment, or one line saying why it cannot be built."""
    import gymnasium as gym

    try:
        return gym.make(env_id)
    except Exception as err:  # an unknown id, an entry point that does not import, a missing optional dependency, ...
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise UsageError(
            f"--env {env_id}: cannot be built ({reason}). Give a registered gymnasium id such as Pendulum-v1, or install the package "
            "that provides it (MuJoCo tasks: pip install 'gymnasium[mujoco]')."
        ) from None


def user_policy(policy: str, option: str = "--policy") -> "Policy":
    """The function of a `module:function` policy string, or one line saying what is missing."""
    module_name, _, name = policy.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"{option} {policy}: module {module_name!r} cannot be imported ({err}); put it on PYTHONPATH, or use {POLICY_SYNTAX}.") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UsageError(f"{option} {policy}: module {module_name!r} has no function {name!r} (observation -> action); check the name after ':'.")
    return function


def agent_factory(policy: str, env_id: str, noise: float, seed: int, option: str = "--policy") -> Callable[[int], "Agent"]:
    """The agent of one policy string (`option`'s value, see POLICY_SYNTAX), per episode index."""
    from dtlab.data.recording import SCRIPTED, PolicyAgent, random_policy

    rng = np.random.default_rng(seed)
    if policy == "random":
        env = build_env(env_id)
        env.action_space.seed(seed)
        return lambda i: PolicyAgent(random_policy(env))
    kind, _, target = policy.partition(":")
    if kind == "scripted":
        if target not in SCRIPTED:
            raise UsageError(f"{option} {policy}: unknown scripted policy {target!r}; choose one of {sorted(SCRIPTED)}.")
        return lambda i: PolicyAgent(SCRIPTED[target](noise, rng))
    if kind == "checkpoint":
        from dtlab.checkpoints import load_checkpoint

        model = load_checkpoint(target).eval()
        trained_on = (model.spec.env_spec or {}).get("id")
        if trained_on != env_id:
            raise UsageError(f"{option} {policy}: the model was trained on '{model.spec.dataset_id}' (env {trained_on}), not for --env {env_id}.")
        return lambda i: model.make_agent(1)
    if not target:
        raise UsageError(f"{option} {policy!r}: expected {POLICY_SYNTAX}.")
    function = user_policy(policy, option)
    return lambda i: PolicyAgent(function)


def make_dataset(
    dataset_id: str | None = None,
    env: str | None = None,
    policy: str = "random",
    episodes: int = 100,
    noise: float = 0.0,
    expert: str | None = None,
    ref_min: float | None = None,
    ref_max: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    embedded: str | None = None,
) -> None:
    """Record episodes of a policy in a gymnasium environment into a local Minari dataset.

    The dataset goes to MINARI_DATASETS_PATH (default ~/.minari/datasets) with reference returns for
    normalised scores. Examples:

        dtlab make-dataset --embedded pendulum/mixed-v0       # an embedded default (also built on first use)
        dtlab make-dataset --dataset_id pendulum/random-v0 --env Pendulum-v1 --policy random --expert scripted:pendulum
        dtlab make-dataset --dataset_id halfcheetah/bc-v0 --env HalfCheetah-v5 --policy checkpoint:runs/bc/version_0/checkpoints/last.ckpt
        dtlab make-dataset --dataset_id cartpole/mine-v0 --env CartPole-v1 --policy mypkg.policies:balance

    Args:
        dataset_id: Minari id of the dataset to create, e.g. pendulum/mine-v0.
        env: gymnasium environment id, e.g. Pendulum-v1.
        policy: who acts: random | scripted:pendulum | scripted:cartpole | checkpoint:PATH (a dtlab checkpoint) | module:function (obs -> action).
        episodes: episodes to record.
        noise: scripted policies: action noise std (pendulum) or random-action probability (cartpole).
        expert: a policy (same syntax) whose mean return is the 100-point reference.
        ref_min: the 0-point reference return (default: the random policy's, measured).
        ref_max: the 100-point reference return (default: --expert's, else the recorded episodes' mean; --policy random needs one of the two).
        seed: seed of the episodes' resets and of the policies' noise.
        overwrite: replace a dataset of the same id.
        embedded: build one of dtlab's embedded datasets instead: pendulum/mixed-v0 (the default data) or pendulum/scripted-v0.
    """
    from dtlab.data.recording import EMBEDDED_DATASETS, record_dataset

    if embedded is not None:
        if embedded not in EMBEDDED_DATASETS:
            raise UsageError(f"--embedded {embedded}: dtlab embeds {sorted(EMBEDDED_DATASETS)}.")
        dataset = EMBEDDED_DATASETS[embedded](overwrite=overwrite)
    else:
        if not (dataset_id and env):
            raise UsageError("make-dataset needs --dataset_id and --env (or --embedded NAME); see dtlab make-dataset --help.")
        from minari.dataset.minari_dataset import parse_dataset_id

        try:
            parse_dataset_id(dataset_id)
        except ValueError as err:  # before anything is recorded
            raise UsageError(f"--dataset_id {dataset_id}: {err}") from None
        build_env(env).close()  # before any policy is loaded or episode recorded
        if policy == "random" and expert is None and ref_max is None:  # the data's mean would be the random 0 point too
            raise UsageError(
                "make-dataset --policy random needs --expert POLICY or --ref_max RETURN: the default 100-point reference, the recorded "
                "episodes' mean, would be the random policy's own return, so normalised scores would be meaningless."
            )
        expert_agents = agent_factory(expert, env, 0.0, seed + 1, "--expert") if expert else None
        dataset = record_dataset(
            dataset_id,
            env,
            agent_factory(policy, env, noise, seed),
            episodes,
            seed=seed,
            ref_min_score=ref_min,
            ref_max_score=ref_max,
            expert=(lambda: expert_agents(0)) if expert_agents else None,
            description=f"{policy} policy in {env}",
            algorithm_name=policy,
            overwrite=overwrite,
        )
    meta = dataset.storage.metadata
    own_mean = embedded is None and expert is None and ref_max is None
    print(
        f"{meta['dataset_id']}: {meta['total_episodes']} episodes, {meta['total_steps']} steps, "
        f"reference returns: random {meta['ref_min_score']:.1f}, expert {meta['ref_max_score']:.1f}"
        + (" (the recorded episodes' own mean, so they score 100: --expert or --ref_max give a real expert)" if own_mean else "")
    )


def evaluate(
    checkpoint: str,
    episodes: int = 10,
    seed: int = 0,
    target_return: list[float] | None = None,
    json: bool = False,
    video: str | None = None,
    threads: int = 1,
    env_entry_point: str | None = None,
) -> dict:
    """Score a trained model in its dataset's environment; the checkpoint alone is enough (no dataset needed).

        dtlab evaluate runs/iql/version_0/checkpoints/last.ckpt --episodes 20
        dtlab evaluate runs/dt/version_0/checkpoints/last.ckpt --target_return '[-600, -300, -150]' --json true
        MUJOCO_GL=egl dtlab evaluate runs/iql/version_0/checkpoints/last.ckpt --video iql.mp4

    Args:
        checkpoint: a dtlab checkpoint (.ckpt, e.g. runs/<algo>/version_N/checkpoints/last.ckpt), a model folder
            (dtlab save / save_pretrained) or a HuggingFace Hub repo id (user/name).
        episodes: episodes to run (per target return for a Decision Transformer).
        seed: episode i is reset with seed + i.
        target_return: Decision Transformer: the target returns to condition on (default: its eval_targets).
        json: print one JSON object (returns, means, normalised scores) instead of text.
        video: also record the first episode to this file (.mp4 or .gif; needs `pip install 'dtlab[video]'`).
        threads: torch CPU threads.
        env_entry_point: build the environment from this entry point (module:Class) when its id is not in gymnasium's
            registry; an entry point stored in the checkpoint is never imported unless named here.
    """
    import torch

    from dtlab.callbacks import evaluate_returns, return_summary
    from dtlab.hub import load_model

    torch.set_num_threads(threads)
    trust(env_entry_point)
    model = load_model(checkpoint)
    spec = model.spec
    targets = getattr(model, "eval_targets", None)
    if target_return is not None:
        if targets is None:
            raise UsageError(f"--target_return: {type(model).__name__} is not return-conditioned; only a DecisionTransformer takes targets.")
        targets = list(target_return)
    seeds = list(range(seed, seed + episodes))
    start = time.perf_counter()
    returns = evaluate_returns(model, seeds, targets, progress=not json and sys.stderr.isatty())
    rows = returns.reshape(-1, episodes)
    result = {
        "checkpoint": str(checkpoint),
        "algorithm": type(model).__name__,
        "dataset_id": spec.dataset_id,
        "env_id": (spec.env_spec or {}).get("id"),
        "episodes": episodes,
        "seeds": seeds,
        "results": [],
        "seconds": round(time.perf_counter() - start, 2),
    }
    for i, row in enumerate(rows):
        entry = {"returns": row.tolist()} | return_summary(row, spec)
        if targets is not None:
            entry = {"target_return": float(targets[i]), **entry}
        if model.member_seeds is not None:  # seeds as members: one row per member, each on the same episode seeds
            entry = {"member_seed": model.member_seeds[i], **entry}
        result["results"].append(entry)
    if video is not None:
        from dtlab.envs import record_video

        result["video"] = str(record_video(model, video, seed))
    if json:
        print(jsonlib.dumps(result))
    else:
        for entry in result["results"]:
            head = f"target {entry['target_return']:g}: " if "target_return" in entry else ""
            head = f"member seed {entry['member_seed']}: " if "member_seed" in entry else head
            line = f"{spec.dataset_id}: {head}return {entry['return_mean']:.1f} ± {entry['return_std']:.1f} over {episodes} episodes"
            if "normalized_score_mean" in entry:
                line += f", normalised score {entry['normalized_score_mean']:.1f} ± {entry['normalized_score_std']:.1f}"
            print(line)
        if video is not None:
            print(f"video of the first episode: {result['video']}")
    return result


def plot(runs: list[str], out: str | None = None, labels: list[str] | None = None, table: bool = False) -> None:
    """Learning curves of one or many runs from their metrics.csv: the evaluation score (normalised where the
    data has references, else the return) and every training loss, against updates. Runs that share a name
    (runs/<name>/version_N: several seeds of one config) are drawn as their mean with a ± std band.

        dtlab plot runs/iql                       # every version of runs/iql, as seeds: learning_curves.png
        dtlab plot runs/iql runs/td3bc --out compare.png
        dtlab plot runs/iql/version_0 --labels '[IQL seed 0]'
        dtlab plot runs_on_0/iql/version_0 runs_on_1/iql/version_0 --labels '[IQL online]' --table

    Args:
        runs: run folders (runs/<name>/version_N), folders of versions (runs/<name>), or metrics.csv files.
        out: the PNG to write (default: learning_curves.png; with --table, no plot unless --out is given).
        labels: legend labels, one per group (default: the run names).
        table: print each group's score at every evaluation its runs share (mean ± std and each run's;
            online runs with the env steps collected by then) as a markdown table.
    """
    from dtlab.plots import find_metrics, plot_learning_curves, score_table

    groups = find_metrics(runs)
    if labels is not None:
        if len(labels) != len(groups):
            raise UsageError(f"--labels: {len(labels)} labels for {len(groups)} groups of runs ({', '.join(groups)}).")
        groups = dict(zip(labels, groups.values()))
    if table:
        try:
            scores = score_table(groups)
        except ValueError as err:
            raise UsageError(f"--table: {err}") from None
    if out is not None or not table:
        path = plot_learning_curves(groups, out or "learning_curves.png")
        described = [f"{name} ({len(files)} run{'s' if len(files) > 1 else ''})" for name, files in groups.items()]
        print(f"{path}: {', '.join(described)}")
    if table:
        print(scores)


def member(checkpoint: str, out: str | None = None, seed: int | None = None) -> list[Path]:
    """Split a checkpoint of seeds as members (`--model.init_args.seeds`) into ordinary single-seed checkpoints,
    OUT/seed_<s>.ckpt: each is what the single-seed run with that seed would have saved (parameters, optimiser
    state, update count), so evaluate, save, push, export, --pretrained and --ckpt_path take it like any other.

        dtlab member runs/iql/version_0/checkpoints/last.ckpt --out members/         # every member
        dtlab member runs/iql/version_0/checkpoints/last.ckpt --out members/ --seed 3

    Args:
        checkpoint: a dtlab checkpoint of a model with seeds as members.
        out: the folder to write seed_<s>.ckpt into.
        seed: only the member of this seed (default: every member).
    """
    from dtlab.checkpoints import AtomicCheckpointIO, member_checkpoint, read_checkpoint

    if out is None:
        raise UsageError("member needs --out FOLDER, where seed_<s>.ckpt are written.")
    saved = read_checkpoint(checkpoint)
    seeds = saved.get("hyper_parameters", {}).get("seeds")
    if seeds is None:
        raise UsageError(f"{checkpoint} holds one seed (it was not trained with --model.init_args.seeds): use it as it is.")
    if seed is not None and seed not in seeds:
        raise UsageError(f"--seed {seed}: {checkpoint} holds the members of seeds {seeds}.")
    written = []
    for index, member_seed in enumerate(seeds):
        if seed is None or member_seed == seed:
            path = Path(out) / f"seed_{member_seed}.ckpt"
            AtomicCheckpointIO().save_checkpoint(member_checkpoint(saved, index), path)
            written.append(path)
    print("\n".join(f"{p}: member seed {p.stem.removeprefix('seed_')}" for p in written))
    return written


def _run_dir(checkpoint: str) -> Path | None:
    """runs/<name>/version_N of a checkpoint in its run's checkpoints/ folder (its plots and config go along)."""
    path = Path(checkpoint)
    return path.parent.parent if path.is_file() and path.parent.name == "checkpoints" else None


def save(
    checkpoint: str,
    out: str | None = None,
    eval_episodes: int = 0,
    seed: int = 0,
    video: bool = False,
    env_entry_point: str | None = None,
    ope_updates: int = 0,
) -> None:
    """Write a trained model as a folder: model.safetensors (tensors only), config.json (algorithm, hyperparameters,
    spaces, observation statistics, references, env and dataset ids) and a model card (README.md), plus the run's
    plots and config. `dtlab evaluate OUT`, `dtlab.from_pretrained(OUT)` and `dtlab push` read it.

        dtlab save runs/iql/version_0/checkpoints/last.ckpt --out models/iql-halfcheetah --eval_episodes 10
        dtlab save runs/iql/version_0/checkpoints/best.ckpt --out models/iql-clinic --ope_updates 20000   # data with no env

    Args:
        checkpoint: a dtlab checkpoint (.ckpt) or a model folder.
        out: the folder to write.
        eval_episodes: evaluate over this many episodes first and put the result in the card (0: no evaluation).
        seed: episode i of the evaluation is reset with seed + i.
        video: add replay.mp4, one greedy episode rendered offscreen (needs `pip install 'dtlab[video]'`).
        env_entry_point: as for `dtlab evaluate`: the only entry point (module:Class) an unregistered environment may be built from.
        ope_updates: also estimate the policy's value from its training data alone by FQE (this many updates; 0: none),
            shown in the card as an estimate: the score of a model whose data has no environment (`dtlab ope`).
    """
    from dtlab.hub import load_model, save_pretrained

    if out is None:
        raise UsageError("save needs --out FOLDER, the model folder to write.")
    trust(env_entry_point)
    model = load_model(checkpoint)
    evaluation, ope = _card_evaluations(model, eval_episodes, ope_updates, seed)
    path = save_pretrained(model, out, evaluation, _run_dir(checkpoint), video=video, ope=ope)
    print(f"{path}: {', '.join(sorted(p.name for p in path.iterdir()))}")


def _card_evaluations(
    model: "OfflineRLModule", eval_episodes: int, ope_updates: int, seed: int, before: Callable[[], Any] | None = None
) -> tuple[dict | None, dict | None]:
    """What `save` and `push` put in the card: rollouts in the environment and/or an FQE estimate from the data.
    Bad options are refused first; `before` (push: the Hub's token check) runs after them, before any evaluation."""
    from dtlab.hub import estimate_for_card, evaluate_for_card

    if eval_episodes < 0 or ope_updates < 0:
        raise UsageError(f"--eval_episodes and --ope_updates must be >= 0, got {eval_episodes} and {ope_updates}.")
    if eval_episodes > 0 and model.spec.env_spec is None:
        raise UsageError(
            f"--eval_episodes {eval_episodes}: the model's data ('{model.spec.dataset_id}') names no environment to evaluate in; "
            "use --eval_episodes 0, and --ope_updates N for an off-policy (FQE) estimate from the data."
        )
    if before is not None:
        before()
    ope = estimate_for_card(model, ope_updates, seed=seed) if ope_updates > 0 else None  # first: it refuses a DT at once
    evaluation = evaluate_for_card(model, eval_episodes, seed) if eval_episodes > 0 else None
    return evaluation, ope


def push(
    checkpoint: str,
    repo_id: str | None = None,
    private: bool = False,
    eval_episodes: int | None = None,
    seed: int = 0,
    token: str | None = None,
    video: bool = False,
    env_entry_point: str | None = None,
    ope_updates: int = 0,
) -> None:
    """Upload a trained model to the HuggingFace Hub: the folder `dtlab save` writes, with the evaluation in the card's
    model-index. The token comes from --token, HF_TOKEN or `hf auth login`; it is checked with the Hub (HF_ENDPOINT)
    before the evaluation starts.

        dtlab push runs/iql/version_0/checkpoints/last.ckpt --repo_id you/iql-halfcheetah-medium --eval_episodes 10
        dtlab push runs/iql/version_0/checkpoints/best.ckpt --repo_id you/iql-clinic --ope_updates 20000   # data with no env

    Args:
        checkpoint: a dtlab checkpoint (.ckpt) or a model folder.
        repo_id: the Hub model repo, user/name (created if it does not exist).
        private: create the repo private.
        eval_episodes: evaluate over this many episodes before uploading, for the card (0: no evaluation; default:
            10 where the model's data names an environment, else 0).
        seed: episode i of the evaluation is reset with seed + i.
        token: a HuggingFace token with write access (default: the logged-in one).
        video: add replay.mp4, one greedy episode rendered offscreen, to the card (needs `pip install 'dtlab[video]'`).
        env_entry_point: as for `dtlab evaluate`: the only entry point (module:Class) an unregistered environment may be built from.
        ope_updates: also estimate the policy's value from its training data alone by FQE (this many updates; 0: none),
            shown in the card as an estimate: the score of a model whose data has no environment (`dtlab ope`).
    """
    from dtlab.hub import hub_user, load_model, push_to_hub

    if repo_id is None or repo_id.count("/") != 1:
        raise UsageError(f"push needs --repo_id USER/NAME (got {repo_id}).")
    trust(env_entry_point)
    model = load_model(checkpoint)
    if eval_episodes is None:
        eval_episodes = 10 if model.spec.env_spec is not None else 0
    # a missing or refused token, or no network, is found before minutes of evaluation
    evaluation, ope = _card_evaluations(model, eval_episodes, ope_updates, seed, before=lambda: hub_user(token))
    url = push_to_hub(model, repo_id, private=private, token=token, evaluation=evaluation, run_dir=_run_dir(checkpoint), video=video, ope=ope)
    scores = []
    if evaluation is not None:
        scores.append(f"evaluated: return {evaluation['return_mean']:.1f}")
        if "normalized_score_mean" in evaluation:
            scores.append(f"normalised score {evaluation['normalized_score_mean']:.1f}")
    if ope is not None:
        scores.append(f"FQE estimate: return {ope['return']:.1f}" + (f", normalised score {ope['normalized_score']:.1f}" if "normalized_score" in ope else ""))
    summary = f" ({'; '.join(scores)})" if scores else ""
    print(f"pushed {type(model).__name__} to {repo_id}{summary}: {url}")


def export(checkpoint: str, out: str | None = None, format: str = "onnx") -> None:
    """Write a trained policy as a file that acts without dtlab: normalisation and action scaling inside, greedy actions.
    Stateless policies map observations (N, obs_dim) to actions (N, act_dim); a Decision Transformer exports its
    context-window policy (observations, actions, returns_to_go, timesteps, mask -> the last step's action).

        dtlab export runs/iql/version_0/checkpoints/last.ckpt --out iql.onnx                      # onnxruntime
        dtlab export runs/iql/version_0/checkpoints/last.ckpt --out iql.pt --format torchscript   # torch.jit.load
        dtlab export runs/dt/version_0/checkpoints/last.ckpt --out dt-hf --format transformers    # DecisionTransformerModel

    Args:
        checkpoint: a dtlab checkpoint (.ckpt), a model folder or a Hub repo id.
        out: the file (or, for transformers, folder) to write (default: policy.onnx / policy.pt / policy-transformers).
        format: onnx (needs `pip install 'dtlab[export]'`), torchscript, or transformers (a continuous-action
            Decision Transformer as a transformers.DecisionTransformerModel folder; normalisation in its config.json).
    """
    from dtlab.export import export_policy, to_transformers
    from dtlab.hub import load_model

    if format not in ("onnx", "torchscript", "transformers"):
        raise UsageError(f"--format {format}: choose onnx, torchscript or transformers.")
    if format == "transformers":
        model = load_model(checkpoint)
        try:
            path = to_transformers(model, out or "policy-transformers")
        except ValueError as err:
            raise UsageError(str(err)) from None
        print(f"{path}: {type(model).__name__} as a transformers DecisionTransformerModel folder")
        return
    if format == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
        except ImportError as err:
            raise UsageError("--format onnx needs onnx and onnxscript: pip install 'dtlab[export]'.") from err
    model = load_model(checkpoint)
    path = export_policy(model, out or ("policy.onnx" if format == "onnx" else "policy.pt"), format)
    print(f"{path}: {type(model).__name__} policy as {format}")


def push_dataset(dataset_id: str, repo_id: str | None = None, private: bool = False, token: str | None = None) -> None:
    """Upload a trajectory dataset (converted from Minari, or a mixture) to the HuggingFace Hub as parquet with its spec
    and a dataset card; train on it anywhere with `--data.dataset_id hf:USER/NAME` (no Minari download, no env needed
    to load it).

        dtlab push-dataset halfcheetah/medium-v0 --repo_id you/halfcheetah-medium-v0

    Args:
        dataset_id: a Minari dataset id (or a mixture a+b).
        repo_id: the Hub dataset repo, user/name (created if it does not exist).
        private: create the repo private.
        token: a HuggingFace token with write access (default: the logged-in one).
    """
    from dtlab.data.convert import push_dataset as push
    from dtlab.hub import hub_user

    if repo_id is None or repo_id.count("/") != 1:
        raise UsageError(f"push-dataset needs --repo_id USER/NAME (got {repo_id}).")
    hub_user(token)  # a missing or refused token, or no network, before the dataset is converted and uploaded
    url = push(dataset_id, repo_id, private=private, token=token)
    print(f"pushed {dataset_id} to {repo_id} (train on it with --data.dataset_id hf:{repo_id}): {url}")


def import_transformers(
    folder: str,
    out: str | None = None,
    env_id: str | None = None,
    state_mean: list[float] | None = None,
    state_std: list[float] | None = None,
    return_scale: float | None = None,
    context_len: int | None = None,
    target_return: list[float] | None = None,
) -> None:
    """Import a transformers DecisionTransformerModel folder (e.g. a public edbeeching/decision-transformer-gym-* repo,
    downloaded) as a dtlab model folder, to evaluate (`dtlab evaluate OUT`) or fine-tune (`dtlab fit --pretrained OUT`).

        dtlab import-transformers dt-hopper --out models/dt-hopper --env_id Hopper-v5 --return_scale 1000 \
            --state_mean '[1.31, ...]' --state_std '[0.17, ...]' --target_return '[3600]'

    Args:
        folder: the transformers folder (config.json + weights).
        out: the dtlab model folder to write.
        env_id: the gymnasium env (default: config.json's env_id, which `dtlab export --format transformers` writes).
        state_mean: observation mean the model was trained with (default: config.json's state_mean).
        state_std: observation std (default: config.json's state_std).
        return_scale: returns-to-go are divided by this (default: config.json's return_scale; 1000 for the public MuJoCo DTs).
        context_len: the context window K (default: config.json's context_len, else 20).
        target_return: target returns to act for, the first the primary one (default: config.json's eval_targets, which
            `dtlab export --format transformers` writes; the public repos state theirs in their model card).
    """
    from dtlab.export import from_transformers
    from dtlab.hub import save_pretrained

    if out is None:
        raise UsageError("import-transformers needs --out FOLDER, the dtlab model folder to write.")
    try:
        model = from_transformers(folder, env_id, state_mean, state_std, return_scale, context_len, target_return)
    except ValueError as err:
        raise UsageError(str(err)) from None
    path = save_pretrained(model, out)
    print(f"{path}: DecisionTransformer from {folder} (env {model.spec.env_spec['id']}, targets {model.eval_targets})")


def scale(
    fit_config: str,
    out: str = "scaling",
    devices: list[int] = [1],  # noqa: B006 (jsonargparse reads the default; never mutated)
    sizes: list[dict] | None = None,
    batch_sizes: list[int] | None = None,
    fractions: list[float] = [1.0],  # noqa: B006
    seeds: list[int] = [0],  # noqa: B006
    updates: int = 200,
    accelerator: str = "cpu",
    threads: int | None = 1,
    eval_episodes: int = 0,
    loss: str | None = None,
    fit_args: list[str] | None = None,
) -> None:
    """Scaling study: a grid of real `dtlab fit` runs over devices × model size × batch size × data fraction × seed,
    each for a fixed number of updates. Writes OUT/scaling.csv (one row per cell: samples/s, updates/s, tokens/s,
    scaling efficiency = samples/s at N devices ÷ (N × samples/s at 1), peak memory, parameters, final training loss,
    normalised score), throughput.png, loss_vs_parameters.png and loss_vs_data.png with fitted power laws
    L = a·N^(−α) + c (OUT/fits.json), and score_vs_parameters.png. Run it again to finish an interrupted grid.

        dtlab scale conf/dt.yaml --devices '[1, 2]' --updates 300 --out docs/scaling/dt-cpu
        dtlab scale conf/dt.yaml --sizes '[{embed_dim: 64, n_layer: 1}, {embed_dim: 128, n_layer: 3}]' \\
            --fractions '[0.1, 0.3, 1.0]' --updates 2000 --eval_episodes 5 --out studies/dt-size
        dtlab scale conf/iql.yaml --accelerator gpu --devices '[1, 2, 4, 8]' --threads null \\
            --fit_args '[--trainer.precision, bf16-mixed]'

    Args:
        fit_config: the training config (as for `dtlab fit -c`); every cell starts from it.
        out: the study's folder (scaling.csv, plots, fits.json, runs/, logs/).
        devices: process counts; a cell with N > 1 runs DDP over N devices (CPU processes with `accelerator cpu`).
        sizes: model overrides per size, e.g. '[{embed_dim: 64, n_layer: 1}]' (default: the config's model).
        batch_sizes: per-process batch sizes (default: the config's data.batch_size).
        fractions: shares of the dataset's episodes to train on (data.fraction).
        seeds: seeds of each cell (seed_everything and data.seed); plots show mean ± std over them.
        updates: updates per cell; throughput is timed after the first tenth.
        accelerator: cpu or gpu (Lightning's names).
        threads: CPU threads per process (OMP_NUM_THREADS); null leaves the default.
        eval_episodes: evaluation episodes at the end of each cell (0: none; needs the environment).
        loss: the training metric plotted as the loss (default: dt_loss, bc_loss or actor_loss).
        fit_args: more `dtlab fit` options for every cell (before the grid's own), e.g. '[--data.dataset_id, halfcheetah/medium-v0]'.
    """
    import yaml

    from dtlab.scaling import grid, run_grid

    if not Path(fit_config).is_file():
        raise UsageError(f"{fit_config}: no such config file.")
    if min(devices) < 1 or updates < 2:
        raise UsageError(f"--devices must be >= 1 and --updates >= 2, got {devices} and {updates}.")
    if not all(0.0 < f <= 1.0 for f in fractions):
        raise UsageError(f"--fractions must lie in (0, 1], got {fractions}.")
    if batch_sizes is None:
        batch_sizes = [int(((yaml.safe_load(Path(fit_config).read_text()) or {}).get("data") or {}).get("batch_size", 256))]
    cells = grid(devices, sizes or [{}], batch_sizes, fractions, seeds)
    path, plots, fits = run_grid(fit_config, Path(out), cells, updates, accelerator, threads, eval_episodes, fit_args or [], loss)
    print(f"{path}: {len(cells)} cells")
    for name, fit in fits.items():
        print(f"  {name}: L = {fit['a']:.3g}·x^(−{fit['alpha']:.3f}) + {fit['c']:.3g}")
    for plot_path in plots:
        print(f"  {plot_path}")


def ope(
    policies: list[str],
    dataset_id: str | None = None,
    updates: int = 20000,
    batch_size: int = 100,
    fqe: dict[str, Any] | None = None,
    true_episodes: int = 0,
    out: str | None = None,
    seed: int = 0,
    accelerator: str = "auto",
    threads: int = 1,
    env_entry_point: str | None = None,
) -> dict[str, Any]:
    """Off-policy evaluation: estimate how well each policy would do from a dataset alone, by Fitted Q Evaluation
    (dtlab.ope.FQE; Le et al. 2019, as d3rlpy's and the DOPE benchmark's). No environment is needed; where the data
    names one, `--true_episodes N` also rolls each policy out, and the table scores the estimator over the pool
    (Spearman rank correlation, regret@1, mean absolute error: DOPE's metrics).

        dtlab ope runs/iql/version_0/checkpoints/last.ckpt runs/bc/version_0/checkpoints/last.ckpt --dataset_id walker2d/medium-v0
        dtlab ope models/iql-walker user/td3bc-walker --dataset_id walker2d/medium-v0 --true_episodes 10 --out ope/
        dtlab ope runs/td3bc/version_0/checkpoints/last.ckpt --dataset_id hf:you/clinic-v0 --fqe '{discount: 0.995, hidden_dims: [512, 512]}'

    The estimate is the γ-discounted value of the data's initial states, mean_s0 Q(s0, π(s0)) ± a 95% bootstrap interval
    over those states; it is also shown as an episode return, (1 − γ) · H · value with H the episode length (exact for a
    constant reward per step over full-length episodes), and its normalised score. OUT/ope.json holds every number;
    OUT/ope.png plots estimate against truth when there are true returns.

    Args:
        policies: checkpoints (.ckpt), model folders or Hub repo ids of stateless policies (BC, TD3+BC, IQL, CQL, Cal-QL).
        dataset_id: the data to evaluate on (a Minari id, a mixture a+b, or hf:USER/NAME), of the policies' spaces.
        updates: FQE updates per policy (batches of --batch_size transitions).
        batch_size: transitions per update (d3rlpy's FQE: 100).
        fqe: FQE's arguments besides the policy (dtlab.ope.FQE), e.g. '{discount: 0.995, target_update_interval: 1, tau: 0.005}'.
        true_episodes: also roll each policy out for this many episodes in the data's environment (0: none).
        out: folder to write ope.json (and ope.png) into.
        seed: seeds FQE's critics, the batch stream and the bootstrap; rollout episode i is reset with seed + i.
        accelerator: where FQE trains (Lightning's names: auto, cpu, gpu).
        threads: torch CPU threads.
        env_entry_point: as for `dtlab evaluate`: the only entry point (module:Class) an unregistered environment may be built from.
    """
    import torch

    from dtlab.data.module import OfflineDataModule
    from dtlab.ope import FQE, fit_fqe, initial_observations, load_policies, plot_estimates, pool_metrics, rollout_returns, short_name, table

    if not policies:
        raise UsageError("ope needs at least one policy: a checkpoint, a model folder or a Hub repo id.")
    if dataset_id is None:
        raise UsageError("ope needs --dataset_id ID, the data to evaluate the policies on.")
    if updates < 1 or batch_size < 1 or true_episodes < 0:
        raise UsageError(f"--updates and --batch_size must be >= 1 and --true_episodes >= 0, got {updates}, {batch_size} and {true_episodes}.")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out}: a file is there; give a folder for ope.json and ope.png.")
    fqe_args = dict(fqe or {})
    allowed = [p for p in inspect.signature(FQE).parameters if p not in ("spec", "policy")]
    unknown = sorted(set(fqe_args) - set(allowed))
    if unknown:
        raise UsageError(f"--fqe: FQE takes no {', '.join(unknown)}; its arguments are {', '.join(allowed)}.")
    torch.set_num_threads(threads)
    trust(env_entry_point)

    datamodule = OfflineDataModule(dataset_id, batch_size=batch_size, steps_per_epoch=updates, seed=seed)
    spec = datamodule.transitions.spec
    if true_episodes > 0:
        if spec.env_spec is None:
            raise UsageError(f"--true_episodes {true_episodes}: dataset '{spec.dataset_id}' names no environment to roll the policies out in; use 0.")
        from dtlab.envs import make_vector_env

        make_vector_env(spec, 1).close()  # a missing environment fails now, not after the fits
    models = load_policies(policies, spec)
    try:  # bad values fail before any fit
        hyperparameters = {k: v for k, v in FQE(spec.to_dict(), models[0].policy, **fqe_args).hparams.items() if k != "spec"}
    except (TypeError, ValueError) as err:
        raise UsageError(f"--fqe: {err}") from None
    starts = initial_observations(datamodule.transitions.columns)
    if len(starts) == 0:
        raise UsageError(f"Dataset '{spec.dataset_id}' holds no episode start (timestep 0): FQE estimates the value of the initial states.")
    progress = sys.stderr.isatty()
    # No policy's discounted value can leave [min(0, r_min), max(0, r_max)] / (1 − γ) on these rewards: an estimate
    # outside diverged (FQE's known failure for a policy that leaves the data's support; see the README).
    rewards = datamodule.transitions.columns["rewards"]
    reachable = [min(0.0, float(rewards.min())) / (1.0 - hyperparameters["discount"]), max(0.0, float(rewards.max())) / (1.0 - hyperparameters["discount"])]

    rows = []
    for i, (source, model) in enumerate(zip(policies, models)):
        if progress:
            print(f"FQE {i + 1}/{len(models)}: {source}", file=sys.stderr)
        torch.manual_seed(seed)
        estimator = fit_fqe(FQE(spec.to_dict(), model.policy, **fqe_args), datamodule, updates, progress, accelerator)
        row = {"policy": str(source), "name": short_name(source), "algorithm": type(model).__name__, "fqe": estimator.estimate(starts, seed=seed)}
        row["fqe"]["reachable"] = reachable[0] <= row["fqe"]["value"] <= reachable[1]
        if true_episodes > 0:
            returns, discounted = rollout_returns(model, range(seed, seed + true_episodes), estimator.hparams.discount)
            from dtlab.callbacks import return_summary

            row["true"] = {"episodes": true_episodes, "discounted_return_mean": float(discounted.mean())} | return_summary(returns, spec)
        rows.append(row)
        del estimator

    result = {
        "dataset_id": spec.dataset_id,
        "updates": updates,
        "batch_size": batch_size,
        "seed": seed,
        "fqe": hyperparameters,
        "reachable_values": reachable,
        "policies": rows,
        "pool": pool_metrics(rows),
    }
    print(table(result))
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "ope.json.tmp"
        tmp.write_text(jsonlib.dumps(result, indent=2, default=list))
        os.replace(tmp, folder / "ope.json")
        written = [folder / "ope.json"]
        if any("true" in r for r in rows):
            written.append(plot_estimates(rows, folder / "ope.png", spec, result["fqe"]["discount"]))
        print("wrote " + ", ".join(map(str, written)))
    return result


COMMANDS: dict[str, Callable] = {
    "make-dataset": make_dataset,
    "evaluate": evaluate,
    "plot": plot,
    "save": save,
    "push": push,
    "export": export,
    "member": member,
    "push-dataset": push_dataset,
    "import-transformers": import_transformers,
    "scale": scale,
    "ope": ope,
}
