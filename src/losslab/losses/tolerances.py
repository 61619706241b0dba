"""How close to the float64 reference a loss implementation must come, per dtype: the one policy that
the reference grid (``tests/losses/test_losses.py``) and the audit (:mod:`losslab.audit`) judge by.

- float32: max |error| <= absolute + relative * (largest magnitude of the reference value), so that
  ``reduction="sum"`` (values in the hundreds) is judged relatively. Loss and z-loss 1e-5 + 1e-6
  relative; gradients 1e-7 + 2e-4 relative: ``F.cross_entropy`` itself is off by 5e-5 of the scale at
  V=50257 in float32 on one CPU, and by 1.1e-4 with label smoothing on another (an AMD EPYC, AVX2:
  the reference grid's ``V50257-label_smoothing-none`` case), which the policy must admit.
- float64: computed in float64: loss 1e-12 + 1e-12 relative, gradients 1e-13 + 1e-10 relative.
- bf16 (autocast, or bf16 inputs): the error ``||got - reference||`` may be no worse than PyTorch's
  own at that dtype (bf16 logits from ``hidden @ weight.T``, then ``F.cross_entropy`` in float32)
  plus 1e-5 (loss, z-loss) or 3e-3 (gradients) times ``||reference||``. PyTorch's own gradient error
  there is about 5e-3 of ``||reference||`` (one bf16 rounding is 2**-9 to 2**-8). The norm is used
  rather than the max because a max over a few bf16 roundings is too noisy.
"""

from __future__ import annotations

from torch import Tensor

TOLERANCES = {  # (absolute, relative to the largest magnitude of the reference)
    "float32": {"loss": (1e-5, 1e-6), "grad": (1e-7, 2e-4)},
    "float64": {"loss": (1e-12, 1e-12), "grad": (1e-13, 1e-10)},
}
BF16_SLACK = {"loss": 1e-5, "grad": 3e-3}  # times ||reference||, on top of PyTorch's own bf16 error
# Where a peer rounds differently from PyTorch under bf16 autocast, by option: its loss slack instead.
# cce soft-caps the bf16 logits before its float32 cross-entropy, rounding them twice: its loss error
# exceeds PyTorch's own by up to 2.3e-4 of ||reference|| on the grid's cases (measured).
# torch_lce's unchunked path (label smoothing) and cce round bf16 logits of the inputs divided by the
# temperature (see losslab.losses.peer), PyTorch the logits before dividing them: one rounding each, of other
# values; beyond PyTorch's own error by up to 1.1e-4 (torch_lce) and 2.9e-4 (cce) of ||reference|| on the
# grid's cases (measured).
PEER_BF16_LOSS_SLACK = {("cce", "softcap"): 3e-4, ("torch_lce", "temperature"): 2e-4, ("cce", "temperature"): 4e-4}
OFF = {"softcap": None, "temperature": 1.0}  # the options above, when they change nothing


def bf16_loss_slack(name: str, options: dict) -> float:
    """The bf16 loss slack of registry entry ``name`` built with ``options``, of which those that are on
    (not at their OFF value) may widen it (see PEER_BF16_LOSS_SLACK)."""
    widened = [
        slack
        for (entry, option), slack in PEER_BF16_LOSS_SLACK.items()
        if entry == name and options.get(option, OFF[option]) != OFF[option]
    ]
    return max([BF16_SLACK["loss"], *widened])


def max_error(actual: Tensor, expected: Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def norm_error(actual: Tensor, expected: Tensor) -> float:
    return (actual.double() - expected.double()).norm().item()


def allowed_max_error(expected: Tensor, tolerance: tuple[float, float]) -> float:
    """The largest max |error| that ``tolerance`` ``(absolute, relative)`` allows against ``expected``."""
    absolute, relative = tolerance
    return absolute + relative * expected.abs().max().item()


def allowed_bf16_error(expected: Tensor, torch_bf16: Tensor, slack: float) -> float:
    """The largest ``||error||`` allowed at bf16: PyTorch's own (``torch_bf16``) plus ``slack * ||expected||``."""
    return norm_error(torch_bf16, expected) + slack * expected.double().norm().item()
