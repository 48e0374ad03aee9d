"""The `dtlab` command: the overview, `--version` and each command's `--help` import no torch or Lightning;
`dtlab fit` runs the LightningCLI of dtlab/fit.py, the other commands the typed functions of dtlab/commands.py.

    dtlab fit -c conf/iql.yaml --data.dataset_id halfcheetah/medium-v0
    dtlab evaluate runs/iql/version_0/checkpoints/last.ckpt --episodes 20
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from collections.abc import Callable
from typing import Any

from jsonargparse import DefaultHelpFormatter, auto_cli

from dtlab.commands import COMMANDS

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


# The errors a user can fix, printed as one line: (module, class). An error's class is loaded when it is raised, so
# checking needs no import (DatasetError covers SpecMismatchError).
USER_ERRORS = (
    ("dtlab.spec", "DatasetError"),
    ("dtlab.checkpoints", "CheckpointError"),
    ("dtlab.callbacks", "DivergenceError"),
    ("dtlab.online", "OnlineError"),
    ("dtlab.commands", "UsageError"),
    ("dtlab.algos.members", "MembersError"),
    ("dtlab.hub", "HubError"),
)


def user_error(err: BaseException) -> bool:
    return any(isinstance(err, getattr(sys.modules[module], name)) for module, name in USER_ERRORS if module in sys.modules)


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
            from dtlab.fit import run_cli

            run_cli(None if from_shell else argv)  # None: LightningCLI reads sys.argv itself (and does not warn)
        else:
            run_command(argv)
    except Exception as err:
        if not user_error(err) or os.environ.get("DTLAB_DEBUG"):
            raise
        print(f"dtlab: error: {err}", file=sys.stderr)
        sys.exit(1)


def __getattr__(name: str) -> Any:  # `from dtlab.cli import run_cli, DTLabCLI` as before the split, importing Lightning then
    if name in ("run_cli", "DTLabCLI"):
        from dtlab import fit

        return getattr(fit, name)
    raise AttributeError(f"module 'dtlab.cli' has no attribute {name!r}")


if __name__ == "__main__":  # python -m dtlab.cli (torchrun -m dtlab.cli fit ...)
    main()
