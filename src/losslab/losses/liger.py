"""``liger``: Liger-Kernel's fused linear cross-entropy (Triton kernels: CUDA only).

It honours every option of losslab's (class weights as its ``ce_weight``, the z-loss as its
``lse_square_scale``) and returns the z-loss and the predicted tokens itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losslab.losses.peer import PeerLoss, PeerOutput


class LigerFusedLinearCrossEntropyLoss(PeerLoss):
    """``liger_kernel``'s ``liger_fused_linear_cross_entropy`` behind losslab's call and options."""

    name = "liger"
    gives_predictions = True
    package = "liger_kernel"
    install = 'pip install -e ".[peers]" (liger-kernel, on a machine with a CUDA GPU)'

    def __init__(self, **options) -> None:
        super().__init__(**options)
        if self.reduction == "mean" and self.class_weights is not None and self.z_loss > 0:
            # losslab reduces a peer's sum; Liger's z-loss is detached, so the sum cannot be split
            raise ValueError(
                "loss 'liger' with class_weights and z_loss takes reduction='sum' or 'none' here: the "
                "mean divides the two by different counts"
            )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch.cuda.is_available():
            return "it needs a CUDA GPU (its kernels are Triton's): run it on one (trainer.accelerator=gpu)"
        return super().unavailable_reason()

    def call_peer(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, reduction: str, plain: bool
    ) -> PeerOutput:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        out = liger_fused_linear_cross_entropy(
            hidden,
            weight,
            targets,
            bias=bias,
            ce_weight=None if plain else self.class_weights,
            ignore_index=self.ignore_index,
            lse_square_scale=0.0 if plain else self.z_loss,
            label_smoothing=0.0 if plain else self.label_smoothing,
            reduction=reduction,
            softcap=self.softcap,
            return_z_loss=True,
            return_predicted_tokens=True,
        )
        return PeerOutput(out.loss, None if plain else out.z_loss, out.predicted_tokens)
