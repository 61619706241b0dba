"""compare_runs.py on runs written here: how each run ended, failed runs last, runs chosen by path or
glob, rows named by what differs."""

import json
import math
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from losslab.compare import curves_figure, main, markdown_table
from losslab.metrics import METRICS, Metric
from losslab.run_logs import load_runs

NAN = math.nan


def write_run(
    folder: Path,
    val_losses: list[float],
    status: dict | None = None,
    hparams: dict | None = None,
) -> Path:
    """A run's folder as training leaves it: validation losses every 10 steps (from step 0), the
    train loss, status.json and hparams.yaml (none when not given, as in older runs)."""
    with SummaryWriter(str(folder)) as writer:
        for i, loss in enumerate(val_losses):
            writer.add_scalar("val/loss", loss, 10 * i, walltime=1000.0 + i)
            writer.add_scalar("val/ppl", math.exp(loss), 10 * i, walltime=1000.0 + i)
            writer.add_scalar("train/loss", loss + 0.1, 10 * i, walltime=1000.0 + i)
    if status is not None:
        (folder / "status.json").write_text(json.dumps(status))
    if hparams is not None:
        (folder / "hparams.yaml").write_text(yaml.safe_dump(hparams))
    return folder


def status(state: str, step: int = 20, max_steps: int = 20, message: str = "") -> dict:
    return {"status": state, "step": step, "max_steps": max_steps, "message": message}


def hparams(folder: Path, loss: str = "fused", lr: float = 0.003, batch_size: int = 4) -> dict:
    """A run's hparams.yaml as Lightning writes it: the resolved config, its own paths in it, and the
    data module's arguments again at the top level."""
    return {
        "data": {
            "_target_": "losslab.data.GPTDataModule",
            "corpus": "pydoc",
            "path": None,
            "batch_size": batch_size,
            "cache_dir": "./.cache/losslab",
        },
        "loss": {"_target_": "losslab.losses.build_loss", "_partial_": True, "name": loss}
        | ({"chunk_size": None} if loss == "fused" else {}),  # an option of fused alone
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": lr, "betas": [0.9, 0.95]},
        "callbacks": {"model_checkpoint": {"dirpath": f"{folder}/checkpoints"}},
        "logger": {"save_dir": str(folder)},
        "paths": {"output_dir": str(folder)},
        "ckpt_path": None,
        "seed": 1337,
        "corpus": "pydoc",
        "batch_size": batch_size,
    }


def compare(*paths: Path | str, out: Path | None = None) -> list[dict[str, str]]:
    """The rows of the table that compare_runs.py writes for ``paths``, in order, each by column."""
    main([*map(str, paths), *(["--out", str(out)] if out else [])])
    return table_rows((out or Path(paths[0])) / "compare.md")


def table_rows(path: Path) -> list[dict[str, str]]:
    return rows_of(path.read_text())


def rows_of(table: str) -> list[dict[str, str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(header, row)) for row in rows[1:]]  # rows[0]: the |---| line


def test_the_status_column_says_how_each_run_ended(tmp_path):
    sweep = tmp_path / "sweep"
    cases = {
        "case=finished": status("finished"),
        "case=diverged": status("diverged"),
        "case=stopped": status("stopped", step=1),
        "case=interrupted": status("interrupted", step=7, max_steps=500),
        "case=crashed": status("crashed", step=3, max_steps=500, message="RuntimeError: CUDA out of memory"),
        "case=running": status("running", step=12, max_steps=500),
        "case=older": None,
    }
    for name, state in cases.items():
        write_run(sweep / name, [3.0, 2.5], state)

    rows = {row["run"]: row for row in compare(sweep)}

    assert {name: row["status"] for name, row in rows.items()} == {
        "`case=finished`": "finished",
        "`case=diverged`": "diverged (step 20)",
        "`case=stopped`": "stopped at step 1/20",
        "`case=interrupted`": "interrupted at step 7/500",
        "`case=crashed`": "crashed at step 3/500",
        "`case=running`": "running or killed (step 12/500)",
        "`case=older`": "unknown",
    }
    # Their logged losses are finite: the status alone says that a step was not (a run diverges with
    # finite losses too: it ends above its untrained model's).
    assert {name for name, row in rows.items() if row["non-finite"] == "yes"} == {"`case=stopped`"}
    assert (
        "- `case=crashed`, crashed at step 3/500: RuntimeError: CUDA out of memory"
        in (sweep / "compare.md").read_text()
    )


