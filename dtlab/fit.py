"""`dtlab fit`: a LightningCLI over every algorithm and the one DataModule (`dtlab.cli.main` imports it for fit only).

    dtlab fit -c conf/iql.yaml --data.dataset_id halfcheetah/medium-v0
    dtlab fit -c conf/iql.yaml --ckpt_path last          # resume the newest run of this config
    dtlab fit --model iql --print_config                 # an algorithm by name, in any case

`conf/base.yaml` (trainer, loggers, checkpointing, evaluation, data) is read first; each
`conf/<algo>.yaml` holds only what differs from it and from the algorithm's signature defaults.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dtlab.algos import ALGORITHMS, OfflineRLModule
from dtlab.callbacks import DivergenceGuard, EnvEvaluation, ExactResume, RunReport
from dtlab.checkpoints import CheckpointError, check_hyperparameters, newest_complete_checkpoint, read_checkpoint
from dtlab.cli import HelpFormatter
from dtlab.commands import UsageError
from dtlab.data.module import OfflineDataModule
from dtlab.envs import trust_entry_point

BASE_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "base.yaml"


def algorithm_choices() -> str:
    return ", ".join(name if cls.run_name == name.lower() else f"{name} ({cls.run_name})" for name, cls in ALGORITHMS.items())


def algorithm_names(args: list[str]) -> list[str]:
    """`--model NAME` and `--model.help NAME` with NAME an algorithm in any case or its run name (iql, td3bc, dt, as
    the configs are named) as the class name; anything else is left to the parser (ArgumentParser.error)."""
    names = {alias.lower(): name for name, cls in ALGORITHMS.items() for alias in (name, cls.run_name)}
    out = list(args)
    for i, arg in enumerate(out):
        option, equals, value = arg.partition("=")
        if option in ("--model", "--model.help"):
            if equals:
                out[i] = f"{option}={names.get(value.lower(), value)}"
            elif i + 1 < len(out):
                out[i + 1] = names.get(out[i + 1].lower(), out[i + 1])
    return out


def warn_options_before_config(args: list[str]) -> None:
    """Options apply left to right, so a config file given after an option sets again what the option set, and one
    that names another model drops every `--model.init_args` option before it, silently. Say so, on stderr."""
    early: list[str] = []
    for i, arg in enumerate(args):
        option = arg.partition("=")[0]
        if option in ("-c", "--config") and early:
            path = arg.partition("=")[2] or (args[i + 1] if i + 1 < len(args) else "")
            print(
                f"dtlab fit: {', '.join(early)} come before -c {path}: options apply left to right, so the config file overrides "
                "what they set (and a model it names drops their --model.init_args). Put -c first.",
                file=sys.stderr,
                flush=True,
            )
            return
        if option.startswith("--") and option not in ("-c", "--config"):
            early.append(option)


class ArgumentParser(LightningArgumentParser):
    """Lightning's parser; an error in --model or its options is one line (exit status 2, as any other parse error),
    not the usage and a union dump."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # jsonargparse's inner parsers (exit_on_error=False) raise errors it catches to try other types: leave those be
        if self.exit_on_error and message.startswith(('Parser key "model"', "--model.help")):
            print(f"dtlab: error: {model_error(message)}", file=sys.stderr)
            self.exit(2)
        super().error(message, ex)


def model_error(message: str) -> str:
    """jsonargparse's error about --model as one line: the option at fault, what is wrong, the choices."""
    problem = re.search(r"class_path '(?:[\w.]+\.)?(\w+)':\s*(.*?)\n\s*- Expected a <class 'NoneType'>", message, re.S)
    algorithm, detail = (problem.group(1), " ".join(problem.group(2).split())) if problem else ("", "")
    unknown = re.fullmatch(r"Option '(\w+)' is not accepted", detail)
    if unknown and algorithm in ALGORITHMS:
        option = unknown.group(1)
        others = [name for name, cls in ALGORITHMS.items() if option in inspect.signature(cls).parameters]
        where = f" (an option of {', '.join(others)})" if others else ""
        return f"--model.init_args.{option}: {algorithm} has no option '{option}'{where}; `dtlab fit --model.help {algorithm}` lists its options."
    bad_value = re.fullmatch(r'Parser key "(\w+)": (.*)', detail)
    if bad_value:
        return f"--model.init_args.{bad_value.group(1)}: {bad_value.group(2)}"
    given = re.search(r"Expected a dot import path string: (\S+)", message) or re.search(r"Given value: (.+)", message)
    option = "--model.help" if message.startswith("--model.help") else "--model"
    what = f"{option} {given.group(1)}: " if given else message.splitlines()[0].rstrip(":") + ": "
    return (
        f"{what}{detail or 'not an algorithm'}; the algorithms are {algorithm_choices()} "
        "(any case on the command line; class_path: dtlab.algos.<Name> in a config)."
    )


