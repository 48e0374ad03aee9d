"""Models as folders and on the HuggingFace Hub: save_pretrained, from_pretrained and push_to_hub for every algorithm.

A model folder holds

- `model.safetensors`: the model's tensors (the networks and the Policy's observation statistics), nothing else;
- `config.json`: the algorithm's registry name, its hyperparameters with the dataset spec (spaces, statistics,
  reference returns, environment), the env and dataset ids, the dtlab version, and the evaluation if one was run:
  rollouts in the environment (`evaluation`) and/or an off-policy estimate from the data alone (`ope`, FQE);
- `README.md`: a model card (HF metadata: tags, `model-index` with the normalised score; evaluation table,
  hyperparameters, how to load and evaluate it, the command that trained it, the learning curve);
- from a training run, where present: `learning_curve.png`, `return_conditioning.png` and the run's `config.yaml`.

Loading reads JSON and safetensors only, so nothing in a folder or a Hub repo can run code; the algorithm is
built from dtlab's registry (`dtlab.ALGORITHMS`), never from an import path the folder names.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
from safetensors import SafetensorError

from dtlab.algos import OfflineRLModule
from dtlab.checkpoints import CheckpointError, algorithm_class, build_model
from dtlab.spec import DatasetSpec

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
RUN_FILES = ("learning_curve.png", "return_conditioning.png", "config.yaml")  # copied from a run folder when present


def model_config(model: OfflineRLModule, evaluation: dict[str, Any] | None = None, ope: dict[str, Any] | None = None) -> dict[str, Any]:
    """What config.json holds: plain JSON, enough to rebuild the model with no other file but the weights."""
    from dtlab import __version__

    hyperparameters = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_")}
    spec = model.spec
    return {
        "dtlab_algorithm": type(model).__name__,
        "dtlab_version": __version__,
        "env_id": (spec.env_spec or {}).get("id"),
        "dataset_id": spec.dataset_id,
        "hyperparameters": json.loads(json.dumps(hyperparameters, default=_plain)),
        "evaluation": evaluation,
        "ope": ope,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def evaluate_for_card(model: OfflineRLModule, episodes: int, seed: int = 0) -> dict[str, Any]:
    """Greedy returns over `episodes` seeded episodes (a DT at its first target), summarised for the card."""
    from dtlab.callbacks import evaluate_returns, return_summary

    targets = getattr(model, "eval_targets", None)
    returns = evaluate_returns(model, list(range(seed, seed + episodes)), None if targets is None else targets[:1]).reshape(-1)
    out = {"episodes": episodes, "seed": seed} | return_summary(returns, model.spec)
    if targets is not None:
        out["target_return"] = float(targets[0])
    return out


def estimate_for_card(model: OfflineRLModule, updates: int, batch_size: int = 100, seed: int = 0) -> dict[str, Any]:
    """Fitted Q Evaluation (dtlab.ope, d3rlpy's defaults) of the model's policy on the data it was trained on, for a
    card where no environment can be rolled out: an estimate, marked as one (`method: fqe`)."""
    from dtlab.data.module import OfflineDataModule
    from dtlab.ope import estimate_policy, require_stateless_policy

    require_stateless_policy(model, "--ope_updates")
    transitions = OfflineDataModule(model.spec.dataset_id).transitions
    estimate = estimate_policy(model, transitions, updates, batch_size, seed=seed)
    return {"method": "fqe", "dataset_id": model.spec.dataset_id, "updates": updates, "batch_size": batch_size, "seed": seed} | estimate


def save_pretrained(
    model: OfflineRLModule,
    directory: str | Path,
    evaluation: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    repo_id: str | None = None,
    video: bool = False,
    ope: dict[str, Any] | None = None,
) -> Path:
    """Write the model folder (see the module's docstring); `run_dir` (runs/<name>/version_N) adds its plots and
    config; `repo_id` names the model in the card; `video` adds `replay.mp4`, one greedy episode rendered offscreen;
    `ope` is an off-policy estimate (`estimate_for_card`), shown in the card as an estimate."""
    model.require_single_seed("A model folder")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model_config(model, evaluation, ope)
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    safetensors.torch.save_model(model, str(directory / WEIGHTS))  # handles tensors shared between modules (e.g. the actor under the policy)
    shutil.copymode(directory / CONFIG, directory / WEIGHTS)  # safetensors writes 0600: give it the umask's mode, as every other file
    copied = []
    for name in RUN_FILES if run_dir is not None else ():
        if (Path(run_dir) / name).is_file():
            shutil.copyfile(Path(run_dir) / name, directory / name)
            copied.append(name)
    if video:
        from dtlab.envs import record_video

        record_video(model, directory / "replay.mp4", seed=0)
        copied.append("replay.mp4")
    model_card(model, config, copied, repo_id).save(directory / CARD)
    return directory


def from_pretrained(
    source: str | Path, revision: str | None = None, token: str | None = None, expected: type[OfflineRLModule] | None = None
) -> OfflineRLModule:
    """A model from a folder written by `save_pretrained`, or from a Hub repo id ("user/name"): strict loading."""
    directory = Path(source)
    if not directory.is_dir():
        if directory.exists() or str(source).count("/") != 1:
            raise CheckpointError(f"{source} is neither a model folder (config.json + model.safetensors) nor a Hub repo id (user/name).")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError

        try:
            directory = Path(snapshot_download(str(source), revision=revision, token=token, allow_patterns=[CONFIG, WEIGHTS]))
        except (HFValidationError, OSError) as err:  # OSError covers huggingface_hub's HTTP and offline errors
            raise CheckpointError(f"{source} is not a local model folder and could not be fetched as a Hub repo id: {str(err).splitlines()[0]}") from None
    config_path, weights = directory / CONFIG, directory / WEIGHTS
    for path in (config_path, weights):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {source} is not a dtlab model folder (it needs {CONFIG} and {WEIGHTS}).")
    try:
        config = json.loads(config_path.read_text())
        name, hyperparameters = config["dtlab_algorithm"], config["hyperparameters"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not a dtlab model config ({type(err).__name__}: {err}).") from None
    cls = algorithm_class(name, str(config_path))
    if expected is not None and expected is not OfflineRLModule and not issubclass(cls, expected):
        raise CheckpointError(f"{config_path}: the folder holds a {name} model, not {expected.__name__}; load it with dtlab.from_pretrained.")
    model = build_model(name, hyperparameters, str(config_path))
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except SafetensorError as err:
        raise CheckpointError(f"{weights} is truncated or corrupt ({err}). Download or save the model again.") from None
    except RuntimeError as err:  # a tensor of another shape: other spaces or sizes than config.json says
        raise CheckpointError(f"{weights} does not fit the model {config_path} describes: {err}".splitlines()[0]) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not hold the tensors of the {name} that {config_path} describes "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})."
        )
    return model.eval()


def load_model(source: str | Path) -> OfflineRLModule:
    """Whatever a user points at: a checkpoint file (.ckpt), a model folder, or a Hub repo id."""
    from dtlab.checkpoints import load_checkpoint

    path = Path(source)
    if path.suffix == ".ckpt" or path.is_file():
        return load_checkpoint(path).eval()  # a missing .ckpt is named as such, not looked up on the Hub
    return from_pretrained(source)


def warm_start(model: OfflineRLModule, source: str | Path) -> None:
    """Start `model` from a checkpoint, a saved or a pushed model of the same algorithm, sizes and spaces: every
    tensor is copied, the observation statistics included (the networks were trained on inputs standardised by them)."""
    if Path(source).suffix == ".ckpt" or Path(source).is_file():
        pretrained = load_model(source)
        if type(pretrained) is not type(model):
            raise CheckpointError(f"Pretrained checkpoint {source} holds a {type(pretrained).__name__}, not a {type(model).__name__}: use its config.")
    else:
        pretrained = from_pretrained(source, expected=type(model))
    pretrained.spec.check_compatible(model.spec, f"Pretrained model {source}")
    model.require_single_seed("Warm start (--pretrained)")
    pretrained.require_single_seed(f"Warm start from {source}")
    try:
        model.load_state_dict(pretrained.state_dict(), strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"Pretrained model {source} has other network sizes than this {type(model).__name__}: "
            f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}. Use its hyperparameters (its config.json)."
        ) from None


class HubError(RuntimeError):
    """The Hub cannot be reached, or refuses the token or the upload: one line for the user (dtlab's CLI prints it)."""


@contextmanager
def hub_errors(action: str, endpoint: str) -> Iterator[None]:
    """huggingface_hub's token, HTTP and connection errors while doing `action` as one HubError line naming `endpoint`."""
    from huggingface_hub import errors

    try:
        yield
    except errors.LocalTokenNotFoundError:
        raise HubError(f"{action}: no HuggingFace token; pass --token, set HF_TOKEN or run `hf auth login`.") from None
    except errors.OfflineModeIsEnabled:
        raise HubError(f"{action}: offline mode is on (HF_HUB_OFFLINE=1); unset it to reach {endpoint}.") from None
    except errors.HfHubHTTPError as err:
        status = err.response.status_code if getattr(err, "response", None) is not None else None
        if status == 401:
            raise HubError(f"{action}: {endpoint} refused the token (401); pass a valid --token or HF_TOKEN, or run `hf auth login`.") from None
        if status == 403:
            raise HubError(f"{action}: the token has no write access there (403); use a token with write access (--token).") from None
        raise HubError(f"{action}: {endpoint} answered {str(err).splitlines()[0]}") from None
    # requests' connection errors are OSErrors (offline mode too); httpx's and httpx2's derive from the HTTPError huggingface_hub imports
    except (OSError, getattr(errors, "HTTPError", OSError)) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HubError(f"{action}: cannot reach the Hub at {endpoint} ({reason}); check the network, or HF_ENDPOINT.") from None


def hub_user(token: str | None = None) -> str:
    """The account of `token` (default: HF_TOKEN or `hf auth login`), asked of the Hub: a push checks it before it
    evaluates or uploads anything. A read-only token is refused here."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with hub_errors("checking the HuggingFace token", api.endpoint):
        user = api.whoami()
    if (user.get("auth", {}).get("accessToken") or {}).get("role") == "read":
        raise HubError(f"the HuggingFace token of {user.get('name')} is read-only; pushing needs a token with write access (--token).")
    return user.get("name", "?")


def push_to_hub(
    model: OfflineRLModule,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    evaluation: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    commit_message: str = "Upload dtlab model",
    video: bool = False,
    ope: dict[str, Any] | None = None,
) -> str:
    """save_pretrained into a temporary folder and upload it as one commit (token: HF_TOKEN or `hf auth login`).
    Network, token and permission errors raise one-line HubErrors."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="dtlab-push-") as tmp:
        save_pretrained(model, tmp, evaluation, run_dir, repo_id, video, ope)
        with hub_errors(f"pushing to {repo_id}", api.endpoint):
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return commit.commit_url


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ algorithm }} on {{ dataset_id }}

{{ description }} Trained with dtlab {{ dtlab_version }} (offline RL on PyTorch Lightning) on the offline dataset
`{{ dataset_id }}` ({% if has_env %}environment `{{ env_id }}`{% else %}data with no environment to roll a policy out in{% endif %}).

## Evaluation

{% if evaluation -%}
| episodes | return (mean ± std) | normalised score (mean ± std) |
| --- | --- | --- |
| {{ evaluation.episodes }}{% if evaluation.target_return is defined %} (target return {{ evaluation.target_return }}){% endif %} | {{ "%.1f"|format(evaluation.return_mean) }} ± {{ "%.1f"|format(evaluation.return_std) }} | {% if evaluation.normalized_score_mean is defined %}{{ "%.1f"|format(evaluation.normalized_score_mean) }} ± {{ "%.1f"|format(evaluation.normalized_score_std) }}{% else %}n/a (the data has no reference returns){% endif %} |

Greedy actions, episode i reset with seed {{ evaluation.seed }} + i. {% if ref_min is not none %}Normalised score: 100 · (R − R_random) / (R_expert − R_random), with the dataset's reference returns R_random = {{ "%.1f"|format(ref_min) }} and R_expert = {{ "%.1f"|format(ref_max) }}.{% endif %}
{%- elif not ope -%}
Not evaluated at upload (`dtlab push --eval_episodes N` adds an evaluation in the environment, `--ope_updates N` an
off-policy estimate from the data).
{%- endif %}
{%- if ope %}
### Off-policy estimate (FQE): an estimate, not a measured return

| value of the data's initial states (γ = {{ ope.discount }}) | as an episode return | normalised score |
| --- | --- | --- |
| {{ "%.2f"|format(ope.value) }} [{{ "%.2f"|format(ope.value_ci[0]) }}, {{ "%.2f"|format(ope.value_ci[1]) }}] | {{ "%.1f"|format(ope["return"]) }} [{{ "%.1f"|format(ope.return_ci[0]) }}, {{ "%.1f"|format(ope.return_ci[1]) }}] | {% if ope.normalized_score is defined %}{{ "%.1f"|format(ope.normalized_score) }} [{{ "%.1f"|format(ope.normalized_score_ci[0]) }}, {{ "%.1f"|format(ope.normalized_score_ci[1]) }}]{% else %}n/a (the data has no reference returns){% endif %} |

No episode was played to get these numbers. Fitted Q Evaluation (Le et al. 2019) learned Q of this policy from
`{{ ope.dataset_id }}` alone ({{ ope.updates }} updates of {{ ope.batch_size }} transitions, seed {{ ope.seed }});
the value is the mean of Q(s₀, π(s₀)) over the data's {{ ope.initial_states }} episode starts, with a 95% bootstrap
interval over those starts (it leaves out the error of the fit itself). The episode return is (1 − γ) · H · value
with H the episode length, exact only for a constant reward per step over full-length episodes. FQE can be far off
for a policy that leaves the data's support: trust it to rank policies on the same data more than as a score
(measured on Walker2d pools in dtlab's docs/results.md).
{% endif %}
{% for image in images %}
![{{ image }}]({{ image }})
{% endfor %}{% if video %}
<video src="replay.mp4" controls width="400"></video>

One greedy episode (reset seed 0), rendered offscreen.
{% endif %}
## Use

```python
import dtlab, torch

model = dtlab.from_pretrained("{{ repo_id }}")   # or a local folder; safetensors + JSON only
{%- if stateless %}
actions = model.policy(torch.as_tensor(observations, dtype=torch.float32))   # raw observations -> actions in the env's units
{%- else %}
agent = model.make_agent(num_envs=1)   # keeps the context window and returns-to-go between steps
{%- endif %}
```

```bash
{% if has_env -%}
dtlab evaluate {{ repo_id }} --episodes 10
{%- else -%}
dtlab ope {{ repo_id }} --dataset_id {{ dataset_id }}   # an off-policy estimate from the data (FQE)
{%- endif %}
```

## Training

{% if trained_with_config -%}
`dtlab fit -c config.yaml` (the run's full configuration is in `config.yaml` in this repo).
{%- else -%}
Hyperparameters are in `config.json`.
{%- endif %}

| hyperparameter | value |
| --- | --- |
{% for key, value in hyperparameters.items() -%}
| `{{ key }}` | `{{ value }}` |
{% endfor %}
"""


def model_card(model: OfflineRLModule, config: dict[str, Any], files: list[str], repo_id: str | None = None):
    """The README.md: HF metadata (tags, model-index with the normalised score) and a readable card."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    spec: DatasetSpec = model.spec
    algorithm = type(model).__name__
    evaluation, ope = config["evaluation"], config.get("ope")
    # (metric, value, how it was measured) per evaluation; an FQE estimate is its own metric type, never a measured score
    measured = []
    if evaluation is not None:
        metric = "normalized_score" if "normalized_score_mean" in evaluation else "return"
        measured.append((metric, evaluation[f"{metric}_mean"], f"{evaluation['episodes']} episodes"))
    if ope is not None:
        metric = "normalized_score" if "normalized_score" in ope else "return"
        measured.append((f"fqe_estimated_{metric}", ope[metric], "FQE off-policy estimate, not a rollout"))
    results = [
        EvalResult(
            task_type="reinforcement-learning",
            task_name="Offline reinforcement learning",
            dataset_type=spec.dataset_id,
            dataset_name=spec.dataset_id,
            metric_type=metric,
            metric_name=f"{metric.removeprefix('fqe_estimated_').replace('_', ' ')} ({how})",
            metric_value=round(value, 2),
        )
        for metric, value, how in measured
    ]
    env_id = config["env_id"]
    data = ModelCardData(
        library_name="dtlab",
        tags=["offline-rl", "dtlab", "reinforcement-learning", algorithm.lower()] + ([env_id] if env_id else []),
        model_name=repo_id or f"{algorithm.lower()}-{spec.dataset_id.replace('/', '-')}",
        eval_results=results or None,
    )
    hyperparameters = {k: v for k, v in config["hyperparameters"].items() if k != "spec"}
    return ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        algorithm=algorithm,
        description=(type(model).__doc__ or "").strip().splitlines()[0],
        dataset_id=spec.dataset_id,
        env_id=env_id,
        has_env=env_id is not None,
        dtlab_version=config["dtlab_version"],
        evaluation=evaluation,
        ope=ope,
        ref_min=spec.ref_min_score,
        ref_max=spec.ref_max_score,
        images=[f for f in files if f.endswith(".png")],
        video="replay.mp4" in files,
        repo_id=repo_id or "<user>/<repo>",
        stateless=getattr(model, "eval_targets", None) is None,
        trained_with_config="config.yaml" in files,
        hyperparameters=hyperparameters,
    )
