"""Sweeps: a multirun's runs under one TensorBoard root named by what it sweeps, the HPARAMS tab
leading with it, compare_runs.py on it and its table at the end, Optuna and SLURM configs."""

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from helpers import REPO, TRAIN
from hydra import compose, initialize_config_module
from hydra.utils import get_class
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import backend_context, metadata, plugin_data_pb2

from losslab.run_logs import read_runs
from losslab.sweeps import run_name, shared_keys
from losslab.train import register_resolvers

SWEEP_FOLDER = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}")


class Sweep(NamedTuple):
    folder: Path
    output: str  # what the command printed


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, Sweep]:
    """A sweep of two losses and an Optuna search of two trials, started together in one log folder."""
    root = tmp_path_factory.mktemp("sweeps")
    common = ["experiment=tiny"]  # the default paths: logs/ and .cache/ under the working directory
    commands = {
        "losses": ["-m", "loss=naive,fused"],
        "optuna": ["hparams_search=optuna", "hydra.sweeper.n_trials=2"],
    }
    started = {
        name: subprocess.Popen(
            [sys.executable, str(TRAIN), *overrides, *common],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, overrides in commands.items()
    }
    outputs = {}
    for name, process in started.items():
        outputs[name], _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name} sweep failed:\n{outputs[name][-4000:]}"
    folders = sorted((root / "logs" / "multiruns").iterdir())
    assert len(folders) == 2, folders  # never one folder for both
    optuna = [f for f in folders if (f / "optimization_results.yaml").is_file()]
    assert len(optuna) == 1, folders
    losses = next(f for f in folders if f not in optuna)
    return {"optuna": Sweep(optuna[0], outputs["optuna"]), "losses": Sweep(losses, outputs["losses"])}


def hparams_of(run_dir: Path) -> dict[str, float | str]:
    """The options that a run's HPARAMS tab shows."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {key: value.string_value or value.number_value for key, value in session.hparams.items()}


def hparams_tab(sweep: Path) -> list[str]:
    """The options of the HPARAMS tab of ``tensorboard --logdir <sweep>``, in TensorBoard's order."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(sweep))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(sweep))
    tab = backend_context.Context(base_plugin.TBContext(logdir=str(sweep), data_provider=provider))
    request = context.RequestContext()
    experiment = tab.experiment_from_metadata(
        request,
        "",
        include_metrics=False,
        hparams_run_to_tag_to_content=tab.hparams_metadata(request, ""),
        data_provider_hparams=tab.hparams_from_data_provider(request, "", limit=None),
    )
    return [info.name for info in experiment.hparam_infos]


def test_sweeps_started_together_get_their_own_folders(sweeps):
    assert all(SWEEP_FOLDER.fullmatch(sweep.folder.name) for sweep in sweeps.values())
    assert sweeps["losses"].folder != sweeps["optuna"].folder


def test_folder_suffix_is_drawn_per_config_so_sweeps_in_one_second_differ(tmp_path):
    register_resolvers()
    overrides = [f"paths.log_dir={tmp_path}"]
    with initialize_config_module(config_module="losslab.conf", version_base="1.3"):
        first, second = (compose("train", overrides, return_hydra_config=True) for _ in range(2))
    assert first.hydra.sweep.dir != second.hydra.sweep.dir
    assert first.hydra.run.dir != second.hydra.run.dir
    assert first.hydra.sweep.dir == first.hydra.sweep.dir  # one value per config: its jobs share it


