"""Adding a loss exactly as the README says ("Add a loss") passes the tests with no other edit: its
four steps, taken for a new entry in a copy of the project, then the tests that entry joins, run
there: every test whose name holds the new entry's (the float64 grid, the config check, a few
training steps...), and every test marked ``whole_registry``, which reads the whole list of losses (the
registry's checks of conf/loss and of the README's loss tables, the errors that list the losses,
the memory predictions, the benchmark's rows). Most of its time goes to collecting the suite there.
"""

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import README_LOSS_TABLES, REPO, table_cells, table_lines

NAME = "log_softmax"
MODULE = '''"""``log_softmax``: log-probabilities from ``torch.log_softmax``."""

import torch
from torch import Tensor

from losslab.losses.base import LogitsLoss


class LogSoftmaxLoss(LogitsLoss):
    name = "log_softmax"

    def token_loss(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        log_probs = torch.log_softmax(logits, dim=-1)
        nll = -log_probs.gather(-1, targets[:, None]).squeeze(-1)
        return self.smoothed(nll, log_probs, targets), nll
'''
CONFIG = f"defaults:\n  - /base/loss@_here_\n  - _self_\n\nname: {NAME}\n"
# What runs in the copy (not this test, whose name holds neither); -k matches a test's marks too.
SELECTED = f"{NAME} or whole_registry"
# Test files that must have run a test there: of the new entry's name, or of the whole list.
JOINED = ("test_losses", "test_registry", "test_config_checks", "test_train")
LISTING = ("test_registry", "test_config_checks", "test_train", "test_bad_input", "test_peak_memory", "test_bench")


def replace_once(text: str, old: str, new: str, where: str) -> str:
    assert text.count(old) == 1, f"{where} no longer has {old!r} once: make the README's 'Add a loss' true again"
    return text.replace(old, new)


def add_to_readme_tables(readme: str, name: str) -> str:
    """Step 4: the name in each of the README's loss tables, a row or a column of its own."""
    lines = readme.splitlines()
    for header_start, names_are in README_LOSS_TABLES.values():
        table = table_lines(lines, header_start)
        columns = len(table_cells(lines[table.start]))
        if names_are == "rows":
            lines.insert(table.stop, f"| `{name}` |" + " yes |" * (columns - 1))
        else:
            lines[table.start] += f" {name} |"
            lines[table.start + 1] += "---|"
            for i in table[2:]:
                lines[i] += " yes |"
    return "\n".join(lines) + "\n"


def add_a_loss(project: Path) -> None:
    """README, "Add a loss", for NAME: a module, its class in LOSSES, its config, the README's tables."""
    losses = project / "src" / "losslab" / "losses"
    (losses / f"{NAME}.py").write_text(MODULE)
    registry = (losses / "__init__.py").read_text()
    registry = replace_once(
        registry,
        "from losslab.targets import",
        f"from losslab.losses.{NAME} import LogSoftmaxLoss\nfrom losslab.targets import",
        "src/losslab/losses/__init__.py",
    )
    registry = replace_once(
        registry,
        "    for loss in (\n",
        "    for loss in (\n        LogSoftmaxLoss,\n",
        "src/losslab/losses/__init__.py",
    )
    (losses / "__init__.py").write_text(registry)
    (project / "conf" / "loss" / f"{NAME}.yaml").write_text(CONFIG)
    (project / "README.md").write_text(add_to_readme_tables((project / "README.md").read_text(), NAME))


def copy_of_the_project(folder: Path) -> Path:
    """What the tests read: the package, its configs (installed as losslab.conf: here beside the
    package, as the editable install maps them), the tests, the README and pytest's settings."""
    project = folder / "project"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    for name in ("src", "conf", "tests"):
        shutil.copytree(REPO / name, project / name, ignore=skip)
    for name in ("README.md", "pyproject.toml", "train.py"):
        shutil.copy2(REPO / name, project / name)
    (project / "src" / "losslab" / "conf").symlink_to(project / "conf", target_is_directory=True)
    return project


@pytest.mark.slow
def test_a_loss_added_as_the_readme_says_passes_the_tests_it_joins(tmp_path):
    project = copy_of_the_project(tmp_path)
    add_a_loss(project)
    report = tmp_path / "report.xml"
    command = [
        *(sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "-q", "tests", "-k", SELECTED),
        *(f"--basetemp={tmp_path / 'basetemp'}", f"--junit-xml={report}"),
    ]
    # The copy's package first; TRITON_INTERPRET as a plain run finds it (tests/losses sets it for its tests).
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(project / "src")
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    ran = [f"{case.get('classname')}.{case.get('name')}" for case in cases if not list(case)]  # passed
    for module in JOINED:
        assert [case for case in ran if module in case and NAME in case], f"no test of {NAME} ran in {module}"
    for module in LISTING:
        assert [case for case in ran if module in case and NAME not in case], f"no whole_registry test ran in {module}"
    assert any("test_the_readmes_loss_tables" in case for case in ran)
