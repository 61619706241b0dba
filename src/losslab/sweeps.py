"""A sweep's runs (``python train.py -m ...``): their folders are named by what the sweep varies
(:func:`run_name`, a resolver of conf/hydra/default.yaml, and the callback :class:`NameRunsBySweep`),
and it ends with the comparison of its runs (:class:`CompareAtEnd`)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from losslab.compare import write_comparison
from losslab.dashboard import DASHBOARD_URL
from losslab.report import shown
from losslab.run_logs import load_runs, run_folders

log = logging.getLogger(__name__)
MAX_NAME_BYTES = 255  # a folder name's longest on Linux, macOS and Windows file systems


def run_name(override_dirname: str, job_num: int) -> str:
    """The folder name, inside its sweep's, of a run named by its overrides (Hydra's
    ``override_dirname``: ``loss=fused,precision=bf16``, which stays as it is).

    A value holding ``/`` (``data.text_field=../../x``) would name a folder elsewhere: ``/`` is
    written ``%2F`` (and ``%`` itself ``%25``), so the name is one folder, inside the sweep's. A
    name longer than file systems take (255 bytes) is cut, with a hash of the whole to keep it
    unique; an empty one (every override excluded) is the job's number, as in Hydra's own sweeps.
    """
    name = override_dirname.replace("%", "%25").replace("/", "%2F")
    if not name:
        return str(job_num)
    if len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = name.encode()[: MAX_NAME_BYTES - len(digest) - 1].decode(errors="ignore") + "-" + digest
    return name


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
