"""scripts/gpu_check.sh as far as a CPU goes: its arguments, its refusal without CUDA, and its report
(losslab.gpu_check) from the files its steps leave, written here as its tools write them."""

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO

from losslab.bench import Result, setups
from losslab.bench_report import write_json
from losslab.gpu_check import BENCH_IMPLS, bench_impls, main, read_tests, report

SCRIPT = REPO / "scripts" / "gpu_check.sh"
MACHINE = {"GPU": "NVIDIA H200, 140 GiB, 132 SMs", "torch": "2.13.0", "triton": "3.9.0"}
BENCH_MACHINE = {"torch": "2.13.0", "device_name": "NVIDIA H200", "threads": 16, "date": "2026-12-05T10:00:00"}
CONFIG = dict(tokens=8192, vocab=128256, dim=4096, dtype="bf16")


def gpu_check(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# --- the script's arguments ---------------------------------------------------------------------


def test_help_prints_the_usage():
    run = gpu_check("--help")
    assert run.returncode == 0 and run.stdout.startswith("usage: scripts/gpu_check.sh [--out DIR]")


@pytest.mark.parametrize(
    "args,message", [(["--bogus"], "unknown argument: --bogus"), (["--out"], "--out needs a folder")]
)
def test_bad_arguments_are_refused_with_the_usage(args, message):
    run = gpu_check(*args)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"gpu_check.sh: {message}", gpu_check("--help").stdout.strip()]


def test_without_cuda_it_is_refused_naming_cuda_and_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = gpu_check("--out", "results", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "gpu_check.sh: no CUDA GPU here (torch.cuda.is_available() is False): run it on a machine with one, "
        "with a CUDA build of torch"
    )
    assert not (tmp_path / "results").exists() and not list(tmp_path.iterdir())


# --- its report ---------------------------------------------------------------------------------


