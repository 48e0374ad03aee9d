"""Lightning callbacks every dtlab run uses: environment evaluation, the run report (learning curves and a
summary), the divergence guard, exact resume.

The LightningModules keep networks and losses only; what a run does around them lives here.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import Callback, Timer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics.aggregation import CatMetric
from tqdm.auto import tqdm

from dtlab.envs import make_vector_env, rollout
from dtlab.plots import plot_learning_curves, plot_return_conditioning, read_metrics
from dtlab.spec import DatasetSpec


def episode_seeds(seed: int, episodes: int) -> list[int]:
    """The reset seeds of an evaluation's episodes: the same for every evaluation of a run."""
    return [1_000_003 * seed + i for i in range(episodes)]


@torch.no_grad()
def evaluate_returns(
    module: L.LightningModule, seeds: Sequence[int] | Sequence[Sequence[int]], targets: Sequence[float] | None = None, progress: bool = False
) -> np.ndarray:
    """Greedy returns of one episode per seed, all in one vector env: (len(seeds),), or with `targets`
    (return-conditioned models) (len(targets), len(seeds)), every target on the same seeds. A model with seeds as
    members gives (S, n): each member plays its own episodes, on `seeds` or, given one list per member, on its own."""
    member_seeds = getattr(module, "member_seeds", None)
    if member_seeds is not None and len(seeds) and not isinstance(seeds[0], (int, np.integer)):
        rows = [list(s) for s in seeds]  # one list of episode seeds per member
    else:
        rows = [list(seeds)] * (len(targets) if targets is not None else 1 if member_seeds is None else len(member_seeds))
    n, k = len(rows[0]), len(rows)
    env = make_vector_env(module.spec, n * k)
    was_training = module.training
    module.eval()
    bar = tqdm(total=n * k, desc="evaluating", unit="episode", leave=False, disable=not progress)
    try:
        if targets is None:
            agent = module.make_agent(n * k)
        else:
            next_step = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP) == AutoresetMode.NEXT_STEP
            agent = module.make_agent(n * k, np.repeat(np.asarray(targets, dtype=np.float64), n), next_step_autoreset=next_step)
        returns, _ = rollout(agent, env, [seed for row in rows for seed in row], on_episode_end=bar.update)
    finally:
        bar.close()
        env.close()
        module.train(was_training)
    return returns if targets is None and member_seeds is None else returns.reshape(k, n)


def return_summary(returns: np.ndarray, spec: DatasetSpec) -> dict[str, float]:
    """Mean and std of one set of episode returns, and of their normalised scores where the data has references."""
    out = {"return_mean": float(returns.mean()), "return_std": float(returns.std())}
    if spec.ref_min_score is not None and spec.ref_max_score is not None:
        scores = spec.normalized_score(returns)
        out |= {"normalized_score_mean": float(np.mean(scores)), "normalized_score_std": float(np.std(scores))}
    return out


def eval_metrics(returns: np.ndarray, targets: Sequence[float] | None, spec: DatasetSpec) -> dict[str, float]:
    """Metrics of (targets, episodes) returns: eval/return and eval/normalized_score of the first (primary)
    row, and with targets eval/return/target_<R> (and the score) of each row."""
    has_refs = spec.ref_min_score is not None and spec.ref_max_score is not None
    metrics = {"eval/return": float(returns[0].mean())}
    if has_refs:
        metrics["eval/normalized_score"] = float(np.mean(spec.normalized_score(returns[0])))
    for target, r in zip(targets or [], returns):
        metrics[f"eval/return/target_{target:g}"] = float(r.mean())
        if has_refs:
            metrics[f"eval/normalized_score/target_{target:g}"] = float(np.mean(spec.normalized_score(r)))
    return metrics


def interquartile_mean(values: np.ndarray) -> float:
    """The mean of the middle half: ⌊n/4⌋ values trimmed at each end (rliable's IQM, scipy's trim_mean(0.25))."""
    values, cut = np.sort(np.asarray(values, dtype=np.float64)), len(values) // 4
    return float(values[cut : len(values) - cut].mean())