def test_runs_that_did_not_finish_are_never_ranked_first(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "experiment=tiny,loss=crashed", [0.5], status("crashed", step=1))  # step 0's loss, lowest of all
    write_run(sweep / "experiment=tiny,loss=diverged", [3.0, NAN], status("diverged"))
    write_run(sweep / "experiment=tiny,loss=fused", [3.0, 2.0], status("finished"))
    write_run(sweep / "experiment=tiny,loss=naive", [3.0, 1.5], status("finished"))

    rows = compare(sweep)

    assert [row["run"] for row in rows] == ["`loss=naive`", "`loss=fused`", "`loss=diverged`", "`loss=crashed`"]
    assert "Runs of the sweep, all with `experiment=tiny`:" in (sweep / "compare.md").read_text()


def test_nan_shows_as_nan_and_a_missing_value_as_n_a(tmp_path):
    run = write_run(tmp_path / "loss=diverged", [3.0, NAN], status("diverged"))
    with SummaryWriter(str(run)) as writer:
        writer.add_scalar("val/acc", NAN, 10)

    [row] = compare(tmp_path)

    assert row["val loss"] == "nan" and row["val ppl"] == "nan" and row["val acc"] == "nan"  # not nan%
    assert row["best val loss"] == "n/a"  # step 0's 3.0 is the untrained model, and nothing beat it
    assert row["val bpb"] == "n/a"  # never logged


def test_runs_chosen_by_paths_and_globs_are_each_listed_once(tmp_path):
    runs = tmp_path / "logs" / "runs"
    first = write_run(runs / "2026-12-01_08-00-00_aaaaaa", [2.0], status("finished"), hparams(runs, lr=0.001))
    second = write_run(runs / "2026-12-02_09-12-56_bbbbbb", [2.1], status("finished"), hparams(runs, lr=0.002))
    write_run(runs / "2026-12-02_10-00-00_cccccc", [2.2], status("finished"), hparams(runs, lr=0.003))
    write_run(runs / "2026-12-03_10-00-00_dddddd", [2.3], status("finished"), hparams(runs, lr=0.004))

    rows = compare(first, f"{runs}/2026-12-02_*", second, out=tmp_path / "out")

    assert [row["run"] for row in rows] == ["`optimizer.lr=0.001`", "`optimizer.lr=0.002`", "`optimizer.lr=0.003`"]


@pytest.mark.parametrize("missing", ["no_such_folder", "logs/runs/2027-*", "empty"])
def test_a_path_that_matches_no_run_is_an_error_that_names_it(tmp_path, capsys, missing):
    run = write_run(tmp_path / "logs" / "runs" / "2026-12-02_09-12-56_a1b2c3", [2.0], status("finished"))
    (tmp_path / "empty").mkdir()

    with pytest.raises(SystemExit) as exit:
        main([str(run), str(tmp_path / missing)])

    assert exit.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.endswith(
        f"error: no runs at {tmp_path / missing}: no folder there or below holds TensorBoard "
        "event files (events.out.tfevents.*)"
    )


def test_timestamped_runs_are_named_by_the_settings_that_differ(tmp_path):
    runs = tmp_path / "logs" / "runs"
    for name, loss, val_loss in [
        ("2026-12-02_09-12-56_a1b2c3", "fused", 2.0),
        ("2026-12-02_09-30-00_d4e5f6", "naive", 2.1),
    ]:
        # Each hparams.yaml names the run's own folders: paths, no setting. Only fused has a chunk_size.
        write_run(runs / name, [val_loss], status("finished"), hparams(runs / name, loss=loss))

    rows = compare(runs)

    assert [row["run"] for row in rows] == ["`loss.name=fused`", "`loss.name=naive`"]


