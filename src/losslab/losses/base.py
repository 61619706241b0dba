"""What every loss implementation shares: its options, input checks and reductions.

Every implementation is called the same way, ``loss_fn(hidden, weight, targets, bias=None)``:

- ``hidden``  ``(..., d)``: the model's final hidden states;
- ``weight``  ``(V, d)``: the LM head, so that ``logits = hidden @ weight.T + bias``;
- ``targets`` integer tensor of ``hidden``'s leading shape, already aligned: ``targets[i]`` is the
  token that ``hidden[i]`` must predict (see :mod:`losslab.targets`);
- ``bias``    ``(V,)`` or ``None``: the LM head's bias, if it has one;

and takes the same options with the same meaning as :func:`torch.nn.functional.cross_entropy`
(``class_weights`` is its ``weight``), plus PaLM's z-loss, Gemma-2's logit soft-capping and a
sampling temperature.
Those that can also take the LM head sharded by vocabulary rows over a process group
(``vocab_parallel``, see :mod:`losslab.losses.vocab_parallel`).

Over 350 lines on purpose: the options, checks and reductions every entry shares are one contract,
read in one place; split, an entry's author would read several modules to learn what a loss must do.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from losslab.losses.entropy import entropy, exp_sums
from losslab.losses.row_max import max_and_argmax
from losslab.losses.smoothing import part_weights, weighted_row_sums
from losslab.losses.vocab_parallel import Layout, VocabParallel, WholeRows, whole
from losslab.settings import is_finite, is_number, require
from losslab.targets import IGNORE_INDEX, real_targets

REDUCTIONS = ("mean", "sum", "none")
NOT_PREDICTED = -1  # the predicted token of an ignored position
UNLIKELY_PROBABILITY = 1e-6  # LossParts.unlikely: a target the model gives less than this
UNLIKELY_NLL = -math.log(UNLIKELY_PROBABILITY)


class LossParts(NamedTuple):
    """What a loss built with ``return_parts=True`` returns.

    - ``loss``: the training objective (class weights, label smoothing and z-loss included), the
      one to differentiate, with the loss's reduction;
    - ``nll``: the model's own negative log-likelihood of the targets (none of those), the number
      that perplexity and bits per byte are made of; ``"mean"`` is over the counted targets;
    - ``z_loss``: the z-loss part of ``loss``;
    - ``accuracy``: 1 where the most likely token (the argmax of the logits) is the target, 0
      elsewhere: per token, summed, or over the counted targets (the token accuracy);
    - ``predicted``: the argmax per position, of the targets' shape, ``-1`` where ignored
      (``accuracy`` and ``predicted`` are ``None`` for a peer that does not give its predictions);
    - ``inexact_grads``: how many counted targets get a gradient that the implementation computes
      inexactly (see ``naive``), ``None`` for those whose gradients are always right;
    - ``entropy``: the predictive entropy ``-sum_j p_j log p_j`` of each position's softmax (in nats),
      reduced as ``nll`` is;
    - ``unlikely``: 1 where the target's probability is below :data:`UNLIKELY_PROBABILITY` (its NLL above
      ``log(1e6)``), reduced as ``accuracy`` is (``"mean"``: the fraction of the counted targets);
    - ``lse`` and ``max_logit``: each position's log-sum-exp and largest logit, of the targets' shape
      whatever the reduction (the training step takes their mean and maximum), 0 where ignored;
    - ``token_nll``: each target's negative log-likelihood, of the targets' shape, 0 where ignored,
      whatever the reduction: the per-token values the loss reduced (a step's spike capture saves
      them, :mod:`losslab.spikes`); ``None`` for a peer, which sums inside its own code.

    The logits of ``entropy``, ``unlikely``, ``lse`` and ``max_logit`` are those the softmax takes (soft-capped, divided by the temperature).
    They are ``None`` when the loss was not asked for them (``diagnose``, see :class:`TokenLoss`), as
    ``accuracy`` and ``predicted`` are (``predict``); a peer, whose kernel does not give them, takes them
    from a gradient-free pass of ``fused`` (:mod:`losslab.losses.peer`).

    All but ``loss`` are detached: they are for logging. The full logits are never needed for them.
    """

    loss: Tensor
    nll: Tensor
    z_loss: Tensor
    accuracy: Tensor | None
    predicted: Tensor | None
    inexact_grads: Tensor | None = None
    entropy: Tensor | None = None
    unlikely: Tensor | None = None
    lse: Tensor | None = None
    max_logit: Tensor | None = None
    token_nll: Tensor | None = None


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses are computed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of ``hidden @ weight.T`` here: the inputs' own, or autocast's, which leaves float64
    matmuls alone."""
    device_type = hidden.device.type
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if torch.is_autocast_enabled(device_type) and dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return dtype