class ProgressBar(TQDMProgressBar):
    """One line per epoch with the metrics' full names (no `v_num`); evaluation shows its own episode bar."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class DTLabCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # Evaluation is a callback of `fit` (and `dtlab evaluate` for a checkpoint): Lightning's
        # validate/test/predict loops have nothing to run here, so they are not offered.
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path's hyperparameters into the config and resolves the class path they name.
        # Check the file first: a pickled, truncated or foreign checkpoint, a class path that is not a registered
        # algorithm or a hyperparameter the algorithm does not take gives dtlab's one-line error, and nothing is imported.
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if ckpt_path and Path(ckpt_path).is_file():
            hparams = read_checkpoint(ckpt_path).get("hyper_parameters") or {}
            class_path = hparams.get("_class_path")
            if class_path is not None:
                registered = {f"dtlab.algos.{name}": cls for name, cls in ALGORITHMS.items()}
                if class_path not in registered:
                    raise CheckpointError(
                        f"Checkpoint {ckpt_path}: hyper_parameters._class_path {class_path!r} is not a dtlab algorithm "
                        f"({', '.join(registered)}); dtlab never imports a class path stored in a file."
                    )
                check_hyperparameters(registered[class_path], hparams, f"Checkpoint {ckpt_path}")
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Dimensions, normalisation and references come from the data, never from the config.
        parser.link_arguments("data.spec", "model.init_args.spec", apply_on="instantiate")
        parser.add_lightning_class_args(EnvEvaluation, "evaluation")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # the best checkpoint is judged at evaluations only
        parser.link_arguments("evaluation.every_n_epochs", "checkpoint.every_n_epochs", compute_fn=int)
        parser.add_argument(
            "--runs_dir",
            type=str | None,
            default=None,
            help="Folder for this run's logs and checkpoints, in place of 'runs' in every logger's save_dir "
            "(runs/<algorithm>/version_N, runs/tensorboard/...).",
        )
        parser.add_argument(
            "--pretrained",
            type=str | None,
            default=None,
            help="Warm-start from a checkpoint (.ckpt), a model folder or a Hub repo id of the same algorithm, sizes and spaces: "
            "fine-tune it on this config's data.",
        )
        parser.add_argument(
            "--env_entry_point",
            type=str | None,
            default=None,
            help="Build the data's environment from this entry point (module:Class) when its id is not in gymnasium's registry. "
            "dtlab never imports an entry point stored in a dataset or checkpoint unless it is named here (importing runs its code).",
        )
        parser.add_argument(
            "--torch_threads",
            type=int,
            default=1,
            help="CPU threads per process for torch ops. RL networks are small: one thread is fastest and "
            "never oversubscribes cores shared with env stepping or other ranks (0 keeps torch's default).",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        class_name = config.model.class_path.rsplit(".", 1)[-1]
        algorithm = ALGORITHMS[class_name].run_name if class_name in ALGORITHMS else class_name.lower()
        loggers = [lg for lg in config.trainer.logger if hasattr(lg, "init_args")] if isinstance(config.trainer.logger, list) else []
        for logger in loggers:
            if "name" in logger.init_args and logger.init_args.name is None:
                logger.init_args.name = algorithm  # runs/<algorithm>/version_N
            save_dir = Path(logger.init_args.get("save_dir") or "")
            if config.runs_dir is not None and save_dir.parts[:1] == ("runs",):
                logger.init_args.save_dir = str(Path(config.runs_dir, *save_dir.parts[1:]))
        seeds = config.model.init_args.get("seeds") if hasattr(config.model, "init_args") else None
        if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):  # before the data is loaded
            raise UsageError(f"--model.init_args.seeds {list(seeds)}: give distinct integer seeds, one per member, e.g. '[0, 1, 2, 3, 4]'.")
        if config.env_entry_point:
            trust_entry_point(config.env_entry_point)
        check_budget(config.trainer.max_steps, config.trainer.max_epochs)
        if config.ckpt_path == "last":
            config.ckpt_path = self.resume_last(loggers, online=any(is_online_phase(cb) for cb in config.trainer.callbacks or []))
        trainer = config.trainer
        if trainer.enable_progress_bar is False:  # Lightning refuses a progress bar callback then
            self.trainer_defaults["callbacks"] = [cb for cb in self.trainer_defaults["callbacks"] if not isinstance(cb, TQDMProgressBar)]
        if config.evaluation.episodes == 0 and config.checkpoint.monitor in ("eval/return", "eval/normalized_score"):
            config.checkpoint.monitor, config.checkpoint.save_top_k = None, 0  # no evaluation, no "best": last.ckpt only
        if trainer.max_steps is not None and trainer.max_steps > 0:  # updates decide: epochs follow (the bar says "Epoch k/K" right)
            trainer.max_epochs = -(-trainer.max_steps // config.data.steps_per_epoch)

    def before_fit(self) -> None:
        if self.config.fit.pretrained:
            from dtlab.hub import warm_start

            warm_start(self.model, self.config.fit.pretrained)

    @staticmethod
    def resume_last(loggers: list[Any], online: bool) -> str:
        """`--ckpt_path last`: the newest complete last.ckpt of this run name written by a run of the same kind (online
        fine-tuning or offline); its loggers continue its version."""
        if not loggers:
            raise CheckpointError("--ckpt_path last needs a logger (the run folder to resume); give the checkpoint file instead.")
        first = loggers[0].init_args
        run_dir = Path(first.save_dir) / first.name
        found = newest_complete_checkpoint(run_dir, online)
        if found is None:
            kind = "online fine-tuning" if online else "offline"
            raise CheckpointError(
                f"--ckpt_path last: no complete checkpoint of an {kind} run under {run_dir}/version_*/checkpoints/last.ckpt. "
                "Start without --ckpt_path, or pass a checkpoint file."
            )
        ckpt, version_dir = found
        version = int(version_dir.name.removeprefix("version_"))
        for logger in loggers:
            if "version" in logger.init_args:
                logger.init_args.version = version
        return str(ckpt)


def is_online_phase(callback: Any) -> bool:
    """Whether a callback of the config (a class_path entry) is an online phase (dtlab.online)."""
    name = str(getattr(callback, "class_path", "")).rsplit(".", 1)[-1]
    return name in ("OnlineFinetuning", "OnlineDecisionTransformer")


def check_budget(max_steps: int | None, max_epochs: int | None) -> None:
    """Refuse a budget that trains nothing (or that Lightning would reject with a traceback), before any data is loaded."""
    for option, value in (("--trainer.max_steps", max_steps), ("--trainer.max_epochs", max_epochs)):
        if value is not None and (value == 0 or value < -1):
            raise UsageError(f"{option} {value}: give a positive number of {'updates' if 'steps' in option else 'epochs'} (or -1: no limit).")


DESCRIPTION = """dtlab: offline reinforcement learning on PyTorch Lightning.

