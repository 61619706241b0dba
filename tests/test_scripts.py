"""The benchmark scripts run end to end on tiny sizes (their speed goals are not tested here)."""

import importlib.util
import json
import pstats
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
from helpers import REPO, make_config


def run_script(name: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_bench_losses_writes_a_table_json_and_chart(tmp_path):
    out = run_script(
        "bench_losses.py",
        "--tokens",
        "64",
        "--vocab",
        "256",
        "--dim",
        "16",
        "--dtypes",
        "float32",
        "--impls",
        "fused",
        "floor",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--out-dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert "| fused |" in out and "| matmul floor |" in out
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {row["impl"] for row in report["results"]} == {"fused", "floor"}
    assert all(row["time_s"] > 0 and row["peak_mib"] >= 0 for row in report["results"])
    assert next(tmp_path.glob("*.png")).stat().st_size > 10_000


def test_bench_train_compares_each_loss_with_a_plain_loop(tmp_path, monkeypatch, capsys):
    bench_train = load_script("bench_train")
    monkeypatch.chdir(tmp_path)
    arguments = ["--steps", "3", "--skip", "1", "--rounds", "1", "--losses", "cross_entropy,fused", "tokenizer=bytes"]
    arguments += ["model.n_layer=1", "model.n_embd=32", "model.context_length=32", "data.batch_size=4"]
    monkeypatch.setattr(sys, "argv", ["bench_train.py", *arguments])
    bench_train.main()
    out = capsys.readouterr().out
    table = out[out.index("| loss |") :].strip().splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| `cross_entropy`", "| `fused`"]
    assert all(float(row.split(" | ")[3]) > 0 for row in table[2:])  # lab / plain
    assert "round 1, fused:" in out and "the plain loop beside it" in out


def test_bench_train_profile_finds_every_part_of_both_steps(tmp_path):
    """--profile: each part's functions ran inside the profiled steps (a renamed one would read 0 ms)."""
    bench_train = load_script("bench_train")
    overrides = ["loss=cross_entropy", "step.logit_diagnostics_every_n_steps=1", "trainer.enable_progress_bar=true"]
    overrides += [
        "+callbacks.progress_bar._target_=losslab.callbacks.ProgressLines",
        "+callbacks.progress_bar.every_n_steps=1",
    ]
    timer = bench_train.interleaved_run(make_config(tmp_path, tmp_path / "cache", overrides), 3, 1, profile=True)
    assert timer.steps == 2
    for arm, side in (("lab", 0), ("plain", 1)):
        profiled = pstats.Stats(timer.profiles[arm]).stats
        for part, functions in bench_train.PARTS.items():
            assert all(bench_train.code(function) in profiled for function in functions[side]), (arm, part)
    rows = [row.strip("| ").split(" | ") for row in bench_train.profile_table("cross_entropy", timer).splitlines()[4:]]
    assert [row[0] for row in rows] == ["the whole step", *bench_train.PARTS]
    whole, forward = rows[0], rows[1]
    assert all(float(ms) > 0 for ms in [*whole[1:], *forward[1:]])
    assert float(whole[1]) > float(forward[1]) and float(whole[2]) > float(forward[2])


def test_bench_train_alternates_the_lab_and_the_plain_loop_step_by_step(tmp_path, monkeypatch):
    bench_train = load_script("bench_train")
    ends = []
    step_end = bench_train.StepClock.step_end
    monkeypatch.setattr(
        bench_train.StepClock,
        "step_end",
        lambda clock, step, batch: ends.append((clock, step)) or step_end(clock, step, batch),
    )
    cfg = make_config(tmp_path, tmp_path / "cache", ["loss=fused"])
    lab, plain, _ = bench_train.interleaved_tokens_per_sec(cfg, steps=3, skip=1)
    lab_clock, plain_clock = ends[0][0], ends[1][0]
    assert lab_clock is not plain_clock
    assert ends == [(clock, step) for step in range(3) for clock in (lab_clock, plain_clock)]
    assert len(lab_clock.speeds) == len(plain_clock.speeds) == 2 and lab > 0 and plain > 0


def test_bench_train_plain_loop_starts_a_new_epoch_as_the_lab_does(tmp_path):
    bench_train = load_script("bench_train")
    corpus = tmp_path / "small.txt"
    corpus.write_text("".join(f"To be, or not to be: question {i}.\n\n" for i in range(30)))
    cfg = make_config(tmp_path, tmp_path / "cache", ["data=text", f"data.path={corpus}"])
    plain = bench_train.PlainLoop(cfg, skip=1)
    epoch = len(plain.loader)
    for step in range(epoch + 2):
        plain.step(step)
    assert epoch < 10 and len(plain.clock.speeds) == epoch + 1


def test_bench_train_plain_step_frees_its_logits_before_its_clock_stops(tmp_path):
    # freed after it (823 MB take about 60 ms at the README's size), they would count in the lab's step
    bench_train = load_script("bench_train")
    plain = bench_train.PlainLoop(make_config(tmp_path, tmp_path / "cache", ["loss=cross_entropy"]), skip=1)
    logits, alive_at_step_end = [], []
    plain.model.lm_head.register_forward_hook(lambda module, args, output: logits.append(weakref.ref(output)))
    step_end = plain.clock.step_end
    plain.clock.step_end = lambda *args: alive_at_step_end.append(logits[-1]() is not None) or step_end(*args)
    for step in range(2):
        plain.step(step)
    assert alive_at_step_end == [False, False]


def test_bench_train_names_an_unknown_loss_in_one_line(monkeypatch):
    bench_train = load_script("bench_train")
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--losses", "cross_entropy,nope", "tokenizer=bytes"])
    with pytest.raises(SystemExit) as exit:
        bench_train.main()
    assert str(exit.value.code).startswith("error: In 'train': Could not find 'loss/nope'")


def test_bench_train_stops_at_ctrl_c_rather_than_going_on_to_the_next_run(tmp_path, monkeypatch, caplog):
    """and says what it does: it saves nothing (train.py's Ctrl-C says it saves the step)."""
    bench_train = load_script("bench_train")

    class PressedAtOnce(bench_train.GracefulInterrupt):
        def on_train_start(self, trainer, pl_module):
            self.request(signal.SIGINT, None)

    monkeypatch.setattr(bench_train, "GracefulInterrupt", PressedAtOnce)
    cfg = make_config(tmp_path, tmp_path / "cache", ["loss=cross_entropy"])
    with pytest.raises(SystemExit, match="stopped by Ctrl-C"):
        bench_train.interleaved_tokens_per_sec(cfg, steps=3, skip=1)
    assert "Ctrl-C: stopping after this step, with no table (press Ctrl-C again" in caplog.text
    assert "saving" not in caplog.text


@pytest.mark.parametrize(
    "args",
    [
        ["--skip", "0"],
        ["--steps", "5", "--skip", "5"],
        ["--rounds", "0"],
        ["loss=fused"],
        ["--losses", ","],
        ["--threads", "0"],
        ["--clock", "cpu"],
    ],
)
def test_bench_train_refuses_what_it_cannot_time(args, capsys):
    bench_train = load_script("bench_train")
    with pytest.raises(SystemExit) as exit:
        bench_train.parse_args(args)
    assert exit.value.code == 2 and "error:" in capsys.readouterr().err


def test_bench_padding_times_both_layouts_and_leaves_fused_padded(monkeypatch, capsys):
    import losslab.losses.fused as fused

    padded_width = fused.padded_width
    bench_padding = load_script("bench_padding")
    tiny = ["--rows", "4", "--tokens", "8", "--vocab", "37", "--dim", "8", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", ["bench_padding.py", *tiny])
    bench_padding.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("V=37, d=8, ")
    assert any("fused, padded rows" in line for line in lines) and any("fused, unpadded rows" in line for line in lines)
    assert fused.padded_width is padded_width  # the unpadded arm switched it off in its call only
    monkeypatch.setattr(sys, "argv", ["bench_padding.py", "--repeats", "0"])
    with pytest.raises(SystemExit):
        bench_padding.main()
