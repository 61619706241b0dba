"""The benchmark harness (losslab.bench): inputs, timing, peak memory, worker processes, the table,
and the rows it runs (speed itself is not tested)."""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from losslab.bench import (
    MIB,
    Config,
    Result,
    make_inputs,
    measure,
    measure_in_worker,
    peak_memory_mib,
    setups,
    time_calls,
    unavailable,
)
from losslab.bench_report import markdown_table, results_markdown, write_json
from losslab.losses import LOSSES
from losslab.losses.cross_entropy import CrossEntropyLoss
from losslab.memory import CLEAR_REFS

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY = Config(tokens=64, vocab=256, dim=16, dtype="float32")


def test_inputs_have_the_shapes_and_dtype_asked_for():
    hidden, weight, targets = make_inputs(8, 32, 4, dtype=torch.bfloat16)
    assert hidden.shape == (8, 4) and weight.shape == (32, 4) and targets.shape == (8,)
    assert hidden.dtype == weight.dtype == torch.bfloat16 and targets.dtype == torch.int64
    assert hidden.requires_grad and weight.requires_grad
    assert 0 <= targets.min() and targets.max() < 32


def test_inputs_are_seeded_and_spread_as_documented():
    first, again, other = (make_inputs(256, 512, 16, seed=seed) for seed in (1, 1, 2))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first.hidden, other.hidden)
    assert 0.9 < first.hidden.std() < 1.1 and 0.018 < first.weight.std() < 0.022


def test_time_calls_runs_warmup_then_repeats_with_fresh_gradients():
    tensor = torch.zeros(3, requires_grad=True)
    grads_seen = []

    def fn():
        grads_seen.append(tensor.grad)
        tensor.grad = torch.ones(3)
        time.sleep(0.001)

    timing = time_calls(fn, CPU, warmup=2, repeats=3, grad_to_none=[tensor])
    assert grads_seen == [None] * 5
    assert len(timing.times_s) == 3 and all(seconds > 0 for seconds in timing.times_s)
    assert timing.median_s == sorted(timing.times_s)[1]


@pytest.mark.skipif(not CLEAR_REFS.exists(), reason="the CPU peak memory needs Linux's /proc/self/clear_refs")
def test_cpu_peak_memory_is_the_calls_own_allocation():
    kept = torch.ones(50 * MIB // 4)  # allocated before the call: not counted
    before = torch.ones(500 * MIB // 4)  # the process's peak so far, above the call's: not counted either
    del before
    peak = peak_memory_mib(lambda: torch.ones(200 * MIB // 4).sum(), CPU)
    assert 100 < peak < 400  # resident memory is noisy: only roughly 200 MiB
    assert kept.sum() == kept.numel()


@pytest.mark.whole_registry
def test_every_row_is_a_registered_loss_that_can_run_here_a_variant_of_one_or_the_floor():
    runnable = [name for name in LOSSES if name not in unavailable()]
    variants = [f"{name}_{variant}" for name in runnable for variant in LOSSES[name].bench_variants(vocab_size=1)]
    assert list(setups()) == [*runnable, *variants, "floor"]
    assert "torch_lce_chunked" in variants  # torch's own, in chunks of fused's rows
    step = setups()["torch_lce_chunked"](make_inputs(8, 50257, 4), "float32")
    assert step.label == "torch_lce (batch_chunk_size=512)"
    for name, reason in unavailable().items():  # a peer without its package or device, named with why
        assert reason == LOSSES[name].unavailable_reason() and reason


def load_bench_losses_script():
    spec = importlib.util.spec_from_file_location("bench_losses", ROOT / "scripts" / "bench_losses.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_a_newly_registered_loss_is_benchmarked_with_no_script_edit(monkeypatch):
    monkeypatch.setitem(LOSSES, "my_loss", CrossEntropyLoss)
    assert "my_loss" in load_bench_losses_script().parse_args([]).impls
    result = measure("my_loss", Config(16, 64, 8, "bf16"), device="cpu", warmup=0, repeats=1)
    assert result.label == "my_loss" and result.time_s > 0 and result.error is None


def test_a_worker_process_measures_and_returns_its_result():
    result = measure_in_worker("floor", TINY, device="cpu", warmup=1, repeats=2)
    assert result.error is None, result.error
    assert (result.impl, result.config, result.label) == ("floor", TINY, "matmul floor")
    assert len(result.times_s) == 2 and result.time_s > 0 and result.peak_mib >= 0


def test_a_failing_worker_gives_a_result_with_its_error():
    result = measure_in_worker("no_such_loss", TINY, device="cpu", warmup=0, repeats=1)
    assert result.error == "KeyError: 'no_such_loss'"
    assert result.time_s is None and result.label == "no_such_loss"


def test_markdown_table_aligns_numbers_right():
    assert markdown_table(["loop", "tokens/s"], [["plain", "9,658"]]) == (
        "| loop | tokens/s |\n|---|---:|\n| plain | 9,658 |\n"
    )


HEADER = (
    "| implementation | time s | x floor | x cross_entropy | peak MiB | predicted MiB | peak / predicted "
    "| x cross_entropy memory |"
)


def test_results_table_has_a_section_per_configuration_and_ratios_to_floor_and_cross_entropy():
    bf16 = TINY._replace(dtype="bf16")
    results = [
        Result("cross_entropy", *TINY, label="cross_entropy", time_s=2.0, peak_mib=20.0, predicted_mib=16.0),
        Result("fused", *TINY, label="fused", time_s=1.5, peak_mib=5.0),
        Result("torch_lce", *TINY, label="torch_lce", predicted_mib=4.0, error="boom"),
        Result("floor", *TINY, label="matmul floor", time_s=1.0, peak_mib=10.0),
        Result("fused", *bf16, label="fused", time_s=0.5, peak_mib=4.0),
    ]
    info = {"torch": "2.13.0", "device_name": "a CPU", "threads": 2, "date": "2026-01-01T00:00:00"}
    assert results_markdown(results, info) == (
        "torch 2.13.0, a CPU, 2 threads, 2026-01-01T00:00:00\n"
        "\n"
        "### N=64, V=256, d=16, float32\n"
        "\n"
        f"{HEADER}\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        "| cross_entropy | 2 | 2.00 | 1.00 | 20.0 | 16.0 | 1.25 | 1.00 |\n"
        "| fused | 1.5 | 1.50 | 0.75 | 5.0 | - | - | 0.25 |\n"
        "| torch_lce | failed: boom |  |  |  | 4.0 |  |  |\n"
        "| matmul floor | 1 | 1.00 | 0.50 | 10.0 | - | - | 0.50 |\n"
        "\n"
        "### N=64, V=256, d=16, bf16\n"
        "\n"
        f"{HEADER}\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        "| fused | 0.5 | - | - | 4.0 | - | - | - |\n"
    )


def test_json_holds_the_context_and_the_results(tmp_path):
    result = Result("fused", *TINY, label="fused", time_s=1.5, times_s=[1.4, 1.5, 1.6], peak_mib=5.0)
    write_json(tmp_path / "bench.json", [result], machine={"torch": "2.13.0"})
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["machine"] == {"torch": "2.13.0"}
    assert [Result(**row) for row in report["results"]] == [result]