# What the fused losses' autograd Functions return besides the loss, for LossParts: flat, per
# position (0 where ignored), detached; the argmax's two and the diagnostics' three only when asked for.
PER_TOKEN = ("ce", "nll", "z_loss", "correct", "predicted", "entropy", "lse", "max_logit")
PREDICTED = ("correct", "predicted")
DIAGNOSTICS = ("entropy", "lse", "max_logit")


class TokenLoss(nn.Module):
    """Options and checks common to all implementations.

    Each implementation names itself (``name``, its key in the registry and in
    ``conf/loss/<name>.yaml``) and says what most likely made a training step's loss or gradient
    non-finite with it (``nonfinite_hint``, shown when ``step.nonfinite=stop`` stops a run).

    Args:
        ignore_index: target value whose position contributes nothing to loss or gradient.
        reduction: ``"mean"`` over non-ignored tokens (0 when every token is ignored), ``"sum"``,
            or ``"none"`` for per-token losses of the targets' shape, 0 where ignored.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
        z_loss: weight ``z`` of PaLM's auxiliary loss ``z * logsumexp(logits)**2`` per token,
            added to the loss with the same reduction.
        softcap: when set to ``c``, logits become ``c * tanh(logits / c)`` before anything else.
        temperature: ``T``: the softmax takes the logits divided by it, after the soft-cap (as a model
            that caps its logits is sampled from: ``softmax(softcap(x) / T)``); the z-loss, the entropy
            and every other part are of those logits. 1 leaves them as they are.
        class_weights: ``(V,)`` non-negative weights, ``weight`` in
            :func:`torch.nn.functional.cross_entropy`: a token's cross-entropy (label smoothing
            included) counts ``class_weights[target]`` times, and ``"mean"`` divides by the summed
            weights of the counted targets. As in Liger-Kernel, the z-loss is not weighted: its
            mean is over the counted targets.
        check_targets: raise ``ValueError`` for target ids outside ``[0, V)`` (other than
            ``ignore_index``). It costs a device sync; turn it off for speed once data is trusted.
        return_parts: return :class:`LossParts` instead of ``loss``.

    Two attributes, True when built, ask for the parts that cost passes over the logits: ``predict``
    for the accuracy and the predicted tokens, ``diagnose`` for the entropy, the unlikely targets, the
    log-sum-exp and the largest logit. The training step turns them off on the steps it does not log
    (and ``diagnose`` on those its diagnostics interval skips).
        vocab_parallel: a :class:`~losslab.losses.vocab_parallel.VocabParallel`: ``weight`` and
            ``bias`` are this rank's rows of the LM head, the rest as without it (targets keep their
            global ids, class weights are the full ``(V,)`` vector) and so are the results. Only
            the implementations with ``takes_vocab_parallel`` accept it.
    """

    name: ClassVar[str]
    gives_predictions: ClassVar[bool] = True  # LossParts.accuracy and .predicted are not None
    takes_vocab_parallel: ClassVar[bool] = False
    nonfinite_hint: ClassVar[str] = (
        "the logits or the weights diverged: lower the learning rate (optimizer.lr), lengthen the "
        "warm-up (schedule.warmup_steps) or clip harder (step.gradient_clip_val)"
    )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this implementation cannot run on this machine (see the peers), or None."""
        return None

    @classmethod
    def bench_variants(cls, vocab_size: int) -> dict[str, dict]:
        """Rows the benchmark adds for this entry besides its defaults: a row name (``chunked``
        becomes ``<name>_chunked``) to the options it is built with, at a vocabulary size."""
        return {}

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        temperature: float = 1.0,
        class_weights: Tensor | Sequence[float] | None = None,
        check_targets: bool = True,
        return_parts: bool = False,
        vocab_parallel: VocabParallel | None = None,
    ) -> None:
        super().__init__()
        if vocab_parallel is not None and not self.takes_vocab_parallel:
            from losslab.losses import vocab_parallel_losses  # the registry imports this module

            raise ValueError(
                f"loss {self.name!r} takes no vocab_parallel (an LM head sharded by vocabulary rows): "
                f"{', '.join(vocab_parallel_losses())} do"
            )
        if vocab_parallel is not None and not isinstance(vocab_parallel, VocabParallel):
            raise TypeError(f"vocab_parallel must be a losslab.losses.VocabParallel, got {vocab_parallel!r:.80}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
        # `0 <= x`, not `x < 0`, which lets nan through
        require(
            is_number(label_smoothing) and 0 <= label_smoothing <= 1,
            "label_smoothing",
            label_smoothing,
            "must be a number in [0, 1] (0: none)",
            "loss.label_smoothing=0.1",
        )
        require(
            is_finite(z_loss) and z_loss >= 0,
            "z_loss",
            z_loss,
            "must be a finite number >= 0 (0: none)",
            "loss.z_loss=1e-4",
        )
        require(
            softcap is None or is_finite(softcap) and softcap > 0,
            "softcap",
            softcap,
            "must be a finite number > 0, or null to turn it off",
            "loss.softcap=30",
        )
        require(
            is_finite(temperature) and temperature > 0,
            "temperature",
            temperature,
            "must be a finite number > 0 (1: the logits as they are)",
            "loss.temperature=1",
        )
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights)
            if class_weights.dim() != 1 or not class_weights.is_floating_point():
                raise ValueError(f"class_weights must be a 1-D float tensor of V weights, got {class_weights!r:.80}")
            if not (torch.isfinite(class_weights).all() and (class_weights >= 0).all()):
                raise ValueError("class_weights must be finite and >= 0")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.temperature = float(temperature)
        self.check_targets = check_targets
        self.return_parts = return_parts
        self.vocab_parallel = vocab_parallel
        # LossParts' accuracy and predicted tokens, and its diagnostics (see above)
        self.predict = True
        self.diagnose = True
        # a buffer: it moves with the module to the device (and is not a parameter)
        self.register_buffer("class_weights", class_weights, persistent=False)
        # taken once, here, on the weights as given: see settings_checksum
        weights = None if class_weights is None else class_weights.detach().cpu().double().numpy()
        self.class_weights_checksum = None if weights is None else zlib.crc32(weights.tobytes())

    def extra_repr(self) -> str:
        weighted = "" if self.class_weights is None else f", class_weights=({self.class_weights.numel()},)"
        sharded = "" if self.vocab_parallel is None else f", vocab_parallel={self.vocab_parallel}"
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
            f"temperature={self.temperature}{weighted}{sharded}"
        )

    def validate(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None) -> int:
        """Raise a clear error for shapes that do not fit or target ids outside ``[0, V)``; return V,
        the whole vocabulary's size (see :meth:`vocab_layout`)."""
        self.validate_head(hidden, weight, bias)
        vocab_size = self.vocab_layout(weight.shape[0], targets).vocab_size
        self.validate_targets(targets, hidden.shape[:-1], vocab_size)
        return vocab_size

    def vocab_layout(self, rows: int, targets: Tensor, chunk_size: int = 0) -> Layout:
        """The vocabulary from this rank's ``rows`` of the head: ``rows`` itself, or under
        ``vocab_parallel`` the ranks' rows together (checked, with the ranks' ``chunk_size``:
        :meth:`~losslab.losses.vocab_parallel.VocabParallel.layout`)."""
        if self.vocab_parallel is None:
            return Layout(rows, rows, (0, rows))
        return self.vocab_parallel.layout(rows, targets, chunk_size, self.settings_checksum())

    def settings_checksum(self) -> int:
        """A checksum of what must be the same on every rank of a ``vocab_parallel`` group: the loss, its
        options, its class weights (their sum and their sum weighted by id) and the parts asked for."""
        settings = (self.name, self.ignore_index, self.reduction, self.label_smoothing, self.z_loss, self.softcap)
        settings += (self.temperature, self.class_weights_checksum, self.return_parts, self.predict, self.diagnose)
        return zlib.crc32(repr(settings).encode())

    def validate_head(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"hidden has shape {tuple(hidden.shape)} and the LM head weight "
                f"{tuple(weight.shape)}: the weight must be (V, d) with d = hidden.shape[-1]"
            )
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"the LM head bias has shape {tuple(bias.shape)}: it must be (V,) = ({weight.shape[0]},)")

    def validate_targets(self, targets: Tensor, leading_shape: torch.Size, vocab_size: int) -> None:
        if targets.shape != leading_shape:
            raise ValueError(
                f"targets have shape {tuple(targets.shape)} but the predictions have leading "
                f"shape {tuple(leading_shape)}: targets[i] must be the token that position i predicts"
            )
        if targets.is_floating_point() or targets.is_complex():
            raise TypeError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
        if self.class_weights is not None and self.class_weights.numel() != vocab_size:
            raise ValueError(
                f"class_weights has {self.class_weights.numel()} weights for a vocabulary of V={vocab_size}: "
                "give one weight per token id"
            )
        if not self.check_targets:
            return
        bad = real_targets(targets, self.ignore_index) & ((targets < 0) | (targets >= vocab_size))
        if bad.any():
            bad_id = int(targets[bad][0])
            raise ValueError(
                f"target id {bad_id} is out of range for a vocabulary of V={vocab_size}: ids must "
                f"be in [0, {vocab_size - 1}] or equal ignore_index={self.ignore_index}. Check that "
                f"the tokenizer and the model's vocab_size match."
            )

    def softmax_logits(self, logits: Tensor) -> Tensor:
        """The logits the softmax takes: soft-capped, then divided by the temperature."""
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits if self.temperature == 1 else logits / self.temperature

    def smoothed(self, nll: Tensor, log_probs: Tensor | None, targets: Tensor) -> Tensor:
        """PyTorch's cross-entropy per token from the NLL and the full log-probabilities (needed
        only with label smoothing): ``(1 - eps) * w[t] * nll + (eps / V) * sum_j w[j] * (-log p_j)``,
        ``w`` the class weights (1 without).

        The log-probabilities all have one sign, and a float32 matmul that adds V of them loses
        digits (2e-6 of a token's loss at V=32000): the weighted sum is taken as
        :func:`~losslab.losses.smoothing.weighted_row_sums` takes it."""
        eps, w = self.label_smoothing, self.class_weights
        loss = nll if w is None else w[targets] * nll
        if eps == 0:
            return loss
        weights = None if w is None else w.to(log_probs.dtype)
        return (1 - eps) * loss - (eps / log_probs.shape[-1]) * weighted_row_sums(log_probs, weights)

    def target_weights(self, targets: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
        """Each position's weight in a mean: its target's class weight, 1 without; 0 where ignored."""
        if self.class_weights is None:
            return valid.to(dtype)
        return self.class_weights.to(dtype)[targets] * valid

    def finish(
        self,
        shape: torch.Size,
        valid: Tensor,
        weights: Tensor,
        per_token: dict[str, Tensor],
        inexact: Tensor | None = None,
    ) -> Tensor | LossParts:
        """Reduce the flat per-token values (0 where ignored) to what the loss returns.

        ``per_token`` holds ``ce`` (the weighted, smoothed cross-entropy), ``nll``, ``z_loss``, and
        when predicted ``correct`` (1.0 where the argmax is the target), ``predicted``, ``entropy``,
        ``lse`` and ``max_logit``; ``weights`` is :meth:`target_weights`, which only the mean of ``ce``
        divides by. ``unlikely`` comes from ``nll``.
        """
        predicted = per_token.pop("predicted", None)
        token_nll = per_token["nll"].detach().reshape(shape)
        rows = {name: per_token.pop(name).reshape(shape) for name in ("lse", "max_logit") if name in per_token}
        if "entropy" in per_token:
            per_token["unlikely"] = ((per_token["nll"] > UNLIKELY_NLL) & valid).to(per_token["nll"].dtype)
        if self.reduction == "none":
            reduced = {name: values.reshape(shape) for name, values in per_token.items()}
        elif self.reduction == "sum":
            reduced = {name: values.sum() for name, values in per_token.items()}
        else:
            count = valid.sum().clamp(min=1)
            reduced = {name: values.sum() / count for name, values in per_token.items()}
            weight_sum = weights.sum()
            reduced["ce"] = per_token["ce"].sum() / torch.where(weight_sum > 0, weight_sum, 1.0)
        loss = reduced["ce"] + reduced["z_loss"]
        if not self.return_parts:
            return loss
        predicted = None if predicted is None else predicted.reshape(shape)
        optional = {
            name: reduced[name].detach() if name in reduced else None for name in ("correct", "entropy", "unlikely")
        }
        return LossParts(
            loss,
            reduced["nll"].detach(),
            reduced["z_loss"].detach(),
            optional["correct"],
            predicted,
            inexact,
            optional["entropy"],
            optional["unlikely"],
            rows.get("lse"),
            rows.get("max_logit"),
            token_nll,
        )

    def finish_per_token(
        self, targets: Tensor, loss: Tensor, per_token: Sequence[Tensor], predicted: bool, diagnosed: bool
    ) -> LossParts:
        """:class:`LossParts` of a loss reduced whole (``loss``) and its flat per-token values in
        :data:`PER_TOKEN`'s order, as the fused losses' autograd Functions return them; without those
        of :data:`PREDICTED` when they were not ``predicted``, of :data:`DIAGNOSTICS` when not ``diagnosed``."""
        values = dict(zip(PER_TOKEN, per_token, strict=True))
        for names, given in ((PREDICTED, predicted), (DIAGNOSTICS, diagnosed)):
            for name in names if not given else ():
                del values[name]
        flat_targets = targets.reshape(-1)
        valid = real_targets(flat_targets, self.ignore_index)
        weights = self.target_weights(flat_targets.masked_fill(~valid, 0), valid, values["ce"].dtype)
        return self.finish(targets.shape, valid, weights, values)._replace(loss=loss)


class LogitsLoss(TokenLoss):
    """Base of the implementations that materialise the full logits ``hidden @ weight.T + bias``.

    Subclasses implement :meth:`token_loss`: the per-token cross-entropy of float32 logits
    ``(N, V)`` against in-range targets ``(N,)``, as :meth:`TokenLoss.smoothed` defines it, and the
    plain negative log-likelihood.
    """

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None):
        self.validate_head(hidden, weight, bias)
        if self.vocab_parallel is not None:
            hidden = self.vocab_parallel.sum_hidden_grad(hidden)
        return self.from_logits(torch.nn.functional.linear(hidden, weight, bias), targets)

    def from_logits(self, logits: Tensor, targets: Tensor):
        """The loss of ready-made logits ``(..., V)`` against aligned ``targets`` ``(...)``; under
        ``vocab_parallel``, ``(..., stop - start)``: this rank's columns."""
        layout = self.vocab_layout(logits.shape[-1], targets)
        self.validate_targets(targets, logits.shape[:-1], layout.vocab_size)
        # Under bf16 autocast the matmul gives bf16 logits; the loss itself is computed in float32,
        # autocast off (it would run a matmul with the class weights in bf16).
        with torch.autocast(logits.device.type, enabled=False):
            return self.loss_of_logits(logits.to(loss_dtype(logits.dtype)), targets, layout)

    def loss_of_logits(self, logits: Tensor, targets: Tensor, layout: Layout) -> Tensor | LossParts:
        logits = logits.reshape(-1, logits.shape[-1])
        logits = self.softmax_logits(logits)
        flat_targets = targets.reshape(-1).long()
        valid = real_targets(flat_targets, self.ignore_index)
        safe_targets = flat_targets.masked_fill(~valid, 0)
        # more passes over the full logits
        predict, diagnose = self.return_parts and self.predict, self.return_parts and self.diagnose
        if self.vocab_parallel is None:
            ce, nll = self.token_loss(logits, safe_targets)
            lse = torch.logsumexp(logits, dim=-1) if self.z_loss > 0 else None
            rows = self.row_numbers(logits.detach(), lse, diagnose) if predict or diagnose else None
        else:
            ce, nll, rows = self.vocab_parallel_token_loss(logits, safe_targets, layout, predict, diagnose)
            lse = rows.lse
        z_loss = self.z_loss * lse.square() if self.z_loss > 0 else torch.zeros_like(ce)
        per_token = {
            "ce": ce.masked_fill(~valid, 0.0),
            "nll": nll.detach().masked_fill(~valid, 0.0),
            "z_loss": z_loss.masked_fill(~valid, 0.0),
        }
        if predict:
            per_token["correct"] = ((rows.argmax == flat_targets) & valid).to(ce.dtype)
            per_token["predicted"] = rows.argmax.masked_fill(~valid, NOT_PREDICTED)
        if diagnose:
            for name, values in (("entropy", rows.entropy), ("lse", rows.lse), ("max_logit", rows.max)):
                per_token[name] = values.detach().masked_fill(~valid, 0.0)
        weights = self.target_weights(safe_targets, valid, ce.dtype)
        return self.finish(
            targets.shape, valid, weights, per_token, self.inexact_gradients(logits, safe_targets, valid)
        )

    @staticmethod
    def row_numbers(logits: Tensor, lse: Tensor | None, diagnose: bool) -> WholeRows:
        """Each row's largest logit and its lowest id, and with ``diagnose`` its log-sum-exp (``lse``, if
        taken already) and entropy (:mod:`losslab.losses.entropy`), of the softmax's ``logits (N, V)``."""
        with torch.no_grad():
            row_max, argmax = max_and_argmax(logits)  # the first maximum, as torch.argmax
            if not diagnose:
                return WholeRows(row_max, lse, None, None, argmax)
            norm, weighted = exp_sums(logits, row_max)
            log_norm = norm.log()
            lse = row_max + log_norm if lse is None else lse.detach()
            row_entropy = entropy(log_norm, weighted)
        return WholeRows(row_max, lse, None, None, argmax, row_entropy)

    def vocab_parallel_token_loss(
        self, logits: Tensor, targets: Tensor, layout: Layout, predict: bool, diagnose: bool
    ) -> tuple[Tensor, Tensor, WholeRows]:
        """``(loss, nll)`` per token of this rank's columns of the logits, over the whole vocabulary,
        and the whole rows' numbers (:func:`~losslab.losses.vocab_parallel.whole`): the log-softmax
        distributed over the group (one all-gather, see :mod:`losslab.losses.vocab_parallel`), then
        :meth:`smoothed`'s cross-entropy from the ranks' sums ``sum_j w_j (x_j - max)``
        (:mod:`losslab.losses.smoothing`)."""
        parallel, eps, w = self.vocab_parallel, self.label_smoothing, self.class_weights
        local_weights = None if w is None else w[parallel.start : parallel.stop].to(logits.dtype)
        stats = parallel.row_stats(logits, targets, local_weights, eps > 0, predict, diagnose)
        rank_weights = part_weights(layout.bounds, w, logits.dtype, logits.device) if eps > 0 else None
        rows = whole(parallel.gather(stats), predict, rank_weights, diagnose)
        nll = rows.lse - rows.target
        ce = nll if w is None else w[targets].to(nll.dtype) * nll
        if eps > 0:
            ce = (1 - eps) * ce + (eps / layout.vocab_size) * rows.smooth
        return ce, nll, rows

    def token_loss(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, nll)`` per token: the cross-entropy as :meth:`TokenLoss.smoothed` defines it
        (class weights and label smoothing), and the plain negative log-likelihood."""
        raise NotImplementedError

    def inexact_gradients(self, logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor | None:
        """How many counted targets get an inexact gradient (:class:`LossParts`); ``None``: never."""
        return None
