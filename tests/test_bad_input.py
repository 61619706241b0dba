"""Bad input gives an error that names the problem and the fix, also through ``python train.py``.

The other bad inputs are tested where their code is: an unknown loss or loss option and a context
longer than the model's in test_train.py and tests/losses/test_registry.py; a target id out of
range in tests/losses/test_losses.py; an empty or missing corpus, one smaller than a context
window, non-UTF-8 text and a token file whose checksum changed in test_data.py.
"""

import subprocess
import sys

import numpy as np
import pytest
from test_data import make_datamodule
from test_train import CONF, make_config

from losslab.train import train

TRAIN = CONF.parent / "train.py"


def train_py(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(TRAIN), f"paths.root_dir={tmp_path}", *overrides]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_unknown_config_group_option_lists_the_options(tmp_path):
    run = train_py(tmp_path, "loss=nope")
    assert run.returncode != 0
    lines = run.stderr.splitlines()
    assert lines[0] == "In 'train': Could not find 'loss/nope'"
    names = ["cce", "cross_entropy", "fused", "liger", "logsumexp", "naive", "tiled", "torch_lce"]
    assert lines[1 : 3 + len(names)] == ["", "Available options in 'loss':", *(f"\t{name}" for name in names)]


def test_our_errors_end_the_output_of_train_py(tmp_path):
    # Hydra prints the traceback; its last line, the message, is followed only by Hydra's hint.
    run = train_py(tmp_path, "data=text", f"data.path={tmp_path / 'missing.txt'}")
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line]
    assert lines[-2] == (
        f"FileNotFoundError: corpus path {tmp_path / 'missing.txt'} does not exist: "
        "set data.path to a file, a folder or a glob"
    )
    assert lines[-1].startswith("Set the environment variable HYDRA_FULL_ERROR=1")


def test_resuming_a_checkpoint_of_another_model_names_the_differences(tmp_path):
    cache = tmp_path / "cache"
    train(make_config(tmp_path / "first", cache, ["trainer.max_steps=2"]))
    last = tmp_path / "first" / "run" / "checkpoints" / "last.ckpt"
    other = ["model.n_layer=2", "model.n_embd=64", "model.dropout=0.1", f"ckpt_path={last}"]
    with pytest.raises(ValueError) as error:
        train(make_config(tmp_path / "resumed", cache, other))
    assert str(error.value) == (
        "the checkpoint holds another model (n_layer=1 there, 2 here; n_embd=32 there, 64 here): resume "
        "with the model it was trained with (model.*=...), or drop ckpt_path to start anew"
    )
    resumed = ["trainer.max_steps=3", "schedule.total_steps=2", "model.dropout=0.1", f"ckpt_path={last}"]
    train(make_config(tmp_path / "resumed", cache, resumed))


@pytest.mark.parametrize("damage", ["truncated tokens", "missing offsets", "garbled description", "empty description"])
def test_damaged_token_cache_is_rebuilt(tmp_path, damage):
    tokens = np.array(make_datamodule(tmp_path, tokenizer="bytes").datasets["train"].tokens)
    folder = tmp_path / "cache" / "tokens"
    (name,) = {path.name.split(".")[0] for path in folder.glob("pydoc-train-*")}
    if damage == "truncated tokens":
        with open(folder / f"{name}.bin", "r+b") as file:
            file.truncate(len(tokens))
    elif damage == "missing offsets":
        (folder / f"{name}.offsets.npy").unlink()
    else:
        (folder / f"{name}.json").write_text('{"dtype": "uint16", "fi' if damage == "garbled description" else "{}")
    with pytest.warns(UserWarning, match=r"token cache .* is damaged .*: rebuilding it"):
        rebuilt = make_datamodule(tmp_path, tokenizer="bytes").datasets["train"].tokens
    np.testing.assert_array_equal(rebuilt, tokens)
