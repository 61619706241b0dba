import pytest
import torch

from losslab.losses import LOSSES

# Without CUDA, Triton's interpreter runs loss=tiled's kernels on CPU tensors (in float32 and float64):
# tests/conftest.py imported them so, unless TRITON_INTERPRET was set by the caller, as it is here then.
try:
    from losslab.losses import tiled_kernels
except ImportError:  # no triton
    tiled_kernels = None
INTERPRETER = tiled_kernels is not None and tiled_kernels.interpreted()


@pytest.fixture(autouse=True)
def triton_interpreter_without_cuda(monkeypatch):
    """TRITON_INTERPRET=1 for these tests alone (tiled asks for it to run on a CPU): see tests/conftest.py."""
    if INTERPRETER:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are small: intra-op threads only add overhead (a lot, on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def skip_peers_that_cannot_run(request, triton_interpreter_without_cuda):
    """A test of a registry entry (its ``name`` parameter) that cannot run on this machine, a peer
    whose package or device is missing, is skipped with the reason its class gives; so is tiled under
    bf16 autocast in Triton's interpreter, which computes bf16 wrongly (tests/losses/test_cuda.py runs it)."""
    params = getattr(request.node, "callspec", None) and request.node.callspec.params
    name = params and params.get("name")
    if name in LOSSES and LOSSES[name].unavailable_reason():
        pytest.skip(f"{name}: {LOSSES[name].unavailable_reason()}")
    if name == "tiled" and INTERPRETER:
        if params.get("dtype") == "bf16-autocast" or params.get("autocast"):
            pytest.skip(
                "tiled: Triton's interpreter computes bf16 wrongly; bf16 autocast is tested on CUDA (test_cuda.py)"
            )
        if params.get("shape_id") == LARGE_VOCAB and params.get("case_id") not in LARGE_VOCAB_CASES:
            pytest.skip(
                f"tiled in Triton's interpreter: {LARGE_VOCAB} takes 0.5 s a case; every case runs at the other shapes"
            )


# What tiled runs at the reference grid's large vocabulary in the interpreter: every option and reduction.
LARGE_VOCAB = "2x5-d16-V50257"
LARGE_VOCAB_CASES = ("mean", "ignored-sum", "all-bias-class_weights-none", "all-bias-class_weights-mean")
