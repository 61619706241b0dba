"""Hydra callbacks of a sweep (``python train.py -m ...``, registered in conf/hydra/default.yaml):
its runs are named by what it sweeps, and it ends with the comparison of its runs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from losslab.compare import load_runs, run_folders, write_comparison
from losslab.dashboard import DASHBOARD_URL
from losslab.report import shown

log = logging.getLogger(__name__)


def shared_keys(task_overrides: list[str], sweeper_params: Mapping[str, Any] | None) -> list[str]:
    """The keys of the command-line overrides that give every run of a sweep the same value
    (``experiment`` in ``experiment=tiny loss=naive,fused``); none when the sweep varies nothing,
    neither on the command line (``loss=naive,fused``, ``range(...)``...) nor in the sweeper's
    ``params`` (Optuna's search space)."""
    overrides = OverridesParser.create().parse_overrides(task_overrides)
    swept = {override.key_or_group for override in overrides if override.is_sweep_override()}
    swept |= set(sweeper_params or {})
    if not swept:
        return []
    return [override.key_or_group for override in overrides if override.key_or_group not in swept]


class NameRunsBySweep(Callback):
    """Names a sweep's runs by what the sweep varies: ``loss=fused``, not ``experiment=tiny,loss=fused``.

    Hydra names each job's folder by its overrides (``hydra.job.override_dirname``, less its
    ``exclude_keys``). Before the sweep starts, the keys that every run shares join those
    ``exclude_keys`` through the Hydra overrides that each job's config is composed with. The names
    stay unique, since the runs differ only in what is swept; the shared overrides stay in each
    run's ``.hydra/overrides.yaml`` (compare's table names them) and in the sweep's ``multirun.yaml``.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        shared = shared_keys(list(config.hydra.overrides.task), OmegaConf.select(config, "hydra.sweeper.params"))
        if not shared:
            return
        keys = [*config.hydra.job.config.override_dirname.exclude_keys, *shared]
        quoted = ",".join(f"'{key}'" for key in keys)
        with read_write(config.hydra):
            config.hydra.overrides.hydra.append(f"hydra.job.config.override_dirname.exclude_keys=[{quoted}]")


class CompareAtEnd(Callback):
    """Ends a sweep with what ``scripts/compare_runs.py <sweep dir>`` prints: the table of its runs,
    with compare.md and compare.png written to the sweep's folder, and the command that shows its curves."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        runs = load_runs(run_folders(sweep))
        if not runs:
            log.warning(f"No run of the sweep logged anything under {sweep}: nothing to compare.")
            return
        comparison = write_comparison(runs, sweep)
        log.info(f"{comparison}\nCurves: tensorboard --logdir {shown(sweep)}  (then open {DASHBOARD_URL})")
