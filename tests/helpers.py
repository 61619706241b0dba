"""What test files share, in one place: no test file imports from another.

A tiny run's config (``make_config``), its logged curves (``scalars``), ``python train.py`` in a
subprocess (``train_py``, and ``start``/``run``/``kill_after_checkpoint`` on the corpus of the
``root`` fixture, tests/conftest.py), the comparison of resumed runs and of sharded ones, a data
module, a tokenizer of each kind, and the README's loss tables. Beside it: tests/conftest.py (fixtures, the shared material),
tests/steps.py (single optimizer steps through a Trainer, and the script of the multi-process ones)
and tests/losses/reference.py (the loss registry's float64 reference).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import tiktoken
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from losslab.checkpoint_files import load_model
from losslab.data import DataConfig, GPTDataModule
from losslab.generate import generate
from losslab.run_status import STATUS_FILE
from losslab.tokenizers import build_tokenizer
from losslab.train import build_module

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TRAIN = REPO / "train.py"
STEPS_SCRIPT = REPO / "tests" / "steps.py"  # the multi-process runs of single optimizer steps

# A tiny model on the byte tokenizer: a run of a few steps takes seconds.
TINY = [
    "tokenizer=bytes",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.context_length=32",
    "data.batch_size=4",
    "data.val_batches=2",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress_bar",
    "trainer.enable_progress_bar=false",
    "schedule.warmup_steps=2",
]


def make_config(tmp_path: Path, cache_dir: Path, overrides: list[str]) -> DictConfig:
    """conf/train.yaml for a tiny run writing to ``tmp_path/run``, with ``overrides``."""
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}"]
    with initialize_config_module(config_module="losslab.conf", version_base="1.3"):
        return compose(config_name="train", overrides=TINY + paths + overrides)


def scalars(run_dir: Path, steps: bool = False) -> dict[str, list]:
    """Every logged curve of a run: its values, or ``(step, value)`` pairs."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) if steps else e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def logged(run_dir: Path, tag: str) -> dict[int, float]:
    """One curve of a run, ``{step: value}`` (empty when the run never logged it)."""
    return dict(scalars(run_dir, steps=True).get(tag, []))


def train_py(root: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python train.py`` with the tiny model, logging under ``root/logs``."""
    command = [sys.executable, str(TRAIN), *TINY, f"paths.root_dir={root}", *overrides]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout)


def make_datamodule(tmp_path: Path, **options) -> GPTDataModule:
    """A data module set up for fitting: a small BPE on pydoc unless ``options`` say otherwise."""
    defaults = dict(tokenizer="bpe", vocab_size=512, context_length=32, batch_size=4, cache_dir=tmp_path / "cache")
    dm = GPTDataModule(DataConfig(**{**defaults, **options}))
    dm.setup("fit")
    return dm


DOCUMENTS = ["The while statement is used for repeated execution.", "naïve café, 日本語 🤖 and <|endoftext|>"]


def tokenizer_named(name: str, request: pytest.FixtureRequest) -> tiktoken.Encoding:
    """A tokenizer of each kind: bytes, a small trained BPE, or GPT-2's (skipped without tiktoken's cache)."""
    if name == "gpt2":
        request.getfixturevalue("tiktoken_cache")
    options = {"vocab_size": 300, "train_text": DOCUMENTS * 20} if name == "bpe" else {}
    return build_tokenizer(name, **options)


# Runs of train.py on the corpus of the ``root`` fixture (tests/conftest.py), a folder ``root/name`` each.
MAX_STEPS = 24
# Dropout draws from the global RNG, so the resumed runs need its state; last.ckpt every 3 steps
# and val every 6 meet every 6 steps, so that runs resume from a checkpoint of a step that validated
# (12) and of one that did not (3); the corpus makes epochs of 4 steps, so the runs cross epoch ends
# and resume both mid-epoch (step 3) and from an epoch's last step (12).
RESUME_OPTIONS = [
    "data=text",
    "model.dropout=0.1",
    "trainer.deterministic=true",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.val_check_interval=6",
    "callbacks.last_checkpoint.every_n_train_steps=3",
]
RESUME = TINY + RESUME_OPTIONS


def start(root: Path, name: str, overrides: list[str], script: list[str] | None = None) -> subprocess.Popen:
    """``python train.py`` (or ``script``) on the test corpus, writing to ``root/name``."""
    paths = [f"paths.root_dir={root}", f"paths.output_dir={root / name}", f"paths.cache_dir={root / 'cache'}"]
    command = [
        sys.executable,
        *(script or [str(TRAIN)]),
        *RESUME,
        f"data.path={root / 'corpus.txt'}",
        *paths,
        *overrides,
    ]
    (root / name).mkdir()
    with open(root / name / "stdout.txt", "w") as stdout, open(root / name / "stderr.txt", "w") as stderr:
        return subprocess.Popen(command, cwd=root, stdout=stdout, stderr=stderr)


def failure(root: Path, name: str) -> str:
    return f"run {name} failed:\n" + (root / name / "stderr.txt").read_text()[-4000:]


def run(root: Path, name: str, overrides: list[str] = ()) -> Path:
    """Run to the end; returns the run's last.ckpt."""
    assert start(root, name, list(overrides)).wait(timeout=600) == 0, failure(root, name)
    return last_checkpoint(root, name)


