"""Bad input gives an error that names the problem and the fix, also through ``python train.py``.

The other bad inputs are tested where their code is: config values in test_config_checks.py; an
unknown loss or loss option and a context longer than the model's in test_train.py and
tests/losses/test_registry.py; a target id out of range in tests/losses/test_losses.py; an empty,
missing, binary or non-regular corpus, one smaller than a context window or a batch, and non-UTF-8
text in data/test_datamodule.py; damaged JSON Lines and Parquet files in data/test_records.py; damaged
checkpoints in test_checkpoint_files.py.
"""

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import CONF, make_config, make_datamodule, train_py

from losslab.files import DataError
from losslab.train import train


@pytest.mark.whole_registry
def test_a_misspelt_group_choice_gets_did_you_mean_in_one_line(tmp_path):
    run = train_py(tmp_path, "loss=fusd")
    assert run.returncode != 0
    choices = ", ".join(sorted(path.stem for path in (CONF / "loss").glob("*.yaml")))
    assert run.stderr.strip().splitlines() == [
        f"error: unknown loss choice fusd (in loss=fusd): did you mean loss=fused? (or one of {choices})"
    ]


def test_a_command_line_error_is_named_before_lightning_is_imported():
    """(the import takes about 7 s of a small CPU, which a typo would wait for)"""
    code = "\n".join(
        [
            "import sys",
            "from losslab.command_line import main",
            "sys.argv = ['train.py', 'lossx=1']",
            "try:",
            "    main()",
            "except SystemExit as exit:",
            "    print(exit.code, '| lightning imported:', 'lightning' in sys.modules)",
        ]
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.startswith("error: unknown config key lossx (in lossx=1): did you mean loss?")
    assert run.stdout.strip().endswith("| lightning imported: False")


def test_a_corpus_error_is_one_line_and_leaves_no_run_folder(tmp_path, cache_dir):
    # a DataError: train.py prints it as the one line below (tests/test_run_lifecycle.py runs it on a ConfigError)
    (tmp_path / "zeros.txt").write_bytes(bytes(10_000))
    with pytest.raises(DataError) as error:
        train(make_config(tmp_path, cache_dir, ["data=text", f"data.path={tmp_path / 'zeros.txt'}"]))
    assert str(error.value) == (
        f"{tmp_path / 'zeros.txt'} is binary, not text (a NUL byte at offset 0, within its first 8,000 "
        "bytes): give text files in data.path (UTF-8)"
    )
    assert not (tmp_path / "run").exists()


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


DAMAGES = {
    "truncated tokens": ".bin: not the size and sha256 recorded",
    "missing offsets": "offsets.npy missing or not a regular file",
    "garbled description": "JSONDecodeError",
    "empty description": "its description is not an object with the files' records",
    "description holding a list": "its description is not an object with the files' records",
    "description of another dtype": "its description gives the tokens as 'uint32', where this tokenizer's are uint16",
    "tokens cut, description updated": "its offsets end at token",
    "token file replaced by a folder": ".bin missing or not a regular file",
    "description replaced by a folder": "json missing or not a regular file",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_token_cache_is_rebuilt(tmp_path, damage):
    tokens = np.array(make_datamodule(tmp_path, tokenizer="bytes").datasets["train"].tokens)
    folder = tmp_path / "cache" / "tokens"
    (name,) = {path.name.split(".")[0] for path in folder.glob("pydoc-train-*")}
    bin_file, description = folder / f"{name}.bin", folder / f"{name}.json"
    meta = json.loads(description.read_text())
    if damage == "truncated tokens":
        with open(bin_file, "r+b") as file:
            file.truncate(len(tokens))
    elif damage == "missing offsets":
        (folder / f"{name}.offsets.npy").unlink()
    elif damage == "description of another dtype":  # the files as they were: it read them as other tokens
        description.write_text(json.dumps({**meta, "dtype": "uint32"}))
    elif damage == "tokens cut, description updated":
        with open(bin_file, "r+b") as file:
            file.truncate(len(tokens))
        record = {"size": len(tokens), "sha256": hashlib.sha256(bin_file.read_bytes()).hexdigest()}
        description.write_text(json.dumps({**meta, "files": {**meta["files"], bin_file.name: record}}))
    elif damage.endswith("replaced by a folder"):
        path = bin_file if damage.startswith("token file") else description
        path.unlink()
        (path / "inside").mkdir(parents=True)
    else:
        description.write_text({"garbled": '{"dtype": "uint16", "fi', "empty": "{}"}.get(damage.split()[0], "[1, 2]"))
    with pytest.warns(UserWarning, match=r"token cache .* is damaged \(.*" + re.escape(DAMAGES[damage])):
        rebuilt = make_datamodule(tmp_path, tokenizer="bytes").datasets["train"].tokens
    np.testing.assert_array_equal(rebuilt, tokens)
