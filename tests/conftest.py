"""Paths to the read-only material in the shared folder (the corpus and GPT-2's ranks); never copy it here.

The shared folder is ``$LOSSLAB_SHARED``, else ``../shared`` beside the repository. A test whose
material is not there is skipped, with a reason that says where to put it.
"""

import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]  # tests/test_shared_material.py runs pytest on small test files

REPO = Path(__file__).resolve().parents[1]


def interpret_tiled_kernels_without_cuda() -> None:
    """Without CUDA, loss=tiled's Triton kernels run in Triton's interpreter in the tests (tests/losses).

    A Triton function is interpreted when TRITON_INTERPRET=1 as it is defined: when triton (which Lightning
    and torch.compile import while the tests are collected) and losslab.losses.tiled_kernels are imported.
    Both are imported here with it, and it is taken away again, unless it was set before: the processes
    the tests start (train.py, benchmark workers) do not inherit it, and there tiled stays what it is on a
    CPU, refused. tests/losses/conftest.py sets it again for its own tests, where tiled then runs.
    """
    if importlib.util.find_spec("triton") is None or torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import losslab.losses.tiled_kernels  # noqa: F401  (and triton)
    finally:
        del os.environ["TRITON_INTERPRET"]


interpret_tiled_kernels_without_cuda()


def shared_folder() -> Path:
    """The folder of read-only test material: ``$LOSSLAB_SHARED``, else ``../shared`` beside the repository."""
    return Path(os.environ.get("LOSSLAB_SHARED", REPO.parent / "shared")).expanduser()


def shared_material(relative_path: str, what: str) -> Path:
    """``relative_path`` in the shared folder; skips the test when nothing is there."""
    path = shared_folder() / relative_path
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        pytest.skip(
            f"needs {what} at {path}: put it there or set LOSSLAB_SHARED=<a folder holding "
            "data/tinyshakespeare.txt and tiktoken_cache/>"
        )
    return path


@pytest.fixture
def tiktoken_cache(monkeypatch: pytest.MonkeyPatch) -> Path:
    """tiktoken's cache holding GPT-2's ranks, set as TIKTOKEN_CACHE_DIR."""
    cache = shared_material("tiktoken_cache", "a tiktoken cache holding GPT-2's ranks")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def shakespeare_path() -> Path:
    """tiny Shakespeare (karpathy/char-rnn's input.txt)."""
    return shared_material("data/tinyshakespeare.txt", "tiny Shakespeare")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Token files and trained tokenizers, shared by the tests' runs."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder holding ``corpus.txt``, a small text corpus of 10 documents, for a module's runs of
    ``python train.py`` (``helpers.start``, ``helpers.run``), a folder ``root/<name>`` each."""
    root = tmp_path_factory.mktemp("runs")
    words = "the cat sat on a mat and dog ran far away from home".split()
    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(15)) for _ in range(10))
    (root / "corpus.txt").write_text(text)
    return root


@pytest.fixture(autouse=True)
def compile_every_shape():
    """cce compiles (torch.compile) its CPU implementation for every new shape and option, and the
    tests, in one process, make more of those than torch._dynamo's default limit of 8 recompilations."""
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 256
    yield
    torch._dynamo.config.recompile_limit = limit