def last_checkpoint(root: Path, name: str) -> Path:
    return root / name / "checkpoints" / "last.ckpt"


def checkpoint_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"] if path.exists() else -1


def kill_when(
    root: Path, name: str, process: subprocess.Popen, ready: Callable[[], bool], how: int = signal.SIGKILL
) -> None:
    """Send run ``name`` the signal ``how`` (SIGKILL) as soon as ``ready()``; fail if it ends, or is
    not ready in 10 minutes. It must end as that signal's default action ends a process: SIGKILL
    kills it, and a run stopped with SIGTERM exits as a shell reports it, with 128 + SIGTERM."""
    deadline = time.monotonic() + 600
    try:
        while not ready():
            assert process.poll() is None, failure(root, name)
            assert time.monotonic() < deadline, f"run {name} took too long"
            time.sleep(0.02)
    finally:
        process.send_signal(how)
    expected = -signal.SIGKILL if how == signal.SIGKILL else 128 + how
    assert process.wait(timeout=600) == expected, failure(root, name)


def kill_after_checkpoint(root: Path, name: str, step: int, overrides: list[str] = ()) -> Path:
    """Start a run and SIGKILL it, mid-training, once its last.ckpt holds ``step`` or later."""
    last = last_checkpoint(root, name)
    # saves are atomic: last.ckpt is whole whenever it is read
    kill_when(root, name, start(root, name, list(overrides)), lambda: checkpoint_step(last) >= step)
    return last


def one_device_validation(cfg: DictConfig) -> float:
    """val/loss of the model that ``cfg`` starts from, on one device."""
    L.seed_everything(cfg.seed, workers=True)  # as train.py does before building
    datamodule, module = build_module(cfg)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(trainer.callback_metrics["val/loss"])


def assert_validates_as_one_device(root: Path, name: str, overrides: list[str], tmp_path: Path) -> None:
    """The run ``name``'s first validation (step 0) is one device's of the same weights (the sums reduced in
    another order): each validation window counted once, whatever processes shared them."""
    corpus = [*RESUME_OPTIONS, f"data.path={root / 'corpus.txt'}", *overrides]
    expected = one_device_validation(make_config(tmp_path, root / "cache", corpus))
    assert logged(root / name, "val/loss")[0] == pytest.approx(expected, rel=1e-6)


def best_checkpoints(run_dir: Path) -> list[str]:
    return sorted(path.name for path in (run_dir / "checkpoints").glob("best-*"))


def assert_same_run(root: Path, expected_run: str, runs: list[str]) -> None:
    """``runs``, each resumed from the one before, end with the weights of ``expected_run``, logged
    what it logged at the same steps and keep the same best checkpoint."""
    expected_weights, weights = (
        torch.load(last_checkpoint(root, name), weights_only=True)["state_dict"] for name in (expected_run, runs[-1])
    )
    assert expected_weights.keys() == weights.keys()
    for name in weights:
        assert torch.equal(expected_weights[name], weights[name]), name
    for tag in ["train/loss", "val/loss"]:
        expected = logged(root / expected_run, tag)
        for name in runs:
            got = logged(root / name, tag)
            assert got == {step: expected[step] for step in got}, (name, tag)
    assert best_checkpoints(root / runs[-1]) == best_checkpoints(root / expected_run)


