"""Check a training config before any data work, so that a bad value fails at once, in one line
that names the key, its value and the fix.

:func:`check_config` reads the composed config (the command line's keys are checked before Hydra
composes it: :func:`losslab.config_keys.check_overrides`). Each of losslab's components checks its
own values where it is defined, and this builds them as ``train.py`` does, with nothing read,
trained or written (:func:`component_problems`): the model (``GPTConfig``), the schedule and the step
(:mod:`losslab.optimization`), the data and its tokenizer (``DataConfig``, which asks
:func:`losslab.tokenizers.check_tokenizer_settings`), losslab's callbacks (``LastCheckpoint``...)
and the loss (``build_loss``). What it checks itself is what no single component can know: every
key against what reads it ("did you mean": :mod:`losslab.config_keys`); the top-level keys that
train.py reads itself (a component's, ``keep_checkpoints``, is refused by the component, under the
key's name), and what losslab asks of Lightning's ``Trainer`` and torch's AdamW (:data:`RULES`);
and the values that must agree across groups (:data:`RELATIONS`: ``data.context_length`` and the
model's, ``loss.ignore_index`` and the vocabulary, the loss and tensor parallelism...).

**A new value** of a component is checked where the component takes it, in its constructor or
``__post_init__`` (:func:`losslab.settings.require`: ``name=value: what it must be (e.g. an
override)``): nothing here changes. A new component of losslab's, with a node of its own: a line in
:func:`component_problems`. A rule here is for a top-level key, another's component or a relation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from hydra.utils import get_object
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.pytorch.accelerators import AcceleratorRegistry
from omegaconf import DictConfig, OmegaConf

from losslab.config_keys import UNSET, is_target, origin, target_options, unknown_keys, value_at
from losslab.data import DataConfig
from losslab.losses import LOSSES, build_loss
from losslab.model import GPTConfig
from losslab.optimization import ScheduleConfig, StepConfig
from losslab.settings import is_finite, is_int, is_int_at_least, is_number, refusal, shown
from losslab.tokenizers import FIXED_VOCAB_SIZES

FSDP_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")
# what Lightning's Trainer(precision=...) takes: its own list
PRECISIONS = tuple(value for kind in get_args(_PRECISION_INPUT) for value in get_args(kind))
# Trainer(accelerator=...): "gpu" is CUDA's or Apple's MPS, whichever is there
ACCELERATORS = ("auto", "cpu", "gpu", *sorted(AcceleratorRegistry.available_accelerators() - {"cpu"}))
MAX_SEED = np.iinfo(np.uint32).max  # numpy's, which Lightning's seed_everything seeds too
FLOAT32_MAX = float(np.finfo(np.float32).max)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first value or key of ``cfg`` that cannot work.

    ``cfg`` is the composed training config. Nothing here reads the corpus or builds a tokenizer.
    Values that cannot be resolved outside a Hydra run (``${hydra:...}``) are not checked.
    """
    problem = next(config_problems(cfg), None)
    if problem is not None:
        raise ConfigError(problem)


def config_problems(cfg: DictConfig) -> Iterator[str]:
    """What is wrong with ``cfg``, one line each: lazily, so that the later checks may assume
    that the earlier ones passed (no n_head of 0 when n_embd is divided by it)."""
    yield from filter(None, (rule.problem(value_at(cfg, rule.key)) for rule in RULES))
    yield from component_problems(cfg)
    yield from unknown_keys(cfg, OmegaConf.to_container(cfg, resolve=False))
    yield from filter(None, (check(cfg) for check in RELATIONS))


# --- losslab's components, built ------------------------------------------------------------


def component_problems(cfg: DictConfig) -> Iterator[str]:
    """The refusals of losslab's components built from their nodes (the loss's is a relation: it
    comes after :func:`unknown_keys`, which names an option it does not take). The model comes first:
    other values follow its own (data.context_length is model.context_length). Of the callbacks,
    losslab's own are built: their constructors are cheap and touch nothing; another's may not be."""
    nodes = [
        ("model", GPTConfig, {"vocab_size": 1}),  # the tokenizer gives the real vocabulary
        ("schedule", ScheduleConfig, {}),
        ("step", StepConfig, {}),
        ("data", DataConfig, {"accumulate": value_at(cfg, "step.accumulate")}),
    ]
    callbacks = OmegaConf.to_container(cfg.get("callbacks") or {}, resolve=False)
    for name, node in callbacks.items():
        if is_target(node) and node["_target_"].startswith("losslab."):
            nodes.append((f"callbacks.{name}", get_object(node["_target_"]), {}))
    return filter(None, (built(cfg, path, build, **given) for path, build, given in nodes))


