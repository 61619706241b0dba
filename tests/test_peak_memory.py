"""The predicted peak memory (losslab.peak_memory): what it is made of, and that it is what a step
measures: the peak resident memory of a benchmark worker on a CPU, and for tiled (CUDA, or
Triton's interpreter here) the peak of torch's own allocations."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from losslab.bench import Config, loss_step, make_inputs, measure_rows_in_worker, prediction, setups, unavailable
from losslab.losses import LOSSES, build_loss, default_chunk_size
from losslab.losses.fused import padded_width
from losslab.memory import CLEAR_REFS
from losslab.peak_memory import ENTRIES, MIB, banner_line, predict, predict_loss

# Small, but with full-size tensors of 4 MiB, well above what the process does besides; d=256 for
# torch_lce's automatic chunks, of 8 rows here (1 to 2 rows at d=128: a minute a step on 2 cores).
SMALL = Config(tokens=256, vocab=4096, dim=256, dtype="float32")
LOGITS = SMALL.tokens * SMALL.vocab * 4
# A prediction is optional (README, "Add a loss"): those there are, of the entries that run here.
CPU_ENTRIES = [name for name in LOSSES if name in ENTRIES and name not in unavailable()]


@pytest.fixture(scope="module")
def measured():
    """Each entry that runs here, measured as the benchmark does, all in one worker process."""
    results = measure_rows_in_worker(CPU_ENTRIES, SMALL, device="cpu", warmup=0, repeats=1)
    return {result.impl: result for result in results}


@pytest.mark.skipif(not CLEAR_REFS.exists(), reason="the CPU peak memory needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("name", CPU_ENTRIES)
def test_the_predicted_peak_is_within_15_percent_of_the_measured_one(measured, name):
    result = measured[name]
    assert result.error is None, result.error
    assert result.predicted_mib == predict(name, *SMALL).mib
    assert 0.85 < result.peak_mib / result.predicted_mib < 1.15, (result.peak_mib, predict(name, *SMALL).itemised())


def test_tiled_allocates_what_is_predicted_for_it(monkeypatch):
    """On CUDA the caching allocator's peak is the peak of torch's allocations: here, the same count
    (torch's profiler) of a step under Triton's interpreter, whose own NumPy copies it leaves out."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    config = Config(tokens=128, vocab=2048, dim=64, dtype="float32")
    inputs = make_inputs(config.tokens, config.vocab, config.dim)
    peak = allocated_peak(setups()["tiled"](inputs, config.dtype).run, inputs)
    assert 0.85 < peak / (predict("tiled", *config).mib * MIB) < 1.15


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_torch_lce_unchunked_allocates_what_is_predicted_for_it(dtype):
    """Unchunked (label smoothing needs it), torch's linear_cross_entropy is F.linear then F.cross_entropy."""
    config = Config(tokens=128, vocab=2048, dim=64, dtype=dtype)
    inputs = make_inputs(config.tokens, config.vocab, config.dim)
    loss = build_loss("torch_lce", chunking_method=None, label_smoothing=0.1)
    peak = allocated_peak(loss_step("torch_lce", loss, inputs, dtype).run, inputs)
    assert 0.85 < peak / (predict_loss(loss, *config).mib * MIB) < 1.15


def allocated_peak(run, inputs) -> int:
    """The peak bytes of torch's allocations (its profiler) during the second call of ``run``, the
    inputs' gradients cleared before it."""
    run()
    inputs.hidden.grad = inputs.weight.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        run()
    events = sorted(
        (event for event in profiled.profiler.kineto_results.events() if event.name() == "[memory]"),
        key=lambda event: event.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_a_peak_is_the_sum_of_its_named_buffers():
    found = predict("cross_entropy", *SMALL)
    assert [buffer.shape for buffer in found.peak.buffers] == [(SMALL.tokens, SMALL.vocab)] * 3
    assert found.peak.nbytes == 3 * LOGITS == found.mib * MIB
    for name in ENTRIES:
        for dtype in ("float32", "bf16"):
            peak = predict(name, *SMALL[:3], dtype).peak
            names = [buffer.name for buffer in peak.buffers]
            assert all(names) and len(set(names)) == len(names), names
            assert peak.nbytes == sum(buffer.nbytes for buffer in peak.buffers)
    text = found.itemised().splitlines()
    assert text[0] == "cross_entropy: peak 12.0 MiB, log_softmax's backward:"
    assert text[1].split() == ["4.0", "MiB", "log_softmax's", "output,", "saved", "for", "its", "backward"] + [
        "(256",
        "x",
        "4096,",
        "float32)",
    ]


@pytest.mark.whole_registry
def test_a_prediction_is_of_a_registry_entry_and_a_loss_without_one_is_said_to_have_none(monkeypatch):
    assert set(ENTRIES) <= {*LOSSES, "floor"}
    monkeypatch.delitem(ENTRIES, "fused")  # as a newly registered loss: no prediction of its own
    loss = build_loss("fused", reduction="sum", return_parts=True)
    assert banner_line(loss, 4, 32, 8192, 128, "32-true").endswith(": no prediction for this loss")
    assert prediction("fused", SMALL) is None


def test_a_prediction_follows_its_entrys_chunks_and_dtype():
    vocab = 50257
    chunk = predict("fused", 8192, vocab, 768).peak.buffers[0]
    # its rows padded to whole cache lines: 50,272 float32 columns
    assert chunk.shape == (default_chunk_size(vocab), 50272) and chunk.dtype == torch.float32
    assert predict("fused", 8192, vocab, 768, chunk_size=64).peak.buffers[0].shape == (
        64,
        padded_width(vocab, torch.float32),
    )
    # under bf16 autocast the full-logits entries keep bf16 copies of hidden and weight too
    bf16_copies = (SMALL.tokens + SMALL.vocab) * SMALL.dim * 2
    assert predict("naive", *SMALL[:3], "bf16").peak.nbytes == predict("naive", *SMALL).peak.nbytes + bf16_copies
    # a benchmark variant is predicted with its own options
    variant = prediction("torch_lce_chunked", Config(8192, vocab, 768, "float32"))
    assert variant.moments[0].buffers[0].shape == (default_chunk_size(vocab), vocab)
    with pytest.raises(ValueError, match="no memory prediction for 'mine'"):
        predict("mine", *SMALL)
    with pytest.raises(ValueError, match="the memory prediction of 'fused' has no option softcap"):
        predict("fused", *SMALL, softcap=30.0)


def test_the_banner_line_states_the_runs_own_sizes_and_precision():
    loss = build_loss("fused", reduction="sum", return_parts=True)
    line = banner_line(loss, 4, 32, 8192, 128, "bf16-mixed")
    expected = predict("fused", 128, 8192, 128, "bf16")
    assert line.startswith("Loss memory (fused, N=128 = 4 x 32 tokens, V=8,192, d=128, bf16): forward+backward ")
    assert f"peak at {expected.mib:.1f} MiB = " in line
    assert "no prediction for precision 16-mixed" in banner_line(loss, 4, 32, 8192, 128, "16-mixed")


def test_under_tensor_parallelism_the_banner_states_each_processs_peak():
    """trainer=tp splits the head's rows: the banner states the peak of the process holding the most of them
    (checked against each process's measured peak in tests/losses/test_vocab_parallel.py)."""
    loss = build_loss("fused", reduction="sum", return_parts=True)
    line = banner_line(loss, 4, 32, 8193, 128, "32-true", tensor_parallel_size=2)
    expected = predict("fused", 128, 8193, 128, vocab_shards=2)
    assert "V=8,193, d=128, the head split over 2 processes: at most 4,097 rows each, float32)" in line
    assert f"predicted to peak on each process at {expected.mib:.1f} MiB = " in line
    assert expected.peak.buffers == predict("fused", 128, 4097, 128).peak.buffers
    assert expected.mib < predict("fused", 128, 8193, 128).mib / 1.9
    with pytest.raises(ValueError, match="no memory prediction for 'naive' over vocab_shards=2 processes"):
        predict("naive", 128, 8193, 128, vocab_shards=2)