def bootstrap_ci(values: np.ndarray, statistic=interquartile_mean, samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over runs resampled with replacement (rliable's, over seeds)."""
    values = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(samples, len(values)))
    stats = np.array([statistic(values[d]) for d in draws])
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))


def member_metrics(returns: np.ndarray, seeds: Sequence[int], spec: DatasetSpec) -> dict[str, float]:
    """Metrics of (members, episodes) returns: eval/return and eval/normalized_score over every member's
    episodes; per member eval/.../seed_<s>; and over the members' means, the std, the interquartile mean and
    its 95% bootstrap interval (eval/normalized_score/iqm, iqm_low, iqm_high; of eval/return without references)."""
    has_refs = spec.ref_min_score is not None and spec.ref_max_score is not None
    names = {"return": returns} | ({"normalized_score": spec.normalized_score(returns)} if has_refs else {})
    metrics: dict[str, float] = {}
    means = {name: np.asarray(values, dtype=np.float64).mean(axis=1) for name, values in names.items()}  # per member
    for name, per_member in means.items():
        metrics[f"eval/{name}"] = float(per_member.mean())
        metrics |= {f"eval/{name}/seed_{seed}": float(v) for seed, v in zip(seeds, per_member)}
    primary = "normalized_score" if has_refs else "return"
    per_member = means[primary]
    low, high = bootstrap_ci(per_member)
    metrics |= {f"eval/{primary}/std": float(per_member.std()), f"eval/{primary}/iqm": interquartile_mean(per_member)}
    return metrics | {f"eval/{primary}/iqm_low": low, f"eval/{primary}/iqm_high": high}


class EnvEvaluation(Callback):
    """Scores the policy in its dataset's environment at the end of every `every_n_epochs`-th training
    epoch and of the last one: `eval/return` and, where the data has reference returns,
    `eval/normalized_score` (0 = random policy, 100 = expert). A Decision Transformer is evaluated at
    each of its target returns (`eval/return/target_<R>`, its first target as `eval/return`) and
    the run folder gets an achieved-vs-target plot, `return_conditioning.png`.

    Episodes are split across ranks (episode i on rank i mod world size) and gathered, so each is
    counted once. The environment is built once before training, so a missing dependency fails early.

    Args:
        episodes: episodes per evaluation (per target for return-conditioned models); 0 disables evaluation.
        every_n_epochs: evaluate every n training epochs (an epoch is data.steps_per_epoch updates).
        seed: episode i is reset with seed 1_000_003 · seed + i, the same at every evaluation. A model with seeds as
            members (`seeds`) logs each member's score, eval/normalized_score/seed_<s> (its episodes are those of
            `seed` s), their mean as eval/normalized_score, and their std, interquartile mean and its 95% bootstrap
            interval (eval/normalized_score/std, iqm, iqm_low, iqm_high).
    """

    def __init__(self, episodes: NonNegativeInt = 10, every_n_epochs: PositiveInt = 1, seed: int = 0) -> None:
        if episodes < 0 or every_n_epochs < 1:
            raise ValueError(f"evaluation: episodes must be >= 0 and every_n_epochs >= 1, got {episodes} and {every_n_epochs}.")
        self.episodes, self.every_n_epochs, self.seed = episodes, every_n_epochs, seed

    def enabled(self, module: L.LightningModule) -> bool:
        return self.episodes > 0 and module.spec.env_spec is not None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled(pl_module):
            make_vector_env(pl_module.spec, 1).close()  # fail now, not after training

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = trainer.current_epoch + 1 >= trainer.max_epochs or 0 < trainer.max_steps <= trainer.global_step
        if self.enabled(pl_module) and ((trainer.current_epoch + 1) % self.every_n_epochs == 0 or last):
            self.evaluate(trainer, pl_module)

    def rank_seeds(self, rank: int, world_size: int, seed: int | None = None) -> list[int]:
        """This rank's share of the episode seeds (of `seed`, default the evaluation's): episode i on rank i mod world size."""
        return episode_seeds(self.seed if seed is None else seed, self.episodes)[rank::world_size]

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        targets, members = getattr(pl_module, "eval_targets", None), getattr(pl_module, "member_seeds", None)
        # With seeds as members, the member of seed s plays the episodes of a single-seed run's `--evaluation.seed s`.
        seeds = self.rank_seeds(rank, world) if members is None else [self.rank_seeds(rank, world, s) for s in members]
        n_rows = len(targets) if targets is not None else 1 if members is None else len(members)
        n_local = len(seeds) if members is None else len(seeds[0])
        progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        local = evaluate_returns(pl_module, seeds, targets, progress=progress) if n_local else np.zeros((n_rows, 0))
        gathered = CatMetric(nan_strategy="disable").to(pl_module.device)  # every rank's episodes, each once
        gathered.update(torch.as_tensor(local, dtype=torch.float64, device=pl_module.device).reshape(n_rows, n_local).T)
        returns = gathered.compute().reshape(-1, n_rows).T.cpu().numpy()  # (targets or members, episodes)
        spec = pl_module.spec
        metrics = member_metrics(returns, members, spec) if members is not None else eval_metrics(returns, targets, spec)
        for name, value in metrics.items():  # identical on every rank (the mean over ranks is itself)
            pl_module.log(name, float(value), prog_bar=name in ("eval/return", "eval/normalized_score"), sync_dist=True)
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if targets is not None and trainer.is_global_zero and log_dir is not None:
            title = f"{spec.dataset_id}, update {trainer.global_step}"
            plot_return_conditioning(targets, returns, Path(log_dir) / "return_conditioning.png", spec, title)


