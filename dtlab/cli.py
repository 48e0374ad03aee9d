"""`dtlab` command line: a LightningCLI over every algorithm and the one DataModule.

    dtlab fit -c conf/bc.yaml --data.dataset_id halfcheetah/medium-v0
    dtlab validate -c conf/bc.yaml --ckpt_path runs/bc/.../last.ckpt
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dtlab.base import OfflineRLModule
from dtlab.data import OfflineDataModule

# Lightning 2.6 on torch 2.13 warns once per fit about its own use of a deprecated torch API: noise to users.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class DTLabCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Dimensions, normalisation and references come from the data, never from the config.
        parser.link_arguments("data.spec", "model.init_args.spec", apply_on="instantiate")
        parser.add_argument(
            "--torch_threads", type=int, default=1,
            help="CPU threads per process for torch ops. RL networks are small: one thread is fastest and "
            "never oversubscribes cores shared with env stepping or other ranks (0 keeps torch's default).",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)


def default_loggers() -> list[dict]:
    """metrics.csv always; TensorBoard event files too when tensorboard is installed."""
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "tensorboard"}})
    return loggers


def run_cli(args: list[str] | None = None) -> DTLabCLI:
    """Parse `args` (default: sys.argv), instantiate and run the subcommand; returns the CLI object."""
    return DTLabCLI(
        OfflineRLModule,
        OfflineDataModule,
        subclass_mode_model=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"num_sanity_val_steps": 0, "logger": default_loggers()},
    )


def main() -> None:
    """Console entry point `dtlab`."""
    run_cli()