Train a policy from logged data (a Minari dataset) with one of dtlab's algorithms:

    dtlab fit -c conf/dt.yaml                                   # the embedded Pendulum data, no download
    dtlab fit -c conf/iql.yaml --data.dataset_id halfcheetah/medium-v0
    dtlab fit -c conf/iql.yaml --print_config                   # every setting and its default
    dtlab fit --model.help IQL                                  # one algorithm's arguments
"""


def fit_description() -> str:
    lines = [f"    {name:<20} {(cls.__doc__ or '').strip().splitlines()[0]}" for name, cls in ALGORITHMS.items()]
    return "Train an algorithm (--model NAME, or -c conf/<algo>.yaml). The algorithms:\n\n" + "\n".join(lines)


def run_cli(args: list[str] | None = None) -> DTLabCLI:
    """Parse `args` (default: sys.argv), instantiate and run the subcommand; returns the CLI object."""
    base = [str(BASE_CONFIG)] if BASE_CONFIG.exists() else []
    if args is None:  # from the shell: LightningCLI reads sys.argv itself
        sys.argv[1:] = algorithm_names(sys.argv[1:])
    warn_options_before_config(sys.argv[1:] if args is None else args)
    return DTLabCLI(
        OfflineRLModule,
        OfflineDataModule,
        subclass_mode_model=True,
        args=None if args is None else algorithm_names(args),
        parser_class=ArgumentParser,
        auto_configure_optimizers=False,  # each algorithm builds its own optimisers (several, with schedules)
        parser_kwargs={
            "prog": "dtlab",
            "description": DESCRIPTION,
            "formatter_class": HelpFormatter,
            "fit": {"default_config_files": base, "description": fit_description(), "formatter_class": HelpFormatter},
        },
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "num_sanity_val_steps": 0,
            "plugins": [{"class_path": "dtlab.checkpoints.AtomicCheckpointIO"}],
            # Always on, whatever the config: the guard, exact resume, the run report (learning curve and summary),
            # the progress bar, and last.ckpt at every epoch end (`checkpoint` in conf/base.yaml keeps the best beside it).
            "callbacks": [
                DivergenceGuard(),
                ExactResume(),
                RunReport(),
                ProgressBar(),
                ModelCheckpoint(filename="last", enable_version_counter=False, save_on_train_epoch_end=True),
            ],
        },
    )
