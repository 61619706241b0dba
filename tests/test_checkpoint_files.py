"""Checkpoints hold tensors and plain data only, and are read that way: the tokenizer comes back
from data, a file holding code is refused without running it, and every bad file, whatever is
wrong with it, ends in one line that names it and what to do."""

import hashlib
import os
import pickle
import random
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import DOCUMENTS, REPO, make_config, tokenizer_named

from losslab.checkpoint_files import CheckpointError, check_checkpoint_file, load_checkpoint_file, load_model
from losslab.checkpointing import AtomicCheckpointIO
from losslab.model import GPT, GPTConfig
from losslab.sharding import ShardedDataParallel
from losslab.tokenizers import (
    GPT2_RANKS_SHA256,
    build_tokenizer,
    tokenizer_from_data,
    tokenizer_to_data,
)
from losslab.train import train


class RunsCode:
    """What a pickle can hold: unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    """``last.ckpt`` of a tiny run of train.py."""
    root = tmp_path_factory.mktemp("trained")
    train(make_config(root, root / "cache", ["trainer.max_steps=2"]))
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture
def marker(tmp_path) -> Path:
    """Where a checkpoint's code would leave a file if it ever ran."""
    return tmp_path / "the-code-ran"


def bad_file(kind: str, folder: Path, real_checkpoint: Path, marker: Path) -> Path:
    """A file of ``kind`` that is not a usable checkpoint, in ``folder``."""
    path = folder / f"{kind}.ckpt"
    if kind == "missing":
        pass
    elif kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.touch()
    elif kind == "truncated":
        data = real_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random bytes":
        path.write_bytes(random.Random(0).randbytes(10_000))
    elif kind == "bare state_dict":
        torch.save(GPT(GPTConfig(vocab_size=11, context_length=8, n_layer=1, n_head=1, n_embd=8)).state_dict(), path)
    elif kind == "another program's dict":
        torch.save({"epoch": 3, "state_dict": {"weight": torch.ones(2)}}, path)
    elif kind == "pickled module":
        torch.save(GPT(GPTConfig(vocab_size=11, context_length=8, n_layer=1, n_head=1, n_embd=8)), path)
    elif kind == "code in a checkpoint":
        checkpoint = torch.load(real_checkpoint, weights_only=True)
        torch.save({**checkpoint, "callbacks": RunsCode(marker)}, path)
    elif kind == "bare pickle of code":
        path.write_bytes(pickle.dumps(RunsCode(marker)))
    elif kind == "64 bytes flipped":  # in the middle: a tensor's bytes, which torch.load reads without a word
        data = bytearray(real_checkpoint.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(byte ^ 0xFF for byte in data[middle : middle + 64])
        path.write_bytes(data)
    elif kind == "fifo":  # reading one waits for a writer: it hung generate.py and export.py
        os.mkfifo(path)
    else:
        raise ValueError(kind)
    return path


# what each kind of bad file gets told: after its path, the message ends the line
EXPECTED = {
    "missing": r"does not exist: give the path of a checkpoint \(checkpoints/last.ckpt of a run\)",
    "folder": r"is a folder: give a checkpoint file in it \(checkpoints/last.ckpt of a run\)",
    "empty": r"is empty \(a save that never finished\?\): use an earlier checkpoint, or train anew",
    "truncated": (
        r"is truncated or damaged \(the zip archive's directory, at the end of the file, is missing or damaged\): "
        r"use an earlier checkpoint, or train anew"
    ),
    "64 bytes flipped": (
        r"is truncated or damaged \(archive/data/\d+ does not match its CRC-32\): use an earlier checkpoint, or train anew"
    ),
    "fifo": r"is not a regular file \(a FIFO, socket or device\): give a checkpoint file",
    "random bytes": r"is not a checkpoint \(torch.save writes a zip archive, and this file is not one\)",
    "bare state_dict": r"is not a losslab checkpoint \(it has no gpt_config, state_dict, tokenizer, global_step\)",
    "another program's dict": r"is not a losslab checkpoint \(it has no gpt_config, tokenizer, global_step\)",
    "pickled module": r"holds Python objects other than tensors and plain data \(losslab.model.GPT\)",
    "code in a checkpoint": r"holds Python objects other than tensors and plain data \(posix.system\), which could run code",
    "bare pickle of code": r"is not a checkpoint \(torch.save writes a zip archive, and this file is not one\)",
}


def test_the_code_in_the_test_files_would_run_if_unpickled(marker):
    function, args = RunsCode(marker).__reduce__()
    function(*args)  # what unpickling it, as torch.load(weights_only=False) would, runs
    assert marker.exists()


# a FIFO is tried in a subprocess only (below): read in process, a regression would hang the suite
@pytest.mark.parametrize("kind", [kind for kind in EXPECTED if kind != "fifo"])
def test_a_bad_file_is_refused_in_one_line_by_the_loader(tmp_path, real_checkpoint, marker, kind):
    path = bad_file(kind, tmp_path, real_checkpoint, marker)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(path, key="ckpt_path")
    message = str(error.value)
    assert message.startswith(f"ckpt_path={path} ")
    assert "\n" not in message
    assert_explains(message, EXPECTED[kind])
    assert not marker.exists()


# Every kind is refused in process by the loader (above), which generate.py calls; its command line is
# tried on the FIFO (which only a subprocess may read), on code, and on a missing file.
@pytest.mark.parametrize("kind", ["fifo", "code in a checkpoint", "missing"])
def test_a_bad_file_ends_generate_py_in_one_line(tmp_path, real_checkpoint, marker, kind):
    path = bad_file(kind, tmp_path, real_checkpoint, marker)
    run = generate_py(path)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {path} ")
    assert_explains(run.stderr.strip().splitlines()[-1], EXPECTED[kind])
    assert "Traceback" not in run.stderr
    assert not marker.exists()


def test_every_reader_checks_the_archive_before_loading(tmp_path, real_checkpoint, marker):
    # train.py's resume reads with load_checkpoint_file (above), then Lightning through the strategy's
    # CheckpointIO (AtomicCheckpointIO), or FSDP's own load (ShardedDataParallel); generate and export
    # through load_model.
    flipped = bad_file("64 bytes flipped", tmp_path, real_checkpoint, marker)
    readers = [load_model, AtomicCheckpointIO().load_checkpoint, ShardedDataParallel().load_checkpoint]
    for read in readers:
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(flipped))} {EXPECTED['64 bytes flipped']}"):
            read(flipped)
    assert AtomicCheckpointIO().load_checkpoint(real_checkpoint)["global_step"] == 2


