"""The target convention that data, losses, model and training share.

``targets[..., t]`` is the token that position ``t`` must predict, aligned with the positions (not
the logits sliced by one); :data:`IGNORE_INDEX` marks a position that predicts nothing: padding,
and the last position of a padded row. Only the other targets count, in the loss and in every
token count.
"""

from __future__ import annotations

from torch import Tensor

IGNORE_INDEX = -100  # PyTorch's and Hugging Face's default


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Targets aligned with the positions that predict them: ``targets[..., t] = labels[..., t+1]``.

    ``labels`` is a copy of ``input_ids`` with ``ignore_index`` at padding (the Hugging Face
    convention). The last position has nothing to predict and is ignored. Shifting the labels
    instead of slicing the logits avoids a copy of the ``(tokens, V)`` logits, and gives exactly
    ``CrossEntropyLoss()(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))``.
    """
    targets = labels.new_full(labels.shape, ignore_index)
    targets[..., :-1] = labels[..., 1:]
    return targets


def real_targets(targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Where ``targets`` holds a token to predict (a boolean mask of its shape)."""
    return targets != ignore_index


def count_targets(targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """How many tokens ``targets`` asks to predict (a 0-d tensor on its device: no host sync)."""
    return real_targets(targets, ignore_index).sum()
