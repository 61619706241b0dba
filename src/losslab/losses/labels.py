"""From Hugging Face-style ``labels`` to aligned next-token targets."""

from __future__ import annotations

from torch import Tensor


def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Targets aligned with the positions that predict them: ``targets[..., t] = labels[..., t+1]``.

    ``labels`` is a copy of ``input_ids`` with ``ignore_index`` at padding (the Hugging Face
    convention). The last position has nothing to predict and is ignored. Shifting the labels
    instead of slicing the logits avoids a copy of the ``(tokens, V)`` logits, and gives exactly
    ``CrossEntropyLoss()(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))``.
    """
    targets = labels.new_full(labels.shape, ignore_index)
    targets[..., :-1] = labels[..., 1:]
    return targets