# Sharded runs (test_fsdp.py, test_tensor_parallel.py) without biases: the attention's key bias has a
# gradient of 0 in exact arithmetic (softmax ignores what it adds to all of a query's scores alike), so
# it holds float noise only, which AdamW turns into steps as large as any other weight's, and two runs
# that round differently part there.
NO_BIAS = ["model.bias=false"]


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference, relative to the largest value expected."""
    return float((got - expected).abs().max() / expected.abs().max())


def assert_same_optimizer_state(got: dict, expected: dict) -> None:
    """Two optimizer states (``state_dict()``'s) number the parameters alike and hold the same values."""
    assert got["param_groups"] == expected["param_groups"]  # the parameters numbered in the same order
    assert got["state"].keys() == expected["state"].keys()
    for param_id, state in expected["state"].items():
        for name, value in state.items():
            assert relative_difference(got["state"][param_id][name], value) < 1e-12, (param_id, name)


def assert_logged_and_checkpointed_once(root: Path, name: str, steps: int) -> None:
    """The run ``name`` under ``root``: a finished run of ``steps`` steps whose events one process
    wrote (rank 0), whose best and last checkpoints are one whole file, hard-linked, as DDP's, and
    with no advice from Lightning in its log."""
    folder = root / name
    events = folder.rglob("events.out.tfevents.*")  # named ...<host>.<pid>.<n>
    assert len({file.name.split(".")[-2] for file in events}) == 1  # one process wrote them: rank 0
    assert json.loads((folder / STATUS_FILE).read_text())["status"] == "finished"
    checkpoints = sorted((folder / "checkpoints").iterdir())
    assert [path.name for path in checkpoints] == [f"best-step{steps}.ckpt", "last.ckpt"]
    assert all(path.is_file() for path in checkpoints)  # whole files, not distributed folders
    # of the same step: one file, hard-linked
    assert os.path.samefile(*checkpoints)
    # Lightning's advice, for what it cannot see is synced, in no run's train.log (Hydra's folders: the
    # runs here write the rest to paths.output_dir)
    logs = [path.read_text() for path in root.glob("logs/runs/*/train.log")]
    assert logs and not [advice for advice in ["sync_dist=True", "DistributedSampler"] for log in logs if advice in log]


def assert_generate_and_export_read(checkpoint: Path, out: Path) -> None:
    model, tokenizer = load_model(checkpoint)
    [sample] = generate(model, tokenizer, "the ", max_new_tokens=10, seed=1)
    assert sample.startswith("the ")
    pytest.importorskip("transformers", reason="exporting needs transformers: pip install -e '.[export]'")
    from losslab.export import export_checkpoint

    export_checkpoint(checkpoint, out / "exported")
    assert (out / "exported" / "model.safetensors").is_file()


# The README's tables that name every registry entry (README, "Add a loss", step 4): the start of
# their header row, and where in them the names are, a row each or a column each.
README_LOSS_TABLES = {
    "implementations": ("| name | how | lesson |", "rows"),  # The loss implementations
    "options": ("| option |", "columns"),  # what each honours
    "strategies": ("| loss | `default` |", "rows"),  # Which loss trains under which strategy
}


def table_cells(line: str) -> list[str]:
    """The cells of a markdown table's line (``\\|`` in a cell is a ``|`` of its text)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def table_lines(lines: list[str], header_start: str) -> range:
    """Where in ``lines`` the one table whose header row starts with ``header_start`` is."""
    starts = [i for i, line in enumerate(lines) if line.startswith(header_start)]
    assert len(starts) == 1, f"the README has {len(starts)} tables whose header starts {header_start!r}"
    end = starts[0]
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return range(starts[0], end)


def readme_table(header_start: str, readme: Path = REPO / "README.md") -> list[list[str]]:
    """The cells of the README's table whose header row starts with ``header_start``: the header's,
    then each row's."""
    lines = readme.read_text().splitlines()
    table = [table_cells(lines[i]) for i in table_lines(lines, header_start)]
    return [table[0], *table[2:]]  # without the |---| line


def names_in(cell: str) -> list[str]:
    """The loss names a cell gives: in backticks, else as a comma-separated list."""
    return re.findall(r"`([^`]+)`", cell) or [name.strip() for name in cell.split(",")]
