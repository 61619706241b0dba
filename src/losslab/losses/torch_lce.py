"""``torch_lce``: PyTorch's own fused ``torch.nn.functional.linear_cross_entropy``.

It chunks over the tokens (``batch_chunk_size`` rows at a time, or chosen by ``chunking_method``)
and takes a bias and class weights; it has no z-loss and no soft-capping, and computes label
smoothing only unchunked (its chunked path needs ``label_smoothing=0``). Its chunked path ignores
autocast: under bf16 autocast it computes in the inputs' own dtype. Unchunked (``chunking_method=None``
and no ``batch_chunk_size``) it is ``F.linear`` then ``F.cross_entropy``: under bf16 autocast bf16 logits
(of the inputs divided by the temperature), a float32 loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losslab.losses.fused import default_chunk_size
from losslab.losses.peer import PeerLoss, PeerOutput


class TorchLinearCrossEntropyLoss(PeerLoss):
    """``torch.nn.functional.linear_cross_entropy`` behind losslab's call and options.

    Args:
        batch_chunk_size: rows per chunk; ``None`` lets ``chunking_method`` choose.
        chunking_method: torch's ``LinearCrossEntropyOptions.chunking_method`` (``"auto"``,
            ``"aspect_ratio[:N]"``), or ``None`` for its unchunked reference path.
        **options: see :class:`losslab.losses.base.TokenLoss`; not ``z_loss`` or ``softcap``.
    """

    name = "torch_lce"
    package = "torch"
    install = "pip install 'torch>=2.13' (torch.nn.functional.linear_cross_entropy)"
    unsupported = ("z_loss", "softcap")

    def __init__(self, batch_chunk_size: int | None = None, chunking_method: str | None = "auto", **options) -> None:
        super().__init__(**options)
        if batch_chunk_size is not None and batch_chunk_size < 1:
            raise ValueError(f"batch_chunk_size={batch_chunk_size} must be >= 1, or None")
        chunked = batch_chunk_size is not None or chunking_method is not None
        if chunked and self.label_smoothing > 0:
            raise ValueError(
                f"loss 'torch_lce' cannot honour label_smoothing={self.label_smoothing} in chunks: torch's "
                "chunked path needs label_smoothing=0; set chunking_method=null and batch_chunk_size=null "
                "(unchunked), or label_smoothing=0"
            )
        self.batch_chunk_size = batch_chunk_size
        self.chunking_method = chunking_method

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not hasattr(F, "linear_cross_entropy"):
            return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy: {cls.install}"
        return None

    @classmethod
    def bench_variants(cls, vocab_size: int) -> dict[str, dict]:
        """Chunks of fused's default size, so that the two chunked implementations process the
        same rows at a time."""
        return {"chunked": {"batch_chunk_size": default_chunk_size(vocab_size), "chunking_method": None}}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_chunk_size={self.batch_chunk_size}, chunking_method={self.chunking_method!r}"

    def call_peer(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, reduction: str, plain: bool
    ) -> PeerOutput:
        chunked = self.batch_chunk_size is not None or self.chunking_method is not None
        options = (
            torch.nn.LinearCrossEntropyOptions(
                batch_chunk_size=self.batch_chunk_size, chunking_method=self.chunking_method
            )
            if chunked
            else None
        )
        loss = F.linear_cross_entropy(
            hidden,
            weight,
            targets,
            linear_bias=bias,
            weight=None if plain else self.class_weights,
            reduction=reduction,
            ignore_index=self.ignore_index,
            label_smoothing=0.0 if plain else self.label_smoothing,
            options=options,
        )
        return PeerOutput(loss)