def built(cfg: DictConfig, path: str, build: Callable[..., Any], **given: Any) -> str | None:
    """What ``build`` (a component's constructor) refuses of the node at ``path``, in the config's
    terms: ``data.batch_size=0: the batch size must be...``.

    It gets the node's values that it takes, besides those ``given``; a value left to the user
    (``???``) is left out, for the component to ask for, and one that only a run can resolve (the
    run's folder) is None. Keys that it does not take are :func:`unknown_keys`' to report. A top-level
    key's value (``keep: ${keep_checkpoints}``) is refused under that key: ``keep_checkpoints=all: ...``.
    """
    node = OmegaConf.select(cfg, path)
    if not isinstance(node, DictConfig):
        return None
    takes = target_options(build)
    options, missing = {}, set()
    for key in node:
        if takes is not None and key not in takes or key in given or key.startswith("_"):
            continue
        if OmegaConf.is_missing(node, key):
            missing.add(key)
            continue
        value = value_at(cfg, f"{path}.{key}")
        options[key] = None if value is UNSET else value
    try:
        build(**options, **{key: value for key, value in given.items() if value is not UNSET})
    except (ValueError, TypeError) as error:
        return in_config_terms(cfg, path, str(error), takes or [], missing)
    return None


def in_config_terms(cfg: DictConfig, path: str, message: str, options: list[str], missing: set[str]) -> str:
    """A component's refusal, ``name=value: ...``, as the config writes it, ``path.name=value: ...``,
    with ``???`` for a value left to the user, and named by the key the value comes from
    (``paths.cache_dir=null``, not ``data.cache_dir``, which takes it); one that names no option of
    the node, after its path."""
    name, _, rest = message.partition("=")
    if name not in options:
        return f"{path}: {message}"
    if name in missing:
        rest = "???" + rest.removeprefix("null")
    return f"{origin(cfg, f'{path}.{name}')}={rest}"