def test_a_checkpoint_checked_once_is_read_once_until_it_changes(tmp_path, real_checkpoint, monkeypatch):
    path = tmp_path / "last.ckpt"
    path.write_bytes(real_checkpoint.read_bytes())
    reads = []
    open_member = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, member: reads.append(member) or open_member(self, member))
    check_checkpoint_file(path)
    assert reads
    reads.clear()
    check_checkpoint_file(path)
    assert not reads  # the same file, unchanged: not read again
    path.write_bytes(bad_file("64 bytes flipped", tmp_path, real_checkpoint, tmp_path / "marker").read_bytes())
    with pytest.raises(CheckpointError, match="does not match its CRC-32"):
        check_checkpoint_file(path)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, real_checkpoint):
    checkpoint = torch.load(real_checkpoint, weights_only=True)
    weight = checkpoint["state_dict"]["model.blocks.0.mlp.fc.weight"].clone()
    weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    path = tmp_path / "diverged.ckpt"
    torch.save({**checkpoint, "state_dict": {**checkpoint["state_dict"], "model.blocks.0.mlp.fc.weight": weight}}, path)
    message = (
        f"{path} holds non-finite weights (blocks.0.mlp.fc.weight: 3 of {weight.numel():,} values are NaN or "
        "infinite): use an earlier checkpoint of the run (its best-step<N>.ckpt), or train anew"
    )
    with pytest.raises(CheckpointError, match=f"^{re.escape(message)}$"):
        load_model(path)  # generate.py's and export.py's load


