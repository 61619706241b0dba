"""``cce``: Apple's Cut Cross-Entropy (``cut_cross_entropy.linear_cross_entropy``).

On CUDA its Triton kernel (``impl="cce"``), which by default skips the gradient blocks whose
softmax is below ``filter_eps`` (an approximation of the gradient; ``filter_eps=null`` turns it
off); elsewhere its pure-PyTorch implementation (``impl="torch_compile"``, compiled by
``torch.compile`` for every new shape, which takes seconds). It has soft-capping, and a bias from
version 25.6; no label smoothing, z-loss or class weights.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from losslab.losses.peer import PeerLoss, PeerOutput

IMPLS = ("auto", "cce", "torch_compile")


class CutCrossEntropyLoss(PeerLoss):
    """``cut_cross_entropy.linear_cross_entropy`` behind losslab's call and options.

    Args:
        impl: ``"cce"`` (Triton, CUDA), ``"torch_compile"`` (any device) or ``"auto"``: ``cce``
            where CUDA is available, else ``torch_compile``.
        filter_eps: CCE's gradient filter (``"auto"``, its default: the compute dtype's eps / 32; a
            number; or ``None`` for the exact gradient); only its ``cce`` kernel filters.
        **options: see :class:`losslab.losses.base.TokenLoss`; not ``label_smoothing``, ``z_loss``
            or ``class_weights``.
    """

    name = "cce"
    package = "cut_cross_entropy"
    install = 'pip install -e ".[peers]" (cut-cross-entropy)'
    unsupported = ("label_smoothing", "z_loss", "class_weights")
    computes_float64 = False  # it casts the logits to float32

    @classmethod
    def takes_bias(cls) -> bool:
        from cut_cross_entropy import linear_cross_entropy

        return "bias" in inspect.signature(linear_cross_entropy).parameters

    def __init__(self, impl: str = "auto", filter_eps: float | str | None = "auto", **options) -> None:
        super().__init__(**options)
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r}: choose one of {', '.join(IMPLS)}")
        if impl == "cce" and not torch.cuda.is_available():
            raise RuntimeError("loss 'cce' with impl='cce' needs a CUDA GPU: use impl='torch_compile' or 'auto'")
        self.impl = ("cce" if torch.cuda.is_available() else "torch_compile") if impl == "auto" else impl
        self.filter_eps = filter_eps

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl!r}, filter_eps={self.filter_eps!r}"

    def call_peer(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, reduction: str, plain: bool
    ) -> PeerOutput:
        from cut_cross_entropy import linear_cross_entropy

        options = {}
        if bias is not None:
            if not self.takes_bias():
                raise ValueError(
                    "the installed cut-cross-entropy takes no bias: install version 25.6 or newer, or use "
                    "another loss for an LM head with a bias"
                )
            options["bias"] = bias
        if self.impl == "cce":
            options["filter_eps"] = self.filter_eps
        loss = linear_cross_entropy(
            hidden,
            weight,
            targets,
            ignore_index=self.ignore_index,
            softcap=self.softcap,
            reduction=reduction,
            impl=self.impl,
            **options,
        )
        return PeerOutput(loss)