def write_steps(folder: Path, *steps: tuple[str, int, int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "steps.tsv").write_text("".join("\t".join(map(str, step)) + "\n" for step in steps))


def write_bench(folder: Path, times_and_peaks: dict[str, tuple[float, float]], left_out=None) -> None:
    """A bench_losses.py JSON per row, as the script's benchmark steps leave them."""
    for impl, (time_s, peak_mib) in times_and_peaks.items():
        label = "matmul floor" if impl == "floor" else impl
        result = Result(impl, **CONFIG, label=label, time_s=time_s, times_s=[time_s], peak_mib=peak_mib)
        (folder / "bench" / impl).mkdir(parents=True)
        path = folder / "bench" / impl / "bench_losses-20261205-100000.json"
        write_json(path, [result], machine=BENCH_MACHINE, settings={}, left_out=left_out or {})


@pytest.fixture(scope="module")
def junit_xml(tmp_path_factory) -> Path:
    """A JUnit XML that pytest wrote, of a pass, a failure and two skips."""
    folder = tmp_path_factory.mktemp("junit")
    (folder / "test_some.py").write_text(
        "import pytest\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert 1 == 2, 'loss: max error 1 > allowed 0.1'\n"
        "@pytest.mark.parametrize('x', [1, 2])\n"
        "def test_skips(x): pytest.skip('needs a CUDA device')\n"
    )
    command = ["python", "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "--junitxml=tests.xml", "test_some.py"]
    subprocess.run(command, cwd=folder, capture_output=True, timeout=60)
    return folder / "tests.xml"


def test_the_tests_junit_xml_is_summed_up(junit_xml):
    tests = read_tests(junit_xml)
    assert tests.counts == {"passed": 1, "failed": 1, "skipped": 2}
    assert tests.failures == [("test_some::test_fails", "AssertionError: loss: max error 1 > allowed 0.1")]
    assert dict(tests.skips) == {"needs a CUDA device": 2}


def test_the_report_holds_the_machine_every_step_the_tests_the_benchmark_and_the_goal(tmp_path, junit_xml):
    write_steps(tmp_path, ("tests", 1, 95, 110), ("bench-tiled", 0, 40, 90), ("bench-cce", 124, 90, 90))
    (tmp_path / "tests.xml").write_text(junit_xml.read_text())
    rows = {"floor": (0.05, 3000.0), "tiled": (0.2, 2100.0), "liger": (0.1, 2500.0), "cce": (0.15, 2200.0)}
    write_bench(tmp_path, rows, left_out={"torch_lce": "left out here"})
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "compare.md").write_text("| run | status |\n|---|---|\n| `loss=tiled` | finished |\n")

    text = report(tmp_path, MACHINE)
    assert text.startswith(
        "# losslab GPU check\n\n- GPU: NVIDIA H200, 140 GiB, 132 SMs\n- torch: 2.13.0\n- triton: 3.9.0\n"
    )
    assert "| tests | failed (exit status 1) | 95 |" in text
    assert "| bench-tiled | ok | 40 |" in text and "| bench-cce | timed out (90 s) | 90 |" in text
    assert "1 failed, 1 passed, 2 skipped." in text
    assert "- FAILED `test_some::test_fails`: AssertionError: loss: max error 1 > allowed 0.1" in text
    assert "- skipped (2): needs a CUDA device" in text
    assert "### N=8192, V=128256, d=4096, bf16" in text
    table = text[text.index("| implementation |") :]
    assert [line.split(" | ")[0] for line in table.splitlines()[2:6]] == [
        "| tiled",
        "| liger",
        "| cce",
        "| matmul floor",
    ]
    assert "| tiled | 0.2 | 4.00 | - | 2100.0 | - |" in text
    assert "- left out: torch_lce: left out here" in text
    assert "- tiled's peak memory at most cce's: met (2100 MiB against 2200 MiB)" in text
    assert "- tiled's time at most liger's: not met (0.2 s against 0.1 s)" in text
    assert text.endswith("| `loss=tiled` | finished |\n\n")


def test_what_a_step_did_not_leave_is_said_not_left_out(tmp_path):
    write_bench(tmp_path, {"tiled": (0.2, 2100.0)})
    text = report(tmp_path, MACHINE)
    assert "No step ran (no steps.tsv)." in text
    assert "No test results (tests.xml is missing or cut short): see tests.log." in text
    assert "- tiled's peak memory at most cce's: not measured (cce: no result)" in text
    assert "No comparison (train/compare.md): see train.log." in text
    (tmp_path / "tests.xml").write_text("<testsuites><testsuite")  # a run killed while writing it
    assert "No test results" in report(tmp_path, MACHINE)


def test_a_failed_benchmark_row_is_no_result_for_the_goal(tmp_path):
    write_bench(tmp_path, {"liger": (0.1, 2500.0), "cce": (0.15, 2200.0)})
    failed = Result("tiled", **CONFIG, label="tiled", error="CUDA out of memory")
    (tmp_path / "bench" / "tiled").mkdir()
    write_json(tmp_path / "bench" / "tiled" / "bench_losses-1.json", [failed], machine=BENCH_MACHINE, settings={})
    text = report(tmp_path, MACHINE)
    assert "| tiled | failed: CUDA out of memory |" in text
    assert "- tiled's time at most liger's: not measured (tiled: no result)" in text


def test_main_writes_the_report_and_exits_1_unless_every_step_passed(tmp_path, capsys):
    write_steps(tmp_path, ("tests", 0, 10, 110), ("train", 0, 50, 90))
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text().startswith("# losslab GPU check\n")
    write_steps(tmp_path, ("tests", 0, 10, 110), ("bench-cce", -1, 0, 0))
    assert main([str(tmp_path)]) == 1
    assert "| bench-cce | not run: no time left | 0 |" in (tmp_path / "report.md").read_text()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert "not a folder of gpu_check.sh's results" in capsys.readouterr().err


def test_the_benchmark_rows_are_those_asked_for_that_can_run_here():
    assert bench_impls() == [impl for impl in BENCH_IMPLS if impl in setups()]
    assert {"fused", "floor"} <= set(bench_impls())