def test_runs_are_named_by_the_config_group_chosen_rather_than_the_settings_it_brings(tmp_path):
    runs = tmp_path / "logs" / "runs"
    for name, trainer, backend, val_loss in [
        ("2026-12-02_09-12-56_a1b2c3", "ddp", "gloo", 2.0),
        ("2026-12-02_09-30-00_d4e5f6", "fsdp", None, 2.1),
    ]:
        settings = hparams(runs / name) | {"trainer": {"strategy": {"process_group_backend": backend}}}
        folder = write_run(runs / name, [val_loss], status("finished"), settings)
        # Hydra's record of the composition, with its own groups (not the project's) and unset ones
        choices = {"trainer": trainer, "loss": "fused", "hparams_search": None, "hydra/launcher": "basic"}
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))

    rows = compare(runs)

    assert [row["run"] for row in rows] == ["`trainer=ddp`", "`trainer=fsdp`"]


def test_a_setting_that_varies_under_one_choice_of_its_group_still_names_the_runs(tmp_path):
    runs = tmp_path / "logs" / "runs"
    for name, loss, smoothing, val_loss in [
        ("2026-12-02_09-00-00_aaaaaa", "naive", 0.0, 2.0),
        ("2026-12-02_10-00-00_bbbbbb", "fused", 0.0, 2.1),
        ("2026-12-02_11-00-00_cccccc", "fused", 0.3, 2.2),
    ]:
        settings = hparams(runs / name, loss=loss)
        settings["loss"] |= {"label_smoothing": smoothing}
        folder = write_run(runs / name, [val_loss], status("finished"), settings)
        (folder / ".hydra").mkdir()
        choices = {"hydra": {"runtime": {"choices": {"loss": loss}}}}
        (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(choices))

    rows = compare(runs)

    # loss.name comes with the choice; fused's chunk_size too; label_smoothing does not
    assert [row["run"] for row in rows] == [
        "`loss=naive,loss.label_smoothing=0.0`",
        "`loss=fused,loss.label_smoothing=0.0`",
        "`loss=fused,loss.label_smoothing=0.3`",
    ]


def test_runs_alike_are_told_apart_by_their_folders(tmp_path):
    runs = tmp_path / "logs" / "runs"
    small = hparams(runs, lr=0.001, batch_size=4)
    write_run(runs / "2026-12-02_09-00-00_aaaaaa", [2.0], status("finished"), small)
    write_run(runs / "2026-12-02_10-00-00_bbbbbb", [2.1], status("finished"), small)
    write_run(runs / "2026-12-02_11-00-00_cccccc", [2.2], status("finished"), hparams(runs, lr=0.003, batch_size=8))
    write_run(runs / "2026-12-02_12-00-00_dddddd", [2.3], status("finished"))  # no hparams.yaml

    rows = compare(runs)

    # The top-level batch_size, Lightning's copy of data.batch_size, is named once.
    assert [row["run"] for row in rows] == [
        "`data.batch_size=4,optimizer.lr=0.001 (2026-12-02_09-00-00_aaaaaa)`",
        "`data.batch_size=4,optimizer.lr=0.001 (2026-12-02_10-00-00_bbbbbb)`",
        "`data.batch_size=8,optimizer.lr=0.003`",
        "`2026-12-02_12-00-00_dddddd`",
    ]