# --- top-level keys, and others' components --------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """``key`` must satisfy ``ok``; ``must_be`` says what it must be, ``example`` a good override
    (``None`` where ``must_be`` lists the choices)."""

    key: str
    ok: Callable[[Any], bool]
    must_be: str
    example: str | None

    def problem(self, value: Any) -> str | None:
        if value is UNSET or self.ok(value):
            return None
        return refusal(self.key, value, self.must_be, self.example)


def int_at_least(minimum: int) -> Callable[[Any], bool]:
    return lambda value: is_int_at_least(value, minimum)


def are_betas(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(is_number(b) and 0 <= b < 1 for b in value)


# The top-level keys that train.py reads itself, the loss's name (a registry entry: spelt before the loss is built), and what
# losslab asks of Lightning's Trainer and torch's AdamW beyond their own checks.
RULES = (
    Rule(
        "seed",
        lambda v: is_int(v) and 0 <= v <= MAX_SEED,
        f"the seed must be an int from 0 to {MAX_SEED} (numpy's seeds)",
        "seed=1337",
    ),
    Rule(
        "ckpt_path",
        lambda v: v is None or (isinstance(v, str) and Path(v).is_file()),
        "no such file (or not a regular file): give the path of a checkpoint",
        "ckpt_path=logs/runs/<run>/checkpoints/last.ckpt",
    ),
    Rule("branch", lambda v: isinstance(v, bool), "branch must be true or false", "branch=true"),
    Rule(
        "optimizer.lr",
        lambda v: is_number(v) and 0 < v <= FLOAT32_MAX,
        f"the learning rate must be > 0 and finite in float32, the weights' dtype (at most {FLOAT32_MAX:.2g})",
        "optimizer.lr=3e-3",
    ),
    Rule(
        "optimizer.weight_decay",
        lambda v: is_finite(v) and v >= 0,
        "the weight decay must be a finite number >= 0 (0 turns it off)",
        "optimizer.weight_decay=0.1",
    ),
    Rule("optimizer.betas", are_betas, "the betas must be two numbers in [0, 1)", "optimizer.betas=[0.9,0.95]"),
    Rule("loss.name", lambda v: v in tuple(LOSSES), f"no such loss: choose one of {', '.join(LOSSES)}", None),
    Rule("trainer.max_steps", int_at_least(1), "the run must train an int >= 1 steps", "trainer.max_steps=500"),
    Rule(
        "trainer.val_check_interval",
        int_at_least(1),
        "validation runs every this many steps: an int >= 1",
        "trainer.val_check_interval=50",
    ),
    Rule(
        "trainer.log_every_n_steps",
        int_at_least(1),
        "logging runs every this many steps: an int >= 1",
        "trainer.log_every_n_steps=10",
    ),
    # Lightning also takes "auto", a list of device indices or -1 (every device); a count is >= 1.
    Rule(
        "trainer.devices",
        lambda v: not is_int(v) or v >= 1 or v == -1,
        "the number of devices must be >= 1 (or -1 for all, or auto)",
        "trainer.devices=1",
    ),
    Rule(
        "trainer.precision",
        lambda v: v in PRECISIONS,
        f"Lightning's precision must be one of {', '.join(dict.fromkeys(map(str, PRECISIONS)))}",
        "precision=bf16",
    ),
    # Lightning also takes an Accelerator object (a node with a _target_)
    Rule(
        "trainer.accelerator",
        lambda v: is_target(v) or v in ACCELERATORS,
        f"the accelerator must be one of {', '.join(ACCELERATORS)}",
        "trainer.accelerator=gpu",
    ),
)


# --- values that must agree ------------------------------------------------------------------
# Each returns what is wrong, or None; they run once every value alone is right.


def rows_fit_the_model(cfg: DictConfig) -> str | None:
    rows, model = value_at(cfg, "data.context_length"), value_at(cfg, "model.context_length")
    if rows is UNSET or model is UNSET or rows <= model:
        return None
    return (
        f"data.context_length={rows} is longer than model.context_length={model}: use "
        f"data.context_length<={model} or a model with a longer context (model.context_length={rows})"
    )


def vocab_size_is_read(cfg: DictConfig) -> str | None:
    """data.vocab_size is bpe's: a tokenizer of a fixed size ignores it (as DataConfig and
    build_tokenizer do), so that one given with such a tokenizer would do nothing, unsaid."""
    tokenizer, vocab_size = value_at(cfg, "data.tokenizer"), value_at(cfg, "data.vocab_size")
    size = FIXED_VOCAB_SIZES.get(tokenizer)
    if size is None or vocab_size in (UNSET, None, size):
        return None
    return (
        f"data.vocab_size={shown(vocab_size)} does not apply to tokenizer={tokenizer}, which has "
        f"{size} tokens: drop data.vocab_size"
    )


def ignore_index_is_no_token(cfg: DictConfig) -> str | None:
    """The ignored target id may not be a token: real targets of that token would count for nothing."""
    ignore_index, tokenizer = value_at(cfg, "loss.ignore_index"), value_at(cfg, "data.tokenizer")
    vocab_size = FIXED_VOCAB_SIZES.get(tokenizer, value_at(cfg, "data.vocab_size"))
    if not is_int(ignore_index) or not is_int(vocab_size) or not 0 <= ignore_index < vocab_size:
        return None
    return (
        f"loss.ignore_index={ignore_index} is a token of the vocabulary (ids 0 to {vocab_size - 1}): "
        "its real targets would be ignored too; use a negative id (e.g. loss.ignore_index=-100)"
    )


def precision_fits_the_strategy(cfg: DictConfig) -> str | None:
    """FSDP (trainer=fsdp, tp, fsdp_tp) takes no float64: Lightning refuses it, but only once the data is built."""
    strategy, precision = value_at(cfg, "trainer.strategy"), value_at(cfg, "trainer.precision")
    sharded = isinstance(strategy, dict) and str(strategy.get("_target_", "")).endswith("ShardedDataParallel")
    if not sharded or precision in FSDP_PRECISIONS or precision is UNSET:
        return None
    return (
        f"trainer.precision={shown(precision)}: FSDP (trainer=fsdp, tp, fsdp_tp) takes {', '.join(FSDP_PRECISIONS)}: "
        "use precision=fp32 or precision=bf16"
    )


def split_heads(heads: int, width: object, size: int) -> str:
    """The overrides nearest to ``heads`` that split over ``size`` processes and still divide the model's
    width ``n_embd`` (a multiple of ``size``, or failing that one with a width to match)."""
    split = -(-heads // size) * size
    if not is_int(width) or width <= 0:
        return f"model.n_head={split}"
    fitting = [n for n in range(size, width + 1, size) if width % n == 0]
    if fitting:
        return f"model.n_head={min(fitting, key=lambda n: (abs(n - heads), n))}"
    return f"model.n_head={split} model.n_embd={max(1, round(width / split)) * split}"


def tensor_parallelism_fits(cfg: DictConfig) -> str | None:
    """Tensor parallelism (trainer=tp, fsdp_tp) splits the processes into groups of its size, each block's
    heads over a group, and the LM head by vocabulary rows, which only a loss that takes them
    (vocab_parallel) can train."""
    strategy = value_at(cfg, "trainer.strategy")
    size = strategy.get("tensor_parallel_size", 1) if isinstance(strategy, dict) else 1
    if not is_int(size) or size <= 1:
        return None
    devices, nodes = value_at(cfg, "trainer.devices"), value_at(cfg, "trainer.num_nodes")
    if is_int(devices) and is_int(nodes) and devices > 0 and (devices * nodes) % size:
        return (
            f"trainer.devices={devices} x trainer.num_nodes={nodes} processes do not split into tensor-parallel "
            f"groups of trainer.strategy.tensor_parallel_size={size}: give a multiple of {size} processes"
        )
    heads = value_at(cfg, "model.n_head")
    if is_int(heads) and heads > 0 and heads % size:
        return (
            f"model.n_head={heads} heads do not split over trainer.strategy.tensor_parallel_size={size} processes "
            f"(trainer=tp or fsdp_tp gives each process its share of every block's heads): give a multiple of {size} "
            f"heads (e.g. {split_heads(heads, value_at(cfg, 'model.n_embd'), size)}) or fewer processes"
        )
    name = value_at(cfg, "loss.name")
    if name not in LOSSES or LOSSES[name].takes_vocab_parallel:
        return None
    *takers, last = [name for name, loss in LOSSES.items() if loss.takes_vocab_parallel]
    return (
        f"loss={name} cannot train under tensor parallelism (trainer.strategy.tensor_parallel_size={size}: "
        f"trainer=tp or fsdp_tp), which gives the loss its process's rows of the LM head: "
        f"use loss={', '.join(takers)} or {last}"
    )


def loss_builds(cfg: DictConfig) -> str | None:
    """The loss's own checks of its option values (label_smoothing in [0, 1]...): after
    :func:`unknown_keys`, which names an option the loss does not take."""
    loss = value_at(cfg, "loss")
    if loss is UNSET:
        return None
    options = {key: value for key, value in loss.items() if not key.startswith("_")}
    try:
        build_loss(**options)
    except (ValueError, TypeError, RuntimeError) as error:  # RuntimeError: a peer that cannot run here
        message = str(error)
        if message.partition("=")[0] in options:  # one option's value: loss.softcap=nan: ...
            return in_config_terms(cfg, "loss", message, list(options), set())
        return f"loss={options['name']}: {message}"
    return None


def accelerator_is_here(cfg: DictConfig) -> str | None:
    """A device that this machine lacks: Lightning would refuse it only after the data is built."""
    accelerator = value_at(cfg, "trainer.accelerator")
    if accelerator not in ACCELERATORS or accelerator in ("auto", "cpu"):
        return None
    names = ("cuda", "mps") if accelerator == "gpu" else (accelerator,)
    if any(AcceleratorRegistry[name]["accelerator"].is_available() for name in names):
        return None
    cpu_build = torch.version.cuda is None and accelerator in ("gpu", "cuda")
    why = f"torch {torch.__version__} is {'a build without CUDA' if cpu_build else 'given none'}"
    return (
        f"trainer.accelerator={accelerator}: no {accelerator.upper()} is available here ({why}): drop "
        "trainer.accelerator to train on what is here (auto), or run where there is one"
    )


RELATIONS = (
    accelerator_is_here,
    rows_fit_the_model,
    vocab_size_is_read,
    ignore_index_is_no_token,
    precision_fits_the_strategy,
    tensor_parallelism_fits,
    loss_builds,
)