def test_a_run_s_folder_is_one_folder_inside_its_sweep_s_whatever_its_values(tmp_path):
    register_resolvers()
    overrides = [f"paths.log_dir={tmp_path}", "data=jsonl", "data.text_field=../../../../x", "hydra.job.num=3"]
    with initialize_config_module(config_module="losslab.conf", version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
    assert cfg.hydra.job.override_dirname == "data.text_field=../../../../x,data=jsonl"  # Hydra's, as given
    sweep = Path(cfg.hydra.sweep.dir)
    run = sweep / cfg.hydra.sweep.subdir
    assert run.name == "data.text_field=..%2F..%2F..%2F..%2Fx,data=jsonl" and run.resolve().parent == sweep.resolve()


def test_run_names_keep_plain_values_and_fit_a_file_system():
    assert run_name("loss=fused,precision=bf16", 0) == "loss=fused,precision=bf16"
    assert run_name("data.text_field=a/b%2Fc", 0) == "data.text_field=a%2Fb%252Fc"  # one way back: unique
    assert run_name("", 4) == "4"  # every override excluded (data.path=a,b): the job's number, not the sweep's folder
    long = [run_name(f"data.text_field={'é' * 200}{end}", 0) for end in "ab"]
    assert long[0] != long[1] and all(len(name.encode()) <= 255 for name in long)


def test_a_sweep_logs_its_runs_under_one_root_named_by_what_it_sweeps(sweeps):
    sweep = sweeps["losses"].folder
    runs = read_runs(sweep)
    assert sorted(runs) == ["loss=fused", "loss=naive"]  # experiment=tiny, shared by both, left out
    for name, curves in runs.items():
        for tag in [
            "train/loss",
            "val/ppl",
            "perf/tokens_per_sec",
            "perf/peak_memory_mib",
            "val/bpb",
        ]:
            assert tag in curves, (name, tag)
        # every tag holds a curve: no single-point copies of the final metrics above the curves
        assert all(len(events) > 1 for events in curves.values()), {tag: len(e) for tag, e in curves.items()}
        options = hparams_of(sweep / name)
        assert options["loss/name"] == name.removeprefix("loss=")
        assert options["data/tokenizer"] == "bytes" and options["model/vocab_size"] == 257
        assert options["trainer/precision"] == "32-true" and options["step/accumulate"] == 1
        assert (sweep / name / ".hydra" / "config.yaml").is_file()


def test_the_hparams_tab_leads_with_what_the_sweep_varies(sweeps):
    sweep = sweeps["losses"].folder
    for run in sweep.iterdir():
        if run.is_dir():  # no run writes the tab's column list: TensorBoard works out what differs
            events = EventAccumulator(str(run))
            events.Reload()
            assert metadata.EXPERIMENT_TAG not in events.PluginTagToContent("hparams")
    assert hparams_tab(sweep)[0] == "loss/name"
    assert hparams_tab(sweeps["optuna"].folder)[:3] == [
        "optimizer/lr",
        "optimizer/weight_decay",
        "schedule/warmup_steps",
    ]


def test_a_sweep_ends_with_its_comparison(sweeps):
    sweep, output = sweeps["losses"]
    assert "| `loss=fused` | finished |" in output and "| `loss=naive` | finished |" in output
    assert f"compare.md and {Path('logs', 'multiruns', sweep.name, 'compare.png')}" in output
    assert f"tensorboard --logdir {Path('logs', 'multiruns', sweep.name)}" in output
    assert (sweep / "compare.png").is_file()


@pytest.mark.parametrize(
    "overrides,params,shared",
    [
        (["experiment=tiny", "loss=naive,fused"], None, ["experiment"]),
        (["experiment=tiny,shakespeare_gpt2", "loss=fused"], None, ["loss"]),  # presets swept: named by them
        (["loss=fused", "optimizer.lr=range(1,3)"], None, ["loss"]),
        (["experiment=tiny"], {"optimizer.lr": "interval(0.001, 0.1)"}, ["experiment"]),  # Optuna's search space
        (["experiment=tiny", "loss=fused"], None, []),  # nothing swept: every override names the run
    ],
)
def test_runs_are_named_by_the_keys_a_sweep_varies(overrides, params, shared):
    assert shared_keys(overrides, params) == shared


def test_compare_runs_writes_a_table_and_a_figure(sweeps, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "compare_runs.py"),
            str(sweeps["losses"].folder),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    table = (tmp_path / "compare.md").read_text()
    assert table in result.stdout
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert sorted(row.split(" | ")[0] for row in rows) == ["| `loss=fused`", "| `loss=naive`"]
    assert all(row.endswith("| no |") for row in rows)  # no non-finite step
    assert "all with `experiment=tiny`" in table
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_optuna_search_reports_its_best_trial(sweeps):
    results = yaml.safe_load((sweeps["optuna"].folder / "optimization_results.yaml").read_text())
    trials = read_runs(sweeps["optuna"].folder)
    assert len(trials) == 2 and all(name.startswith(("trial0_", "trial1_")) for name in trials)
    final_losses = [curves["val/loss"][-1].value for curves in trials.values()]
    assert math.isfinite(results["best_value"])
    assert results["best_value"] == pytest.approx(min(final_losses))  # the objective: final val/loss
    assert set(results["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "schedule.warmup_steps"}


def test_slurm_launcher_config_composes(tmp_path):
    register_resolvers()
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"paths.log_dir={tmp_path}"]
    with initialize_config_module(config_module="losslab.conf", version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.submitit_folder.startswith(cfg.hydra.sweep.dir)
