"""The loss over an LM head sharded by vocabulary rows (``vocab_parallel=VocabParallel(...)``) against the
unsharded float64 reference, on 2, 3 and 4 gloo processes with uneven splits of V = 507.

The ranks run in one launch (``vocab_parallel_ranks.py``, about 20 s) and check their results
themselves; the tests here read what each checked and what failed:

- the single-process grid (test_losses.py's cases) for fused, cross_entropy and logsumexp: every
  LossParts field, the weight's and bias's rows of this rank, the hidden states' gradient summed over
  the group; in float64 to 1e-12 (the gradients too) for every case, and in float32 and bf16 autocast,
  at that grid's tolerances, for cases that hold every option and reduction;
- the parts asked for or not (predictions, diagnostics, the loss alone), each to 1e-12;
- logits that share an offset, with label smoothing and class weights: each token's loss within
  Liger-Kernel's float32 bound (the smoothing term's last digits);
- the hidden states' gradient left to the caller (``reduce_hidden_grad=False``), for each reduction:
  the ranks' parts sum to it;
- ``torch.autograd.gradcheck`` of the hidden states through the group (finite differences), of a mean
  and of per-token losses;
- no vocabulary-wide tensor: a TorchDispatchMode records the shape of every tensor the sharded loss
  creates, forward and backward; none has V entries along a dimension, and fused's largest is one
  chunk of its rows (the unsharded fused, recorded the same way, does create them);
- each rank's peak memory of the loss step against its prediction (losslab.peak_memory), and fused's
  against the whole head's;
- the argmax over the whole vocabulary, ties to the lowest id, across ranks;
- ranks whose ranges do not tile the vocabulary, that got other tokens or built the loss with other
  options, refused on every rank.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from losslab.losses import LOSSES, VocabParallel, build_loss, vocab_parallel_losses
from losslab.losses.vocab_parallel import shard_range

RANKS_SCRIPT = Path(__file__).with_name("vocab_parallel_ranks.py")
WORLD_SIZES = (2, 3, 4)
SHARDED = ("fused", "cross_entropy", "logsumexp")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 4 ranks checked, and what failed (see vocab_parallel_ranks.py)."""
    out = tmp_path_factory.mktemp("vocab_parallel")
    done = subprocess.run([sys.executable, str(RANKS_SCRIPT), str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(max(WORLD_SIZES))]


def checks(ranks: list[dict], fragment: str) -> tuple[list[str], dict[str, str]]:
    """The checks whose key holds ``fragment``, on every rank, and those that failed."""
    checked = [f"rank {r}: {key}" for r, results in enumerate(ranks) for key in results["checked"] if fragment in key]
    failed = {
        f"rank {r}: {key}": message
        for r, results in enumerate(ranks)
        for key, message in results["failures"].items()
        if fragment in key
    }
    return checked, failed


@pytest.mark.parametrize("size", WORLD_SIZES)
def test_every_case_equals_the_unsharded_loss(ranks, size):
    checked, failed = checks(ranks, f"{size} ranks/")
    # every rank of the group, every entry: 28 cases in float64, 7 in float32 and bf16, 8 other checks
    assert len(checked) == size * len(SHARDED) * (28 + 2 * 7 + 8)
    assert not failed, "\n".join(f"{key}: {message}" for key, message in list(failed.items())[:5])


@pytest.mark.parametrize(
    "check",
    [
        "offset logits",
        "reduce_hidden_grad=False",
        "gradcheck",
        "parts asked for",
        "no vocabulary-wide tensor",
        "peak memory per rank",
        "ties",
        "inconsistent ranks",
    ],
)
def test_each_check_ran_on_every_rank_of_every_group(ranks, check):
    checked, failed = checks(ranks, f"/{check}")
    assert len(checked) == sum(WORLD_SIZES) * len(SHARDED)
    assert not failed, "\n".join(f"{key}: {message}" for key, message in failed.items())


@pytest.mark.whole_registry
def test_the_entries_that_take_it():
    assert set(vocab_parallel_losses()) == set(SHARDED)
    for name in set(LOSSES) - set(SHARDED):
        with pytest.raises(
            ValueError, match=rf"loss '{name}' takes no vocab_parallel .*: logsumexp, cross_entropy, fused do"
        ):
            build_loss(name, vocab_parallel=VocabParallel(0, 5))


@pytest.mark.parametrize("vocab", [50257, 128256, 507])
@pytest.mark.parametrize("ranks_", [2, 3, 4])
def test_from_vocab_splits_as_dtensor_shards_the_head(vocab, ranks_):
    """Contiguous ranges in rank order, ceil(V / ranks) rows each but the last: torch.chunk's."""
    ranges = [shard_range(vocab, rank, ranks_) for rank in range(ranks_)]
    chunks = torch.arange(vocab).chunk(ranks_)
    assert ranges == [(int(chunk[0]), int(chunk[-1]) + 1) for chunk in chunks]


@pytest.mark.parametrize("start, stop", [(-1, 5), (5, 5), (7, 3), (0.0, 5)])
def test_a_range_that_is_no_range_is_refused(start, stop):
    with pytest.raises(ValueError, match=rf"start={start}, stop={stop}"):
        VocabParallel(start, stop)


def test_vocab_parallel_must_be_one():
    with pytest.raises(TypeError, match="VocabParallel"):
        build_loss("fused", vocab_parallel=(0, 5))