def test_an_old_checkpoint_s_pickled_tokenizer_is_never_unpickled(tmp_path, real_checkpoint, marker):
    # losslab's old format: the tokenizer as a pickle, which could hold anything
    path = tmp_path / "old.ckpt"
    checkpoint = torch.load(real_checkpoint, weights_only=True)
    torch.save({**checkpoint, "tokenizer": pickle.dumps(RunsCode(marker))}, path)
    assert load_checkpoint_file(path)["tokenizer"].startswith(b"\x80")  # read as bytes, never unpickled
    with pytest.raises(CheckpointError, match="stores its tokenizer as a pickle .* so it is not loaded: train anew"):
        load_model(path)
    run = generate_py(path)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {path} stores its tokenizer as a pickle")
    assert not marker.exists()


def test_a_damaged_tokenizer_is_refused(tmp_path, real_checkpoint):
    path = tmp_path / "damaged.ckpt"
    checkpoint = torch.load(real_checkpoint, weights_only=True)
    tokenizer = checkpoint["tokenizer"]
    swapped = tokenizer["ranks"].replace(b"Zg== 102", b"? 102").replace(b"Zw== 103", b"Zg== 103").replace(b"?", b"Zw==")
    torch.save({**checkpoint, "tokenizer": {**tokenizer, "ranks": swapped}}, path)  # bytes f and g swapped
    with pytest.raises(
        CheckpointError,
        match="holds a damaged tokenizer .*not those its n_vocab and sha256 describe.*earlier checkpoint",
    ):
        load_model(path)


def test_a_real_checkpoint_loads_and_generates(real_checkpoint):
    checkpoint = load_checkpoint_file(real_checkpoint)
    assert checkpoint["global_step"] == 2
    assert checkpoint["tokenizer_id"] == {key: checkpoint["tokenizer"][key] for key in ("name", "n_vocab", "sha256")}
    model, tokenizer = load_model(real_checkpoint)
    assert tokenizer.name == "bytes" and model.config.vocab_size == tokenizer.n_vocab == 257
    run = generate_py(real_checkpoint, "--prompt", "The ", "--max-new-tokens", "5")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--- sample 0 ---\nThe " in run.stdout


@pytest.mark.parametrize("name", ["bytes", "bpe", "gpt2"])
def test_a_tokenizer_comes_back_from_its_data_through_a_weights_only_load(tmp_path, request, name):
    enc = tokenizer_named(name, request)
    torch.save({"tokenizer": tokenizer_to_data(enc)}, tmp_path / "tokenizer.pt")
    rebuilt = tokenizer_from_data(torch.load(tmp_path / "tokenizer.pt", weights_only=True)["tokenizer"])
    assert (rebuilt.name, rebuilt.n_vocab, rebuilt.eot_token) == (enc.name, enc.n_vocab, enc.eot_token)
    for text in DOCUMENTS:
        assert rebuilt.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert tokenizer_to_data(rebuilt) == tokenizer_to_data(enc)
    if name == "gpt2":  # the ranks are stored as tiktoken's own file, byte for byte
        assert hashlib.sha256(tokenizer_to_data(enc)["ranks"]).hexdigest() == GPT2_RANKS_SHA256


def test_tokenizer_data_that_is_not_whole_is_refused():
    data = tokenizer_to_data(build_tokenizer("bytes"))
    with pytest.raises(ValueError, match="the tokenizer is not stored as data: ranks missing or of another type"):
        tokenizer_from_data({**data, "ranks": None})
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        tokenizer_from_data({**data, "ranks": b"not base64 0\n"})
    with pytest.raises(ValueError, match="not those its n_vocab and sha256 describe"):
        tokenizer_from_data({**data, "sha256": "0" * 64})


def generate_py(checkpoint: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "generate.py"), str(checkpoint), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def assert_explains(message: str, expected: str) -> None:
    """``message`` says ``expected`` (a regex) and never advises loading the file unsafely."""
    assert re.search(expected, message), message
    assert "weights_only" not in message
