"""A GPT in nanoGPT's spirit: embeddings, pre-LayerNorm blocks, causal attention, tied LM head.

The training step asks the model for ``loss(ids, targets, loss_fn)``, which hands ``(hidden,
lm_head.weight, targets)`` to a loss from :mod:`losslab.losses`, so that a fused loss never sees the
full ``(tokens, V)`` logits. ``forward(ids, targets)`` gives ``(logits, loss)`` as usual.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from losslab.settings import is_int_at_least, require
from losslab.targets import IGNORE_INDEX

T = TypeVar("T")


@dataclass(frozen=True)
class GPTConfig:
    """The GPT's shape. Defaults are a small model that trains on a laptop CPU in minutes."""

    vocab_size: int  # the tokenizer's n_vocab
    context_length: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # in Linear and LayerNorm layers, as GPT-2
    lm_head_bias: bool = False  # GPT-2 has none; some models (Phi) do
    compile: bool = False  # torch.compile each transformer block; no part of the shape

    def __post_init__(self) -> None:
        defaults = {field.name: field.default for field in fields(self)}
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            example = (
                None if defaults[name] is MISSING else f"model.{name}={defaults[name]}"
            )  # vocab_size: the tokenizer's
            require(is_int_at_least(getattr(self, name), 1), name, getattr(self, name), "must be an int >= 1", example)
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}: each head takes "
                f"n_embd / n_head dimensions (e.g. n_embd={max(1, round(self.n_embd / self.n_head)) * self.n_head})"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout}: must be in [0, 1)")
        for name in ("bias", "lm_head_bias", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)}: must be true or false")

    def weight_shape(self) -> dict[str, int | bool]:
        """The fields that the weights' shapes depend on (all but dropout and compile), by name."""
        return {name: value for name, value in asdict(self).items() if name not in ("dropout", "compile")}


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape  # batch, sequence length, width (n_embd)
        # each (B, T, C); under tensor parallelism (losslab.sharding) (B, T, C / processes): this process's heads
        q, k, v = self.qkv(x).chunk(3, dim=2)
        # (B, T, C) -> (B, nh, T, hs): nh heads of hs = C // n_head dimensions each
        q, k, v = (t.view(B, T, -1, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # the heads side by side again
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2's architecture, in the shape that ``config`` gives."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.context_length, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.n_embd, c.n_head, c.dropout, c.bias) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=c.lm_head_bias)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2

        if c.compile:  # in place: the parameters keep their names (checkpoints, export)
            for block in self.blocks:
                block.compile()

        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), one per residual add.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (token ones are the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def hidden_states(self, ids: Tensor) -> Tensor:
        """Final hidden states ``(B, T, n_embd)``, after the last LayerNorm, before the LM head.

        ``ids`` must be in ``[0, vocab_size)``: the data module checks its token files once when
        it loads them, so that nothing syncs with the device here to check them again.
        """
        B, T = ids.shape
        if T > self.config.context_length:
            raise ValueError(
                f"sequence length {T} is longer than the model's context_length "
                f"{self.config.context_length}: use shorter sequences (data.context_length) or a model "
                f"with a longer context (model.context_length)"
            )
        pos = torch.arange(T, device=ids.device)
        x = self.drop(self.wte(ids) + self.wpe(pos))  # (B, T, n_embd)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def loss(self, ids: Tensor, targets: Tensor, loss_fn: Callable[..., T]) -> T:
        """What ``loss_fn(hidden, lm_head.weight, targets, lm_head.bias)`` returns for the final hidden
        states of ``ids``: a loss from :mod:`losslab.losses`, given the LM head rather than its logits.

        A method of the model, so that sharded training can run it as one of the model's forwards
        (``register_fsdp_forward_method``, see :func:`losslab.sharding.fully_shard_gpt`): the loss
        then sees the LM head's whole weight, not this process's FSDP shard of it. Under tensor
        parallelism (:func:`losslab.sharding.shard_vocabulary`) the head is split by vocabulary rows
        (DTensors): the loss gets this process's rows, and takes their range (``vocab_parallel``).
        """
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if isinstance(weight, DTensor):
            weight, bias = weight.to_local(), None if bias is None else bias.to_local()
        return loss_fn(self.hidden_states(ids), weight, targets, bias)

    def forward(self, ids: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits ``(B, T, V)`` and, given aligned ``targets`` (see :mod:`losslab.targets`), the mean loss."""
        logits = self.lm_head(self.hidden_states(ids))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``ids`` ``(B, T)``; temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            context = ids[:, -self.config.context_length :]
            logits = self.lm_head(self.hidden_states(context)[:, -1, :])
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                # less the row's maximum, in float64 (which holds any positive temperature, 5e-324 too): a
                # near-zero temperature then gives 0 and -inf, never inf - inf = nan
                logits = (logits - logits.amax(dim=-1, keepdim=True)).double() / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            ids = torch.cat((ids, next_id), dim=1)
        return ids
