"""Loading is strict: a model folder (`from_pretrained`) or a checkpoint (`load_checkpoint`) that lacks a tensor of its
model is refused in one line that names the tensor, never loaded with the fresh initialisation in the tensor's place."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import safetensors.torch
import torch
from test_contract import TINY
from test_export import SPEC

from dtlab.algos import ALGORITHMS, OfflineRLModule
from dtlab.checkpoints import CheckpointError, load_checkpoint, read_checkpoint
from dtlab.cli import main
from dtlab.hub import from_pretrained, save_pretrained


def one_per_module(names: list[str]) -> list[str]:
    """The first tensor of each module two levels down (policy.actor, critic.weights, log_alpha, ...): every network
    a non-strict load could leave at its initialisation, without loading once per tensor."""
    first: dict[str, str] = {}
    for name in sorted(names):
        first.setdefault(".".join(name.split(".")[:2]), name)
    return list(first.values())


def tiny(name: str) -> OfflineRLModule:
    torch.manual_seed(0)
    return ALGORITHMS[name](SPEC, **TINY[name])


def save_checkpoint(model: OfflineRLModule, path: Path) -> None:
    """The checkpoint Lightning writes for the model (hyperparameters, dtlab's algorithm name, state), without a fit."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)


def assert_refused_naming(load, tensor: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load()
    message = str(info.value)
    assert f"missing: ['{tensor}']" in message and "\n" not in message, message


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_model_folder_without_a_tensor_is_refused_naming_it(name, tmp_path):
    model = tiny(name)
    save_pretrained(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    saved = safetensors.torch.load_file(weights)
    assert sorted(saved) == sorted(model.state_dict()), "the folder holds every tensor of the model"
    for tensor in one_per_module(list(saved)):
        safetensors.torch.save_file({k: v for k, v in saved.items() if k != tensor}, weights, metadata={"format": "pt"})
        assert_refused_naming(lambda: from_pretrained(tmp_path), tensor)
    safetensors.torch.save_file(saved, weights, metadata={"format": "pt"})
    loaded = from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items()), "the whole folder loads as saved"


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_checkpoint_without_a_tensor_is_refused_naming_it(name, tmp_path, capsys):
    model = tiny(name)
    save_checkpoint(model, tmp_path / "full.ckpt")
    checkpoint = read_checkpoint(tmp_path / "full.ckpt")
    loaded = load_checkpoint(tmp_path / "full.ckpt").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items()), "the whole checkpoint loads as saved"
    cut = tmp_path / "cut.ckpt"
    tensors = one_per_module(list(checkpoint["state_dict"]))
    for tensor in tensors:
        torch.save(checkpoint | {"state_dict": {k: v for k, v in checkpoint["state_dict"].items() if k != tensor}}, cut)
        assert_refused_naming(lambda: load_checkpoint(cut), tensor)

    # through the CLI: one line, and nothing written
    with pytest.raises(SystemExit):
        main(["export", str(cut), "--out", str(tmp_path / "policy.pt"), "--format", "torchscript"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("dtlab: error: ") and len(err.splitlines()) == 1 and tensors[-1] in err, err
    assert not (tmp_path / "policy.pt").exists()

    # a tensor of another shape (other sizes than the hyperparameters give) is named too
    tensor = tensors[0]
    state = checkpoint["state_dict"] | {tensor: torch.zeros(*checkpoint["state_dict"][tensor].shape, 2)}
    torch.save(checkpoint | {"state_dict": state}, cut)
    with pytest.raises(CheckpointError, match=f"does not fit the {name} .*{tensor}"):
        load_checkpoint(cut)


def test_ckpt_path_last_takes_the_newest_complete_run_of_its_kind(tmp_path):
    """`--ckpt_path last` picks by modification time, newest first, and only among runs of the same kind (online
    fine-tuning or offline), skipping an unreadable file with a warning."""
    import os
    import warnings

    from dtlab.checkpoints import newest_complete_checkpoint

    def write(version: int, mtime: int, online: bool = False, broken: bool = False) -> Path:
        path = tmp_path / f"version_{version}" / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        torch.save({"callbacks": {"OnlineFinetuning": {}} if online else {}}, path)
        if broken:
            path.write_bytes(path.read_bytes()[:20])
        os.utime(path, (mtime, mtime))
        return path

    older, newer = write(0, 1000), write(1, 2000)
    online = write(2, 3000, online=True)
    write(3, 4000, broken=True)  # the newest, cut short by a kill
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert newest_complete_checkpoint(tmp_path, online=False) == (newer, newer.parent.parent)
        assert newest_complete_checkpoint(tmp_path, online=True) == (online, online.parent.parent)
    assert sum("skipping" in str(w.message) and "version_3" in str(w.message) for w in caught) == 2
    os.utime(older, (5000, 5000))
    assert newest_complete_checkpoint(tmp_path, online=False)[0] == older
