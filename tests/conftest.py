"""Paths to the read-only material in ../shared (the corpus and GPT-2's ranks); never copy it here."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def tiktoken_cache(monkeypatch: pytest.MonkeyPatch) -> Path:
    """tiktoken's cache holding GPT-2's ranks, set as TIKTOKEN_CACHE_DIR."""
    cache = SHARED / "tiktoken_cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def shakespeare_path() -> Path:
    return SHARED / "data" / "tinyshakespeare.txt"