def test_main_writes_the_table_and_the_figure_next_to_the_runs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fused = write_run(sweep / "loss=fused", [3.0, 2.0], status("finished"))
    naive = write_run(sweep / "loss=naive", [3.0, NAN], status("diverged"))

    main([str(fused), str(naive)])  # no --out: their common parent

    table = (sweep / "compare.md").read_text()
    assert table in capsys.readouterr().out
    assert "| `loss=fused` | finished |" in table and "| `loss=naive` | diverged (step 20) |" in table
    assert (sweep / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_wall_time_counts_the_sessions_that_trained_a_run_not_the_time_between(tmp_path):
    """A run trained 10 s, was killed after its checkpoint of step 20, sat a day, and was resumed from
    it for 8 s: its wall time is 18 s. The killed session's steps after 20, which the resumed one
    took again (TensorBoard hides them: purge_step), do not count."""
    run = tmp_path / "loss=fused"
    with SummaryWriter(str(run)) as writer:  # killed in step 25, after 12.5 s
        for step in range(0, 26):
            writer.add_scalar("train/loss", 3.0, step, walltime=1000.0 + step / 2)
    with SummaryWriter(str(run), purge_step=21) as writer:  # resumed from step 20, a day later
        for step in range(21, 31):
            writer.add_scalar("train/loss", 2.0, step, walltime=90_000.0 + (step - 21) * 8 / 9)
    (run / "status.json").write_text(json.dumps(status("finished", step=30, max_steps=30)))

    [row] = compare(tmp_path)

    assert row["wall time (s)"] == "18.0"


def test_the_metrics_table_makes_the_columns_and_a_metric_kept_for_when_asked_shows_only_then(tmp_path, monkeypatch):
    """A new metric is one entry of the metrics table: compare shows it, summed up and formatted as
    the entry says; one kept for when asked (a section of diagnostics) shows when its section is asked."""
    monkeypatch.setitem(METRICS, "val/top5", Metric("val/top5", "val top-5", "{:.1%}", "higher", compare="last"))
    monkeypatch.setitem(
        METRICS,
        "diag/max_logit",
        Metric("diag/max_logit", "max logit", "{:.1f}", None, section="diag", compare="max", asked=True),
    )
    run = write_run(tmp_path / "loss=fused", [3.0, 2.0], status("finished"))
    with SummaryWriter(str(run)) as writer:
        writer.add_scalar("val/top5", 0.25, 10)
        for step, logit in [(5, 12.0), (10, 31.0)]:
            writer.add_scalar("diag/max_logit", logit, step)
    runs = load_runs([run])

    [row] = rows_of(markdown_table(runs))
    assert list(row)[-3:] == ["val top-5", "wall time (s)", "non-finite"] and row["val top-5"] == "25.0%"
    [row] = rows_of(markdown_table(runs, asked={"diag"}))
    assert list(row)[-4:-2] == ["val top-5", "max logit"] and row["max logit"] == "31.0"


def test_the_figures_panels_are_the_metrics_the_table_marks_plotted_each_on_its_own_scale(tmp_path, monkeypatch):
    """A new plotted metric is one entry of the metrics table: a panel of its own, titled by its label,
    after the others; perplexity keeps its log scale wherever its panel is."""
    monkeypatch.setitem(METRICS, "val/top5", Metric("val/top5", "val top-5", "{:.1%}", "higher", plotted=True))
    run = write_run(tmp_path / "loss=fused", [3.0, 2.0], status("finished"))
    with SummaryWriter(str(run)) as writer:
        for step, value in [(0, 0.1), (10, 0.25)]:
            writer.add_scalar("val/top5", value, step)

    axes = curves_figure(load_runs([run])).axes

    assert [(ax.get_title(), ax.get_yscale()) for ax in axes] == [
        ("train loss", "linear"),
        ("val loss", "linear"),
        ("val ppl", "log"),
        ("val top-5", "linear"),
    ]
    assert list(axes[-1].lines[0].get_ydata()) == pytest.approx([0.1, 0.25])


def test_the_logit_diagnostics_show_when_their_section_is_asked_for(tmp_path, capsys):
    """compare_runs.py --show logits adds the logit diagnostics' columns, summed up as the table says;
    a section that is not one is refused by argparse, naming the choices."""
    run = write_run(tmp_path / "loss=fused", [3.0, 2.0], status("finished"))
    with SummaryWriter(str(run)) as writer:
        for step, (max_logit, entropy) in enumerate([(12.0, 5.5), (31.0, 4.25)], start=1):
            writer.add_scalar("logits/max_logit", max_logit, step)
            writer.add_scalar("logits/entropy", entropy, step)
    [row] = compare(run)
    assert not {"largest logit", "entropy (nats)"} & set(row)
    main([str(run), "--show", "logits"])
    [row] = table_rows(run / "compare.md")
    assert row["largest logit"] == "31.000" and row["entropy (nats)"] == "4.2500"
    assert row["mean log-sum-exp"] == "n/a"  # not logged by this run
    with pytest.raises(SystemExit):
        main([str(run), "--show", "logit"])
    assert "invalid choice: 'logit'" in capsys.readouterr().err
