import pytest
import torch

from losslab.losses import LOSSES


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are small: intra-op threads only add overhead (a lot, on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def skip_peers_that_cannot_run(request):
    """A test of a registry entry (its ``name`` parameter) that cannot run on this machine, a peer
    whose package or device is missing, is skipped with the reason its class gives."""
    name = getattr(request.node, "callspec", None) and request.node.callspec.params.get("name")
    if name in LOSSES and LOSSES[name].unavailable_reason():
        pytest.skip(f"{name}: {LOSSES[name].unavailable_reason()}")