OPEN_ENDED_WARMUP = 100  # updates not timed by RunReport when the number of updates is not known ahead


class RunReport(Callback):
    """What a run leaves to read: `learning_curve.png` in the run folder, redrawn after every epoch from the
    CSV logger's metrics.csv; at the end of the fit a summary block (updates, wall time, final and best
    evaluation, where the checkpoints and plots are) and `run_summary.json` (below), which `dtlab scale` reads.

    run_summary.json: the dataset's transitions (after data.fraction); updates; wall_s; updates_per_s, samples_per_s (and tokens_per_s for sequence models,
    3 tokens per step) timed after the first tenth of the updates (warm-up: allocation, compilation; the first
    100 in an open-ended run, such as an online phase that stops when its env steps are spent) up
    to the last, so evaluation at the end is not counted; world_size, batch_size (per process) and
    global_batch_size; parameters; peak_memory_mb, the largest over processes (CUDA: peak allocated by
    tensors; CPU: peak resident set of the process); device; the mean of each training metric over the
    last tenth of the updates (`train`), the final evaluation (`eval`), and for online fine-tuning the
    environment steps collected (`env_steps`); `time_limit_reached` when `--trainer.max_time` stopped the fit before
    its budget. Lightning's Timer counts the time of the fits a resumed run continues, so such a run goes on with
    `--ckpt_path last` and a larger `max_time`."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start: float | None = None  # set when training begins: a resumed fit may have nothing left to train

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a checkpoint is restored (on_fit_start comes before it): a resumed fit counts its own updates.
        self.start, self.start_step = time.perf_counter(), trainer.global_step
        planned = trainer.estimated_stepping_batches - self.start_step  # updates this fit will make (inf: until a callback stops it)
        self.warm_step = self.start_step + (max(1, int(planned) // 10) if math.isfinite(planned) else OPEN_ENDED_WARMUP)
        self.timed: tuple[float, int] | None = None  # (time, update) at the end of the warm-up
        self.last_update: tuple[float, int] | None = None  # (time, update) of the latest update after it
        # Read now: Lightning moves the module back to the CPU at teardown, before the summary is written.
        self.device = torch.cuda.get_device_name(pl_module.device) if pl_module.device.type == "cuda" else "cpu"
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warm_step:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self.timed = (time.perf_counter(), trainer.global_step)
        elif self.timed is not None:
            self.last_update = (time.perf_counter(), trainer.global_step)

    @staticmethod
    def metrics_csv(trainer: L.Trainer) -> Path | None:
        """The CSV logger's metrics.csv, written out now (None without a CSV logger or before any row)."""
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()
                path = Path(logger.log_dir) / "metrics.csv"
                return path if path.is_file() else None
        return None

    @staticmethod
    def run_dir(trainer: L.Trainer) -> Path | None:
        """The run's folder (the CSV logger's runs/<name>/version_N, else the trainer's log_dir)."""
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        folder = csv_logger.log_dir if csv_logger is not None else trainer.log_dir
        return None if folder is None else Path(folder)

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        csv = self.metrics_csv(trainer) if trainer.is_global_zero else None
        if csv is None:
            return None
        spec = pl_module.spec
        title = f"{type(pl_module).__name__} on {spec.dataset_id}"
        try:
            return plot_learning_curves({type(pl_module).__name__: [csv]}, csv.parent / "learning_curve.png", title)
        except ValueError:  # nothing logged yet
            return None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:  # the previous epoch's evaluation is in the logger by now
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every process measures its own peak; the largest is reported (a collective: every rank comes here).
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.peak_memory_mb = float(trainer.strategy.reduce(torch.tensor(peak, dtype=torch.float64, device=pl_module.device), reduce_op="max"))

    def summary(self, trainer: L.Trainer, pl_module: L.LightningModule, seconds: float, history: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        """The run_summary.json record (see the class docstring)."""
        batch_size = getattr(trainer.datamodule, "batch_size", None)
        out: dict[str, Any] = {
            "algorithm": type(pl_module).__name__,
            "dataset_id": pl_module.spec.dataset_id,
            "transitions": pl_module.spec.num_transitions,
            "updates": trainer.global_step,
            "wall_s": seconds,
            "world_size": trainer.world_size,
            "batch_size": batch_size,
            "global_batch_size": None if batch_size is None else batch_size * trainer.world_size,
            "parameters": sum(p.numel() for p in pl_module.parameters()),
            "peak_memory_mb": getattr(self, "peak_memory_mb", None),
            "device": self.device,
            "precision": str(trainer.precision),
            "time_limit_reached": self.time_limit_reached(trainer),
        }
        if self.timed is not None and self.last_update is not None:
            (t0, s0), (t1, s1) = self.timed, self.last_update
            out["updates_per_s"] = (s1 - s0) / max(t1 - t0, 1e-9)
            if batch_size is not None:
                out["samples_per_s"] = out["updates_per_s"] * out["global_batch_size"]
                context_len = pl_module.batch_format.context_len
                if context_len:
                    out["tokens_per_s"] = out["samples_per_s"] * 3 * context_len
        tail = trainer.global_step - max(1, (trainer.global_step - self.start_step) // 10)
        out["train"] = {
            name.removeprefix("train/"): float(values[steps > tail].mean() if (steps > tail).any() else values[-1])
            for name, (steps, values) in history.items()
            if name.startswith("train/")
        }
        if "online/env_steps" in history:
            out["env_steps"] = int(history["online/env_steps"][1][-1])
        out["eval"] = {
            name.removeprefix("eval/"): float(values[-1]) for name, (_, values) in history.items() if name in ("eval/return", "eval/normalized_score")
        }
        return out

    @staticmethod
    def time_limit_reached(trainer: L.Trainer) -> bool:
        """Whether `--trainer.max_time` (Lightning's Timer, over this fit and the fits it resumes) ended the fit before
        its budget of updates."""
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        remaining = None if timer is None else timer.time_remaining()
        return remaining is not None and remaining <= 0 and not 0 < trainer.max_steps <= trainer.global_step

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = f"{type(pl_module).__name__} on {pl_module.spec.dataset_id}"
        if self.start is None:  # resumed at its budget: Lightning ends the fit before training starts
            spent, limit = (
                ("--trainer.max_time was spent", "--trainer.max_time")
                if self.time_limit_reached(trainer)
                else ("the budget was reached", "--trainer.max_steps")
            )
            print(
                f"\n{name}: nothing to train: the checkpoint is at update {trainer.global_step} and {spent}; "
                f"raise {limit} to train on. run_summary.json is left as it was.",
                flush=True,
            )
            return
        curve = self.draw(trainer, pl_module)
        seconds = time.perf_counter() - self.start
        updates = trainer.global_step - self.start_step
        lines = [
            f"updates      {trainer.global_step}"
            + (f" ({updates} in this fit)" if self.start_step else "")
            + f" in {format_seconds(seconds)} ({updates / max(seconds, 1e-9):.1f} updates/s)"
        ]
        metrics = trainer.callback_metrics
        if "eval/return" in metrics:
            final = f"eval/return {float(metrics['eval/return']):.1f}"
            if "eval/normalized_score" in metrics:
                final += f", eval/normalized_score {float(metrics['eval/normalized_score']):.1f}"
            lines.append(f"final        {final} (after {trainer.global_step} updates)")
        csv = self.metrics_csv(trainer)
        history = read_metrics(csv) if csv is not None else {}
        if "online/env_steps" in history:  # an online fine-tuning run
            lines.append(f"online       {int(history['online/env_steps'][1][-1])} env steps collected (any warm-up included)")
        if "eval/return" in history:
            steps, values = history["eval/return"]
            if steps[0] == 0:  # an online phase's evaluation of the policy it starts from: not this fit's, and no checkpoint of it
                lines.insert(1, f"start        eval/return {values[0]:.1f} (the starting policy, before any update)")
                steps, values = steps[1:], values[1:]
            if len(steps) > 1:  # the best of this fit's evaluations, the one the best checkpoint holds
                best = int(np.argmax(values))
                lines.append(f"best         eval/return {values[best]:.1f} after {int(steps[best])} updates")
        checkpoints = [cb.last_model_path for cb in trainer.checkpoint_callbacks if cb.last_model_path]
        checkpoints += [cb.best_model_path for cb in trainer.checkpoint_callbacks if cb.best_model_path]
        if checkpoints:
            lines.append(f"checkpoints  {', '.join(dict.fromkeys(checkpoints))}")
        plots = [curve] if curve else []
        if csv is not None and (csv.parent / "return_conditioning.png").is_file():
            plots.append(csv.parent / "return_conditioning.png")
        if plots:
            lines.append(f"plots        {', '.join(map(str, plots))}")
        run_dir = self.run_dir(trainer)
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            summary = run_dir / "run_summary.json"
            summary.write_text(json.dumps(self.summary(trainer, pl_module, seconds, history), indent=2) + "\n")
            lines.append(f"summary      {summary}")
        outcome = "done"
        if self.time_limit_reached(trainer):
            outcome = "stopped at --trainer.max_time"
            lines.append("continue     --ckpt_path last with a larger --trainer.max_time (it counts the resumed fits' time too)")
        print(f"\n{name}: {outcome}\n" + "\n".join(f"  {line}" for line in lines), flush=True)


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def last_good_checkpoint(trainer: L.Trainer) -> str:
    """The newest checkpoint this run has written (last or best), or "none written yet"."""
    written = [Path(p) for cb in trainer.checkpoint_callbacks for p in (cb.last_model_path, cb.best_model_path) if p and Path(p).is_file()]
    return str(max(written, key=lambda p: p.stat().st_mtime)) if written else "none written yet"


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or parameter."""


class DivergenceGuard(Callback):
    """Stops training after a non-finite loss, naming the first update that gave one, and refuses to write a
    checkpoint with a non-finite tensor or after such an update, so the last checkpoint on disk is the last good one.

    The losses are checked on their device at every update (no host synchronisation: on a GPU the update never
    waits for it); the host reads the verdict every `log_every_n_steps` updates, at epoch ends and before every
    checkpoint, so a run stops at most `log_every_n_steps` updates after it diverged."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_bad: torch.Tensor | None = None  # (): the first update with a non-finite loss, -1 while none
        self.bad_losses: dict[str, torch.Tensor] = {}  # the losses of that update

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        losses = outputs if isinstance(outputs, dict) else {"loss": outputs}
        losses = {k: v.detach().float().reshape(-1).mean() for k, v in losses.items() if isinstance(v, torch.Tensor)}
        if not losses:
            return
        values = torch.stack(list(losses.values()))
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=values.device)
        first = (self.first_bad < 0) & ~values.isfinite().all()
        self.first_bad = torch.where(first, trainer.global_step, self.first_bad)
        self.bad_losses = {k: torch.where(first, v, self.bad_losses.get(k, v)) for k, v in losses.items()}
        epoch_end = batch_idx + 1 >= trainer.num_training_batches or trainer.global_step >= trainer.max_steps > 0
        if (trainer.global_step + 1) % trainer.log_every_n_steps == 0 or epoch_end:  # when the host reads the logs; before evaluations
            self.check(trainer, pl_module)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Raise DivergenceError if an update so far gave a non-finite loss (reads one number from the device)."""
        if self.first_bad is not None and int(self.first_bad) >= 0:
            bad = ", ".join(f"{k} = {float(v):g}" for k, v in self.bad_losses.items() if not torch.isfinite(v))
            raise DivergenceError(self.message(trainer, pl_module, f"update {int(self.first_bad)} gave {bad}"))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.check(trainer, pl_module)
        for name, tensor in checkpoint["state_dict"].items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise DivergenceError(self.message(trainer, pl_module, f"parameter {name} is non-finite after update {trainer.global_step}"))

    @staticmethod
    def message(trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> str:
        checkpoint = last_good_checkpoint(trainer)
        return (
            f"{type(pl_module).__name__} diverged: {what}. Training stopped; no checkpoint of the diverged model was "
            f"written (last good checkpoint: {checkpoint}). Lower the learning rates, check the data's scale, or "
            "resume from the last good checkpoint with another seed."
        )


def progress(ready: int, started: int, processed: int, completed: int) -> dict[str, int]:
    return {"ready": ready, "started": started, "processed": processed, "completed": completed}


def resume_after_update(fit_loop: dict[str, Any], steps_per_epoch: int) -> None:
    """Rewrite a checkpoint's saved fit-loop progress to what Lightning restores as "update n done", n being the
    updates the checkpoint holds, with epochs of `steps_per_epoch` updates: mid-epoch, the state of a checkpoint
    written at the end of update n (the rest of the epoch follows); at an epoch's end, the state of a finished epoch
    (the next starts afresh). Lightning's own state depends on the hook that wrote the checkpoint (a batch end, an
    epoch end, or the end of a fit stopped by max_steps mid-epoch), and from the last two a resumed run stops at the
    old epoch count; rewritten, it continues to any budget, with the epoch boundaries of a straight run."""
    batches = fit_loop["epoch_loop.batch_progress"]
    n = int(batches["total"]["processed"])  # updates made (one batch is one update)
    if n == 0:
        return
    epochs, done = divmod(n, steps_per_epoch)
    if done == 0:  # a whole number of epochs: all finished, none started
        fit_loop["epoch_progress"] = {k: progress(epochs, epochs, epochs, epochs) for k in ("total", "current")}
        batches |= {"total": progress(n, n, n, n), "current": progress(0, 0, 0, 0), "is_last_batch": False}
        fit_loop["epoch_loop.state_dict"]["_batches_that_stepped"] = n
    else:  # inside epoch `epochs`, `done` of its updates made
        fit_loop["epoch_progress"] = {k: progress(epochs + 1, epochs + 1, epochs, epochs) for k in ("total", "current")}
        batches |= {"total": progress(n, n, n, n - 1), "current": progress(done, done, done, done - 1), "is_last_batch": False}
        fit_loop["epoch_loop.state_dict"]["_batches_that_stepped"] = n - 1


class ExactResume(Callback):
    """Saves every random number generator the run draws from (torch CPU and CUDA, numpy, random) with
    the checkpoint and restores them on resume. With the DataModule's update-indexed batch stream, a
    resumed run repeats the uninterrupted one exactly on CPU, to any budget: the checkpoint's loop state is
    read as "n updates made" (`resume_after_update`), whichever hook wrote it."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        steps_per_epoch = getattr(trainer.datamodule, "steps_per_epoch", None)
        if steps_per_epoch is not None and "loops" in checkpoint:  # called before Lightning restores the loops from it
            resume_after_update(checkpoint["loops"]["fit_loop"], steps_per_epoch)

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        version, state, gauss = random.getstate()
        out = {
            "torch": torch.get_rng_state(),
            "numpy": {
                "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                "pos": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "gauss": float(np_state[4]),
            },
            "random": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        }
        if torch.cuda.is_available():
            out["cuda"] = torch.cuda.get_rng_state_all()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        r = state["random"]
        random.setstate((r["version"], tuple(int(x) for x in r["state"]), r["gauss"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
