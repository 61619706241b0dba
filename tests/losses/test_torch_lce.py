"""torch_lce under bf16 autocast, as the README's table of options says: torch's chunked path (the entry's
default) ignores autocast and computes in float32; its unchunked path (label smoothing needs it) is
``F.linear`` then ``F.cross_entropy``, so that autocast gives it bf16 logits, of the inputs divided by the
temperature (see losslab.losses.peer)."""

import pytest
import torch
import torch.nn.functional as F

from losslab.losses import LossParts

from .reference import build, evaluate, make_inputs, random_upstream

CHUNKED = {"default": {}, "batch_chunk_size=16": dict(batch_chunk_size=16, chunking_method=None)}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunking", CHUNKED)
def test_the_chunked_path_ignores_autocast(chunking, temperature):
    hidden, weight, targets = make_inputs((40,), 24, 300, ignore_index=-100)
    upstream = random_upstream(targets, "mean")
    loss_fn = build("torch_lce", temperature=temperature, **CHUNKED[chunking])
    float32 = evaluate(loss_fn, hidden, weight, targets, upstream)
    autocast = evaluate(loss_fn, hidden, weight, targets, upstream, autocast=True)
    for field in ("loss", "nll", "grad_hidden", "grad_weight"):
        assert torch.equal(getattr(autocast, field), getattr(float32, field)), field


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_unchunked_path_computes_bf16_logits_under_autocast(temperature):
    hidden, weight, targets = make_inputs((40,), 24, 300, ignore_index=-100)
    upstream = random_upstream(targets, "mean")
    loss_fn = build("torch_lce", temperature=temperature, chunking_method=None, label_smoothing=0.1)

    def plain_torch(hidden, weight, targets, bias=None):
        logits = F.linear(hidden / temperature, weight)  # bf16 under autocast
        # float32 under autocast; summed, then divided, as the entry does (see losslab.losses.peer)
        loss = F.cross_entropy(logits, targets, label_smoothing=0.1, reduction="sum") / (targets != -100).sum()
        return LossParts(loss, loss.detach(), torch.zeros_like(loss), None, None)

    got = evaluate(loss_fn, hidden, weight, targets, upstream, autocast=True)
    expected = evaluate(plain_torch, hidden, weight, targets, upstream, autocast=True)
    float32 = evaluate(loss_fn, hidden, weight, targets, upstream)
    for field in ("loss", "grad_hidden", "grad_weight"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
        assert not torch.equal(getattr(got, field), getattr(float32, field)), field
