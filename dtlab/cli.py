"""`dtlab` command line: a LightningCLI over every algorithm and the one DataModule.

    dtlab fit -c conf/iql.yaml --data.dataset_id halfcheetah/medium-v0
    dtlab fit -c conf/iql.yaml --ckpt_path last          # resume the newest run of this config

`conf/base.yaml` (trainer, loggers, checkpointing, evaluation, data) is read first; each
`conf/<algo>.yaml` holds only what differs from it and from the algorithm's signature defaults.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from jsonargparse import DefaultHelpFormatter, auto_cli
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dtlab.algos import ALGORITHMS, OfflineRLModule
from dtlab.algos.members import MembersError
from dtlab.callbacks import DivergenceError, DivergenceGuard, EnvEvaluation, ExactResume, RunReport
from dtlab.checkpoints import CheckpointError, check_hyperparameters, newest_complete_checkpoint, read_checkpoint
from dtlab.commands import COMMANDS, UsageError
from dtlab.data.module import OfflineDataModule
from dtlab.envs import trust_entry_point
from dtlab.hub import HubError
from dtlab.online import OnlineError
from dtlab.spec import DatasetError

BASE_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "base.yaml"

# Lightning 2.6 on torch 2.13 warns once per fit about its own use of a deprecated torch API: noise to users.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# dtlab's batch stream is indexed by the update, so a checkpoint saved mid-epoch resumes exactly.
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
# Lightning counts log_every_n_steps across epochs (and so does dtlab): short epochs still log, so its
# warning that they will not is noise.
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
# A resumed run continues its own folder: dtlab's CSVLogger keeps the rows Lightning's warning says it deletes.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


class NoAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip" adverts for its cloud products from every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NoAdverts())


class HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with descriptions printed as written (examples keep their lines)."""


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

OVERVIEW = """usage: dtlab <command> [options]      (dtlab <command> --help for each command's options; dtlab --version)

dtlab: offline reinforcement learning on PyTorch Lightning: learn policies from logged data (Minari datasets)
with Decision Transformer, CQL, IQL, TD3+BC, Cal-QL or BC; score them in their environment; plot them.

commands:
  fit            train an algorithm from a config:  dtlab fit -c conf/dt.yaml
  make-dataset   record a policy (random, scripted, a checkpoint, module:function) into a Minari dataset
  evaluate       score a checkpoint in its environment (--json, --target_return for DT, --video)
  plot           learning curves of one or many runs (seeds as mean ± band) from their metrics.csv
  save           write a model folder: model.safetensors, config.json, a model card, the run's plots
  push           upload a model with its card to the HuggingFace Hub (evaluate accepts the repo id)
  export         write a policy as ONNX or TorchScript, normalisation and action scaling inside
  member         split a run of seeds as members (--model.init_args.seeds) into single-seed checkpoints
  push-dataset   upload a trajectory dataset with its card to the Hub (then --data.dataset_id hf:USER/NAME)
  import-transformers   a transformers DecisionTransformerModel folder as a dtlab model (evaluate, fine-tune)
  ope            estimate policies' values from a dataset alone (Fitted Q Evaluation), no environment needed
  scale          scaling study: a grid of fits over devices, model size, batch size and data; CSV, plots, power laws

Start with `dtlab fit -c conf/dt.yaml`: a Decision Transformer on the embedded Pendulum data (built locally,
no download), about 3 minutes on one CPU core. Its run folder gets metrics.csv, learning_curve.png,
return_conditioning.png and checkpoints.
"""


def version_line() -> str:
    """dtlab's version and its main libraries' (read from the installed metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from dtlab import __version__

    def installed(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    libraries = ", ".join(installed(name) for name in ("torch", "lightning", "transformers", "minari", "gymnasium"))
    return f"dtlab {__version__} (python {sys.version.split()[0]}; {libraries})"


def fit_description() -> str:
    lines = [f"    {name:<20} {(cls.__doc__ or '').strip().splitlines()[0]}" for name, cls in ALGORITHMS.items()]
    return "Train an algorithm (--model NAME, or -c conf/<algo>.yaml). The algorithms:\n\n" + "\n".join(lines)


def run_cli(args: list[str] | None = None) -> DTLabCLI:
    """Parse `args` (default: sys.argv), instantiate and run the subcommand; returns the CLI object."""
    base = [str(BASE_CONFIG)] if BASE_CONFIG.exists() else []
    if args is None:  # from the shell: LightningCLI reads sys.argv itself
        sys.argv[1:] = algorithm_names(sys.argv[1:])
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


def run_command(argv: list[str]) -> Any:
    """`dtlab <command> ...` for the commands besides fit (dtlab.commands): jsonargparse over their signatures."""
    name = argv[0]
    args = shell_style(COMMANDS[name], argv[1:])
    description = (inspect.getdoc(COMMANDS[name]) or "").split("\nArgs:")[0].strip()  # the whole text, examples included
    return auto_cli(COMMANDS[name], args=args, prog=f"dtlab {name}", formatter_class=HelpFormatter, description=description)


def shell_style(function: Callable, args: list[str]) -> list[str]:
    """Command lines as shells write them, for jsonargparse: a bare boolean option (`--json` at the end or before
    another option) means `--json true`; a list-typed first parameter takes every leading word (`dtlab plot a b`)."""
    parameters = list(inspect.signature(function).parameters.values())
    flags = {f"--{p.name}" for p in parameters if p.annotation in (bool, "bool")}
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in flags and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("true")
    if parameters and str(parameters[0].annotation).startswith("list[") and out and not out[0].startswith("-"):
        words = next((i for i, a in enumerate(out) if a.startswith("-")), len(out))
        out = [json.dumps(out[:words]), *out[words:]]
    return out


USER_ERRORS = (DatasetError, CheckpointError, DivergenceError, OnlineError, UsageError, MembersError, HubError)  # DatasetError covers SpecMismatchError


def main(argv: list[str] | None = None) -> None:
    """Console entry point `dtlab`: errors the user can fix print as one message (DTLAB_DEBUG=1 for the traceback)."""
    from_shell = argv is None
    argv = sys.argv[1:] if from_shell else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        print(version_line())
        sys.exit(0)
    if argv == ["fit"]:
        sys.exit(
            "dtlab fit needs an algorithm: start from a config, e.g. `dtlab fit -c conf/dt.yaml` (a Decision Transformer on the\n"
            "embedded Pendulum data, no download) or `dtlab fit -c conf/iql.yaml --data.dataset_id <minari id>`; `dtlab fit --help` lists them."
        )
    if argv[0] not in ("fit", *COMMANDS):
        sys.exit(f"dtlab: unknown command {argv[0]!r}; the commands are fit, {', '.join(COMMANDS)} (dtlab --help).")
    try:
        if argv[0] == "fit":
            run_cli(None if from_shell else argv)  # None: LightningCLI reads sys.argv itself (and does not warn)
        else:
            run_command(argv)
    except USER_ERRORS as err:
        if os.environ.get("DTLAB_DEBUG"):
            raise
        print(f"dtlab: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":  # python -m dtlab.cli (torchrun -m dtlab.cli fit ...)
    main()
