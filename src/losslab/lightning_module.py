"""The LightningModule: a GPT, a loss from the registry, AdamW and a warm-up + cosine schedule.

One training batch is the list of micro-batches of one optimizer step (gradient accumulation, see
``DataConfig(accumulate=...)``), and the step's gradient is that of the loss summed over every
real target token of the step, on every device, divided by the step's real-token count: padding
and uneven micro-batches or ranks never change a token's weight. That needs the step's token count
before the first backward, hence manual optimization.

Under ``trainer=fsdp``, ``tp`` and ``fsdp_tp`` (:class:`losslab.sharding.ShardedDataParallel`) the
module shards the GPT over the processes in ``configure_model``; the step is the same, its sums taken
over the data-parallel processes (those of one tensor-parallel group see the same batches).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.fsdp import FSDPModule
from torchmetrics import SumMetric

from losslab.checkpoint_files import losslab_state, restore_losslab_state
from losslab.losses import LossParts, TokenLoss
from losslab.metrics import log_metrics
from losslab.model import GPT
from losslab.optimization import NONFINITE_POLICIES, warmup_cosine
from losslab.run_status import NonFiniteStepError, reached_max_steps
from losslab.sharding import average_replicated_gradients_, clip_gradients_, gradient_norm, shard_gpt
from losslab.spikes import StepRecord
from losslab.targets import count_targets, real_targets


def correct_count(parts: LossParts) -> Tensor:
    """The number of targets predicted right, NaN when the loss is not finite: the argmax of
    non-finite logits (NaN counts as the largest) is no prediction."""
    return torch.where(torch.isfinite(parts.nll), parts.accuracy.float(), math.nan)


def logit_sums(parts: LossParts, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """A micro-batch's logit diagnostics (``logits/*`` in :data:`losslab.metrics.METRICS`) as what adds up
    over micro-batches and ranks: the sums of the entropy, of the unlikely targets and of the log-sum-exp
    over the real targets, and the largest log-sum-exp and logit."""
    real = real_targets(targets, ignore_index)
    sums = torch.stack([parts.entropy, parts.unlikely, parts.lse[real].sum()])
    maxima = torch.stack([torch.where(real, rows, -math.inf).max() for rows in (parts.lse, parts.max_logit)])
    return sums, maxima


class GPTLightningModule(L.LightningModule):
    """Trains ``model`` with the loss implementation built by ``loss``.

    Args:
        model: the GPT.
        loss: a factory ``loss(**options) -> TokenLoss`` (a partial of ``build_loss``); the
            module asks it for ``reduction="sum"`` and normalises by the real-token count itself.
        optimizer: a factory ``optimizer(param_groups) -> Optimizer`` (a partial of AdamW).
            Its ``weight_decay`` applies to matrices and embeddings; biases and LayerNorm weights
            get none.
        warmup_steps, total_steps, min_lr_ratio: the learning-rate schedule (see
            :func:`losslab.optimization.warmup_cosine`).
        gradient_clip_val: clip the gradient's global norm to this; ``None`` for no clipping.
        nonfinite: what a step whose loss or gradient is not finite does, without ever updating
            the weights: ``"skip"`` it (it still counts as a step, and ``train/skipped_steps``
            counts it) or ``"stop"`` training with an error that names the step and the likely cause.
        token_bytes: byte length of every token id, for bits per byte.
        tokenizer: the tokenizer as plain data (:func:`losslab.tokenizers.tokenizer_to_data`),
            stored in checkpoints so that ``scripts/generate.py`` needs nothing but the checkpoint,
            with what tells it apart from others (its name, size and a hash of its tokens), so
            that resuming with another one is refused.
        logit_diagnostics_every_n_steps: the logit diagnostics (``logits/*``) on the logged steps that
            are multiples of this, and the last; 0: never. Their own interval, as they cost a logged
            step of ``fused`` about an eighth more at V=50257 (README, "Logit diagnostics").

    The metrics are the model's own: ``train/loss``, ``val/loss`` and every ``*/ppl`` and ``*/bpb``
    are its negative log-likelihood of the targets, without label smoothing or z-loss; the
    training objective, when it differs, is ``train/objective``. A NaN stays a NaN.
    """

    def __init__(
        self,
        model: GPT,
        loss: Callable[..., TokenLoss],
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 100,
        total_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        gradient_clip_val: float | None = 1.0,
        nonfinite: str = "skip",
        token_bytes: Tensor | None = None,
        tokenizer: dict[str, Any] | None = None,
        logit_diagnostics_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r}: choose one of {', '.join(NONFINITE_POLICIES)}")
        self.automatic_optimization = False
        self.model = model
        self.loss_factory = loss
        self.loss_fn = loss(reduction="sum", return_parts=True)
        self.optimizer_factory = optimizer
        self.schedule = {"warmup_steps": warmup_steps, "total_steps": total_steps, "min_lr_ratio": min_lr_ratio}
        self.gradient_clip_val = gradient_clip_val
        self.nonfinite = nonfinite
        self.logit_diagnostics_every_n_steps = logit_diagnostics_every_n_steps
        self.tokenizer = tokenizer
        # what tells tokenizers apart, compared on resume (the checkpoint holds it as tokenizer_id)
        self.tokenizer_id = {key: tokenizer[key] for key in ("name", "n_vocab", "sha256")} if tokenizer else {}
        if token_bytes is None:
            token_bytes = torch.ones(model.config.vocab_size, dtype=torch.long)
        self.register_buffer("token_bytes", token_bytes.long(), persistent=False)
        # a buffer, so that checkpoints keep the count and a resumed run counts on
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        # val/loss of the untrained model (step 0), which a run must end below (losslab.divergence);
        # checkpoints keep it, so that a resumed run knows it too. NaN: not measured.
        self.initial_val_loss = math.nan
        # nan_strategy="disable": torchmetrics would otherwise drop NaN values, and the validation
        # of a diverged model would sum to a perfect 0.
        self.val_nll = SumMetric(nan_strategy="disable")
        self.val_tokens = SumMetric(nan_strategy="disable")
        self.val_bytes = SumMetric(nan_strategy="disable")
        self.val_correct = SumMetric(nan_strategy="disable")
        self.warned_inexact_grads = False
        # This step's metrics by tag, as tensors (no host sync), for whoever reads them each step, and
        # whether Lightning writes them (logs_this_step): decided once a step, in training_step, for
        # the predictions, the module's values and the callbacks' (StepStats), which log only then.
        self.step_values: dict[str, Tensor | float] = {}
        self.logging_step = False

    def configure_model(self) -> None:
        """Under :class:`losslab.sharding.ShardedDataParallel` (``trainer=fsdp``, ``tp``, ``fsdp_tp``),
        shard the GPT over the processes; with its head split by vocabulary rows, the loss takes
        this process's range.

        Lightning calls this before each fit or validation, once it has set up the processes and
        their mesh; a GPT already sharded (a fit after a validation) stays as it is.
        """
        if self.device_mesh is not None and not isinstance(self.model, FSDPModule):
            parallel = shard_gpt(self.model, self.device_mesh)
            if parallel is not None:
                self.loss_fn = self.loss_factory(reduction="sum", return_parts=True, vocab_parallel=parallel)

    def data_parallel(self) -> tuple[ProcessGroup | None, int]:
        """The group of the processes that train on different batches (``None``: all of them), and
        its size. Under tensor parallelism the processes of a group share batches and results."""
        if self.device_mesh is None:
            return None, self.trainer.world_size
        mesh = self.device_mesh["data_parallel"]
        return mesh.get_group(), mesh.size()

    def loss_sums(self, batch: dict[str, Tensor]) -> LossParts:
        """The loss's parts for a batch (see :class:`LossParts`), each summed over its real targets."""
        return self.model.loss(batch["input_ids"], batch["targets"], self.loss_fn)

    def training_step(self, batch: list[dict[str, Tensor]], batch_idx: int) -> dict[str, StepRecord]:
        """One optimizer step over the micro-batches in ``batch``; returns its record for spike
        capture (:class:`losslab.spikes.StepRecord`: what the step has, nothing copied)."""
        optimizer = self.optimizers()
        strategy = self.trainer.strategy
        group, ranks = self.data_parallel()
        n_tokens = sum(count_targets(micro["targets"], self.loss_fn.ignore_index) for micro in batch)
        n_tokens = strategy.reduce(n_tokens, group=group, reduce_op="sum").clamp(min=1)
        # DDP and FSDP average the ranks' gradients: scaling by their number turns that into their sum.
        scale = ranks / n_tokens
        self.logging_step, self.step_values = self.logs_this_step(), {}
        # the predictions' argmax and the logit diagnostics cost passes over the logits: asked for on the
        # steps that are logged alone (the diagnostics on those of their own interval)
        self.loss_fn.predict = self.logging_step
        self.loss_fn.diagnose = self.logging_step and self.diagnoses_this_step()
        sums, inexact_grads, token_nll, logits = [], [], [], []
        for i, micro in enumerate(batch):
            # DDP all-reduces once, after the last micro-batch. FSDP reduce-scatters each micro-batch's
            # gradient into the sharded one (toggle_model leaves it alone): deferring that, with
            # set_requires_gradient_sync(False), would hold a whole unsharded gradient on every process.
            with optimizer.toggle_model(sync_grad=i == len(batch) - 1):
                parts = self.loss_sums(micro)
                self.manual_backward(parts.loss * scale)
            has_accuracy = parts.accuracy is not None  # a peer gives no predictions; none on unlogged steps
            correct = correct_count(parts) if has_accuracy else torch.zeros_like(parts.nll)
            sums.append(torch.stack([parts.loss.detach(), parts.nll, parts.z_loss, correct]))
            token_nll.append(parts.token_nll)
            if parts.inexact_grads is not None:
                inexact_grads.append(parts.inexact_grads)
            if parts.entropy is not None:  # none from a peer, or on unlogged steps
                logits.append(logit_sums(parts, micro["targets"], self.loss_fn.ignore_index))
        if self.device_mesh is not None:
            average_replicated_gradients_(list(self.parameters()), self.device_mesh)
        sums = strategy.reduce(torch.stack(sums).sum(0), group=group, reduce_op="sum")
        objective, nll, z_loss, accuracy = sums / n_tokens
        # torch's clipping, not self.clip_gradients: Lightning refuses that with a fused optimizer
        # under bf16-mixed (it guards fp16 loss scaling, which we do not use).
        norm = gradient_norm(list(self.parameters()))
        if self.gradient_clip_val is not None:
            clip_gradients_(list(self.parameters()), self.gradient_clip_val, norm)
        lr = optimizer.param_groups[0]["lr"]  # this step's
        values = torch.stack([nll, objective, norm.to(nll)]).detach()  # norm: float64 when sharded
        diagnostics = self.logit_diagnostics(logits, n_tokens, group) if logits else {}
        record = StepRecord(self.global_step + 1, batch, token_nll, values, lr, diagnostics)
        # The loss sums and the gradients are all-reduced, so every rank takes the same branch.
        if not (torch.isfinite(objective) and torch.isfinite(norm)):
            self.skip_step(objective, norm, record)
            # With no gradient, the optimizer leaves every weight and its own state as they are,
            # while the step still counts (max_steps, the schedule, checkpoints) as in a GradScaler skip.
            optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        optimizer.zero_grad()
        self.lr_schedulers().step()
        # Logged at the number of steps taken, as validation and the checkpoints' names are: step k
        # is the loss of the k-th step's batch (Lightning would log it at k - 1).
        logged = {"lr": lr, "step": float(self.global_step), "train/loss": nll, "train/ppl": torch.exp(nll)}
        if self.loss_fn.label_smoothing > 0 or self.loss_fn.z_loss > 0:
            logged["train/objective"] = objective
        if has_accuracy:
            logged["train/acc"] = accuracy
        logged |= {"train/grad_norm": norm, "train/skipped_steps": self.skipped_steps.float()}
        if self.loss_fn.z_loss > 0:
            logged["train/z_loss"] = z_loss
        logged |= diagnostics
        self.step_values |= logged
        if inexact_grads:
            inexact = strategy.reduce(torch.stack(inexact_grads).sum(), group=group, reduce_op="sum")
            self.report_inexact_gradients(inexact)
        if self.logging_step:
            log_metrics(self, self.step_values)
        return {"step_record": record}

    def logit_diagnostics(
        self, micro_sums: list[tuple[Tensor, Tensor]], n_tokens: Tensor, group: ProcessGroup | None
    ) -> dict[str, Tensor]:
        """The step's logit diagnostics over every real target of every micro-batch and rank, from each
        micro-batch's :func:`logit_sums`."""
        strategy = self.trainer.strategy
        sums = strategy.reduce(torch.stack([s for s, _ in micro_sums]).sum(0), group=group, reduce_op="sum")
        maxima = strategy.reduce(torch.stack([m for _, m in micro_sums]).amax(0), group=group, reduce_op="max")
        entropy, unlikely, lse = sums / n_tokens
        return {
            "logits/lse_mean": lse,
            "logits/lse_max": maxima[0],
            "logits/max_logit": maxima[1],
            "logits/entropy": entropy,
            "logits/unlikely_targets": unlikely,
        }

    def diagnoses_this_step(self) -> bool:
        """Whether the step about to be taken is one of the logit diagnostics' interval
        (``logit_diagnostics_every_n_steps``), or the last; they are logged when it is logged too."""
        every, step = self.logit_diagnostics_every_n_steps, self.global_step + 1
        return every > 0 and (step % every == 0 or step == self.trainer.max_steps)

    def logs_this_step(self) -> bool:
        """Whether Lightning writes the metrics of the step about to be taken to the logger: by its own
        rule, when the steps taken once it is are a multiple of ``trainer.log_every_n_steps``, or when
        training stops there, as it does at ``trainer.max_steps`` (see ``on_train_batch_end``).

        Lightning counts the steps as its loop has stepped batches (``global_step`` here: see
        :class:`losslab.checkpointing.LastCheckpoint` for a resumed run). A step that Ctrl-C stops,
        known to be the last only once it has been taken, is not logged (Lightning then writes the last
        logged step's values again, under that step's number: a point the curves have already).
        """
        every, step = self.trainer.log_every_n_steps, self.global_step + 1
        return every > 0 and (step % every == 0 or step == self.trainer.max_steps)

    def report_inexact_gradients(self, count: Tensor) -> None:
        """Count the targets of the step that got an inexact gradient (``train/inexact_grads``), and warn
        the first time: no NaN shows it. Only a loss that can compute one reports it, so the others never sync here."""
        self.step_values["train/inexact_grads"] = count.float()
        if count > 0 and not self.warned_inexact_grads:
            self.warned_inexact_grads = True
            rank_zero_warn(
                f"step {self.global_step}: {int(count)} target(s) got an inexact gradient from "
                f"loss={self.loss_fn.name} (their other logits' gradients underflow towards 0, with no NaN "
                "to show it; train/inexact_grads counts them): see its limits in the README, or use "
                "a stable loss"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Asking to stop at the last step makes Lightning validate once more before it ends, so that
        # the run's final metrics (the HPARAMS tab, the Optuna objective, compare's val loss) are of that step.
        if reached_max_steps(self.trainer):
            self.trainer.should_stop = True

    def skip_step(self, loss: Tensor, norm: Tensor, record: StepRecord) -> None:
        """Count a step with a non-finite loss or gradient, or raise under ``nonfinite="stop"`` (the
        error carries the step's ``record``, which spike capture saves)."""
        if self.nonfinite == "stop":
            raise NonFiniteStepError(
                f"step {self.global_step + 1}: the loss is {loss.item():.6g} and the gradient norm "
                f"{norm.item():.6g} with loss={self.loss_fn.name}; the weights were not updated. Likely "
                f"cause: {self.loss_fn.nonfinite_hint}. step.nonfinite=skip skips such steps instead.",
                step_record=record,
            )
        self.skipped_steps += 1

    def on_validation_epoch_start(self) -> None:
        self.loss_fn.predict = True  # val/acc counts every batch
        self.loss_fn.diagnose = False  # not logged from validation
        for metric in (self.val_nll, self.val_tokens, self.val_bytes, self.val_correct):
            metric.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        targets = batch["targets"]
        real = real_targets(targets, self.loss_fn.ignore_index)
        parts = self.loss_sums(batch)
        self.val_nll.update(parts.nll.float())
        if parts.accuracy is not None:
            self.val_correct.update(correct_count(parts))
        self.val_tokens.update(real.sum())
        self.val_bytes.update(self.token_bytes[targets[real]].sum())

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over the whole validation set: exp(total NLL / total tokens). Under DDP
        # the metrics sum over the ranks themselves, so the values are already global.
        nll, tokens, n_bytes = (m.compute() for m in (self.val_nll, self.val_tokens, self.val_bytes))
        loss = nll / tokens.clamp(min=1)
        if self.global_step == 0:
            self.initial_val_loss = float(loss)
        # Each value is the same on every process already: sync_dist with max tells Lightning so, and
        # leaves it exact (a mean of equal values can round).
        logged = {"val/loss": loss, "val/ppl": torch.exp(loss), "val/bpb": nll / math.log(2) / n_bytes.clamp(min=1)}
        if self.val_correct.update_count:  # a peer that gives no predictions has no accuracy
            logged["val/acc"] = self.val_correct.compute() / tokens.clamp(min=1)
        logged["step"] = float(self.global_step)  # after that many steps; 0 before training
        log_metrics(self, logged, sync_dist=True, reduce_fx="max")

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)
        optimizer = self.optimizer_factory(
            [
                {"params": decay},  # the optimizer's own weight_decay
                {"params": no_decay, "weight_decay": 0.0},
            ]
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, **self.schedule))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.update(losslab_state(self))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_losslab_state(self, checkpoint)
