"""``shift_labels`` turns Hugging Face ``labels`` into aligned targets: every implementation on
``(hidden, weight, shift_labels(labels))`` gives the seed recipe's loss
``CrossEntropyLoss(ignore_index=-100)(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))``.

Tolerances (float32, both sides): loss 1e-5 + 1e-6 relative; gradients 1e-7 + 1e-4 relative.
"""

import pytest
import torch

from losslab.losses import build_loss, shift_labels

from .reference import IMPLEMENTATIONS, LOGITS_IMPLEMENTATIONS, assert_within, make_inputs

LOSS_TOL, GRAD_TOL = (1e-5, 1e-6), (1e-7, 1e-4)
B, T, D, V = 3, 17, 24, 101


def padded_batch():
    """hidden (B, T, d), weight (V, d) and labels with -100 padding (and a masked prompt)."""
    hidden, weight, labels = make_inputs((B, T), D, V, seed=3)
    labels[1, -5:] = -100  # padding at the end of shorter rows
    labels[2, -12:] = -100
    labels[2, :3] = -100  # a prompt that is not trained on
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def seed_recipe(hidden, weight, labels, reduction):
    logits = hidden @ weight.T
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction=reduction)
    return loss_fn(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_shifted_labels_give_the_seed_recipe(name, reduction):
    hidden, weight, labels = padded_batch()
    expected = seed_recipe(hidden, weight, labels, reduction)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    got = build_loss(name, reduction=reduction)(hidden, weight, shift_labels(labels))
    got_grads = torch.autograd.grad(got, (hidden, weight))

    assert_within(got, expected, *LOSS_TOL, "loss")
    assert_within(got_grads[0], expected_grads[0], *GRAD_TOL, "grad of hidden")
    assert_within(got_grads[1], expected_grads[1], *GRAD_TOL, "grad of weight")


@pytest.mark.parametrize("name", LOGITS_IMPLEMENTATIONS)
def test_from_logits_with_shifted_labels_gives_the_seed_recipe(name):
    hidden, weight, labels = padded_batch()
    got = build_loss(name).from_logits(hidden @ weight.T, shift_labels(labels))
    assert_within(got, seed_recipe(hidden, weight, labels, "mean"), *LOSS_TOL, "loss")


def test_shift_labels_values():
    labels = torch.tensor([[5, 6, 7, 8], [1, 2, -100, -100]])
    original = labels.clone()
    expected = torch.tensor([[6, 7, 8, -100], [2, -100, -100, -100]])
    assert torch.equal(shift_labels(labels), expected)
    assert torch.equal(labels, original), "shift_labels must not modify its input"
    assert shift_labels(labels).dtype == labels.dtype


def test_shift_labels_one_dimensional_and_custom_ignore_index():
    labels = torch.tensor([4, 9, -1, 3])
    assert torch.equal(shift_labels(labels, ignore_index=-1), torch.tensor([9, -1, 3, -1]))
