"""Tests that need the shared folder's material skip without it, saying how to provide it, and run with it.

Each test here runs pytest on a small test file that uses the fixtures of tests/conftest.py (a
copy of it sits beside the file), with ``LOSSLAB_SHARED`` pointing at one folder or another.
"""

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")
USES_SHARED_MATERIAL = """
def test_corpus(shakespeare_path):
    assert shakespeare_path.is_file()

def test_ranks(tiktoken_cache):
    assert any(tiktoken_cache.iterdir())

def test_without_shared_material():
    pass
"""


def run_with_shared_folder(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, folder: Path
) -> pytest.HookRecorder:
    """Run :data:`USES_SHARED_MATERIAL` with ``LOSSLAB_SHARED=folder``."""
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(USES_SHARED_MATERIAL)
    monkeypatch.setenv("LOSSLAB_SHARED", str(folder))
    return pytester.inline_run()


def skip_reasons(run: pytest.HookRecorder) -> dict[str, str]:
    """The reason each skipped test of ``run`` gave, by test name."""
    _, skipped, _ = run.listoutcomes()
    return {report.head_line: report.longrepr[2] for report in skipped}


def test_without_the_shared_folder_its_tests_skip_and_say_how_to_provide_it(pytester, monkeypatch):
    empty = pytester.mkdir("empty_shared")
    run = run_with_shared_folder(pytester, monkeypatch, empty)
    run.assertoutcome(passed=1, skipped=2)
    how = ": put it there or set LOSSLAB_SHARED=<a folder holding data/tinyshakespeare.txt and tiktoken_cache/>"
    assert skip_reasons(run) == {
        "test_corpus": f"Skipped: needs tiny Shakespeare at {empty / 'data' / 'tinyshakespeare.txt'}{how}",
        "test_ranks": f"Skipped: needs a tiktoken cache holding GPT-2's ranks at {empty / 'tiktoken_cache'}{how}",
    }


def test_an_empty_tiktoken_cache_counts_as_missing(pytester, monkeypatch):
    shared = pytester.mkdir("shared")
    (shared / "tiktoken_cache").mkdir()
    run = run_with_shared_folder(pytester, monkeypatch, shared)
    assert "test_ranks" in skip_reasons(run)


def test_with_the_shared_folder_its_tests_run(pytester, monkeypatch, shakespeare_path, tiktoken_cache):
    shared = shakespeare_path.parents[1]
    assert tiktoken_cache == shared / "tiktoken_cache"
    run_with_shared_folder(pytester, monkeypatch, shared).assertoutcome(passed=3)
