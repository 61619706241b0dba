"""Check a training config before any data work, so that a bad value fails in one line, at once.

Two checks, for the two moments a config can be wrong:

- :func:`check_overrides` reads the command line before Hydra composes it: an override of a key
  that no file under ``conf/`` has (``model.n_layr=2``) gets "did you mean model.n_layer?"
  instead of Hydra's advice to add it with ``+``, and a misspelt choice (``loss=fusd``) "did you
  mean loss=fused?" instead of Hydra's traceback.
- :func:`check_config` reads the composed config: every value against what it must be
  (``optimizer.lr=-0.01``), the values that must agree with each other (``data.vocab_size`` and
  the tokenizer), and every key against what reads it (the ``_target_``'s signature, or for the
  nodes that train.py reads itself, the keys of the files under ``conf/``).

Both name the key, its value and the fix in one line.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import torch
import yaml
from hydra.utils import get_object
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.pytorch.accelerators import AcceleratorRegistry
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from losslab.checkpointing import KEEP
from losslab.data import CORPORA, MODES
from losslab.lightning_module import NONFINITE_POLICIES
from losslab.losses import LOSSES, build_loss, loss_options
from losslab.model import GPTConfig
from losslab.tokenizers import TOKENIZERS

if TYPE_CHECKING:
    from importlib.abc import Traversable

# The tokenizers whose vocabulary is fixed, with its size (<|endoftext|> included). bpe's is
# data.vocab_size, which counts the 256 bytes and <|endoftext|> too, so it is at least 257.
FIXED_VOCAB_SIZES = {"bytes": 257, "gpt2": 50257}
BPE_MIN_VOCAB_SIZE = 257
FSDP_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")
# what Lightning's Trainer(precision=...) takes: its own list
PRECISIONS = tuple(value for kind in get_args(_PRECISION_INPUT) for value in get_args(kind))
# Trainer(accelerator=...): "gpu" is CUDA's or Apple's MPS, whichever is there
ACCELERATORS = ("auto", "cpu", "gpu", *sorted(AcceleratorRegistry.available_accelerators() - {"cpu"}))
MAX_SEED = np.iinfo(np.uint32).max  # numpy's, which Lightning's seed_everything seeds too
FLOAT32_MAX = float(np.finfo(np.float32).max)
PATH_CORPORA = ("text", "jsonl", "parquet")  # the corpora read from data.path, which they need

# Options of a `_target_` that a training run does not take from the config (losslab passes them
# itself, or cannot honour them), with what to do instead.
SET_BY_LOSSLAB = {
    "model.vocab_size": "losslab sets this itself: the tokenizer sets it: choose tokenizer=... (and data.vocab_size for bpe)",
    "loss.reduction": "losslab sets this itself: the training step sums the loss and divides by the real tokens of the step",
    "loss.return_parts": "losslab sets this itself: the training step asks for the loss's parts to log them",
    "loss.vocab_parallel": "losslab sets this itself: trainer=tp and fsdp_tp give the loss its rows of the LM head",
    "data.accumulate": "losslab sets this itself: use step.accumulate",
    "trainer.accumulate_grad_batches": "losslab sets this itself: the module optimizes manually: use step.accumulate",
    "trainer.gradient_clip_val": "losslab sets this itself: the module optimizes manually: use step.gradient_clip_val",
    "trainer.logger": "losslab sets this itself: choose logger=...",
    "trainer.callbacks": "losslab sets this itself: add a node under callbacks",
    "loss.class_weights": (
        "training takes no class weights: a step divides by its count of targets, not by their summed "
        "weights; give them to build_loss(..., class_weights=...) in your own loop"
    ),
}

# Nodes whose every entry is an object to build, whatever its name: train.py builds each callback.
OPEN_NODES = {"callbacks"}

WHERE_KEYS_ARE = "python train.py --cfg job lists every key"
# Hydra's flags that read configs from elsewhere than conf/.
OTHER_CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


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


def check_overrides(overrides: list[str]) -> str | None:
    """The first command-line override of a key, or a group choice, that no file under ``conf/``
    has, as a message.

    ``overrides`` is ``sys.argv[1:]`` of ``python train.py``: flags (``-m``, ``--cfg job``) and
    anything that is not ``key=value`` are skipped, and so are additions and deletions (``+``,
    ``++``, ``~``) and Hydra's own keys (``hydra.``, ``hydra/``). A group choice (``loss=fusd``)
    must be a file of the group (:func:`unknown_choice`): "did you mean loss=fused?".
    A key counts as known when any option of any group has it (``loss.chunk_size`` is fused's
    only, yet known): which option was chosen is Hydra's to check. An unknown top-level key
    (``foo=1``) is reported too. A key added with ``+`` is :func:`check_config`'s to judge, once
    composed. With configs from elsewhere (``--config-dir``...) nothing is reported.
    """
    if any(arg.split("=", 1)[0] in OTHER_CONFIG_FLAGS for arg in overrides):
        return None  # keys from files outside conf/: not ours to know
    for override in overrides:
        if override.startswith(("-", "+", "~")) or "=" not in override:
            continue
        key, value = override.split("=", 1)
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or "@" in key:
            continue
        if key in conf_groups():
            problem = unknown_choice(key, value, override)
            if problem:
                return problem
        elif key not in conf_keys():
            return f"unknown config key {key} (in {override}): {did_you_mean(key)}"
    return None


def unknown_choice(group: str, value: str, override: str) -> str | None:
    """A choice of ``group`` in ``value`` (``fusd``, or a sweep's ``naive,fusd``) that no file under
    ``conf/<group>/`` is, with the closest one. Sweep functions (``choice(...)``), lists and
    interpolations are Hydra's to read."""
    if any(char in value for char in "()[]{}$'\""):
        return None
    options = sorted(file.name.removesuffix(".yaml") for g, file in conf_files() if g == group)
    for choice in (part.strip() for part in value.split(",")):
        if choice in options or choice == "null":
            continue
        matches = difflib.get_close_matches(choice, options, n=1)
        choices = f"one of {', '.join(options)}"
        fix = f"did you mean {group}={matches[0]}? (or {choices})" if matches else f"choose {choices}"
        return f"unknown {group} choice {choice} (in {override}): {fix}"
    return None


def did_you_mean(key: str) -> str:
    """Where to look for the right key: the known key closest to ``key``, and where they all are."""
    matches = difflib.get_close_matches(key, sorted(conf_keys()), n=1)
    return f"did you mean {matches[0]}? ({WHERE_KEYS_ARE})" if matches else WHERE_KEYS_ARE


# --- the files under conf/ -------------------------------------------------------------------


def conf_files() -> Iterator[tuple[str, Traversable]]:
    """``(group, file)`` for every YAML file under ``losslab.conf``; the top level's group is ""."""
    folders = [("", files("losslab.conf"))]
    while folders:
        group, folder = folders.pop()
        for entry in folder.iterdir():
            if entry.is_dir():
                folders.append((f"{group}/{entry.name}".lstrip("/"), entry))
            elif entry.name.endswith(".yaml"):
                yield group, entry


@functools.cache
def conf_groups() -> frozenset[str]:
    """The config groups: ``data``, ``loss``, ``hydra/launcher``..."""
    return frozenset(group for group, _ in conf_files() if group)


@functools.cache
def conf_keys() -> frozenset[str]:
    """Every dotted key that some file under ``conf/`` sets, placed at the file's package."""
    keys = set()
    for group, file in conf_files():
        text = file.read_text()
        content = yaml.safe_load(text) or {}
        content.pop("defaults", None)
        keys |= dotted_keys(content, package(text, group))
    # Hydra's own settings (hydra.run.dir...) are Hydra's to check; the job's config has none.
    return frozenset(key for key in keys if key != "hydra" and not key.startswith("hydra."))


def package(text: str, group: str) -> str:
    """Where a file's keys go: its ``# @package`` header, else its group (``hydra/launcher`` ->
    ``hydra.launcher``); ``_global_`` is the top level."""
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# @package "):
            name = line.removeprefix("# @package ").strip()
            return "" if name == "_global_" else name
    return group.replace("/", ".")


def dotted_keys(node: dict, prefix: str) -> set[str]:
    """``prefix`` and the dotted path of every key in ``node``, nested ones included."""
    keys = {prefix} if prefix else set()
    for key, value in node.items():
        path = join(prefix, str(key))
        keys |= dotted_keys(value, path) if isinstance(value, dict) else {path}
    return keys


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# --- the composed config ---------------------------------------------------------------------

UNSET = object()  # a key that is absent, ??? (no value yet), or unresolvable outside a Hydra run


def value_at(cfg: DictConfig, key: str) -> Any:
    """The value at dotted ``key``, resolved, as plain Python (lists, dicts); or :data:`UNSET`."""
    try:
        value = OmegaConf.select(cfg, key, default=UNSET)
        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
        return value
    except InterpolationResolutionError:
        return UNSET


def shown(value: Any) -> str:
    """``value`` as a user writes it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def config_problems(cfg: DictConfig) -> Iterator[str]:
    """What is wrong with ``cfg``, one line each: lazily, so that the later checks may assume
    that the earlier ones passed (no n_head of 0 when n_embd is divided by it). The model comes
    first: other values follow its own (data.context_length is model.context_length)."""
    problem = model_builds(cfg)
    if problem:
        yield problem
    for rule in RULES:
        problem = rule.problem(value_at(cfg, rule.key))
        if problem:
            yield problem
    yield from unknown_keys(cfg, OmegaConf.to_container(cfg, resolve=False))
    for check in RELATIONS:
        problem = check(cfg)
        if problem:
            yield problem


# --- one value at a time ---------------------------------------------------------------------


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def int_at_least(minimum: int) -> Callable[[Any], bool]:
    return lambda value: is_int(value) and value >= minimum


def are_betas(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(is_number(b) and 0 <= b < 1 for b in value)


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
        example = f" (e.g. {self.example})" if self.example else ""
        return f"{self.key}={shown(value)}: {self.must_be}{example}"


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
        "keep_checkpoints",
        lambda v: v in KEEP,
        f"the checkpoints to keep must be one of {', '.join(KEEP)}",
        "keep_checkpoints=last",
    ),
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
    Rule("data.corpus", lambda v: v in CORPORA, f"the corpus must be one of {', '.join(CORPORA)}", "data=shakespeare"),
    Rule(
        "data.tokenizer",
        lambda v: v in TOKENIZERS,
        f"the tokenizer must be one of {', '.join(TOKENIZERS)}",
        "tokenizer=bytes",
    ),
    Rule(
        "data.ranks_path",
        lambda v: v is None or (isinstance(v, str) and Path(v).is_file()),
        "no such file (or not a regular file): give a local copy of GPT-2's ranks",
        "data.ranks_path=path/to/r50k_base.tiktoken",
    ),
    Rule(
        "data.context_length", int_at_least(1), "the rows' length must be an int >= 1 token", "data.context_length=128"
    ),
    Rule("data.batch_size", int_at_least(1), "the batch size must be an int >= 1 row", "data.batch_size=16"),
    Rule("data.mode", lambda v: v in MODES, f"the mode must be one of {', '.join(MODES)}", "data.mode=padded"),
    Rule(
        "data.val_fraction",
        lambda v: is_number(v) and 0 < v < 1,
        "the validation share must be in (0, 1)",
        "data.val_fraction=0.1",
    ),
    Rule(
        "data.val_batches",
        lambda v: v is None or int_at_least(1)(v),
        "the validation batches must be an int >= 1, or null for the whole split",
        "data.val_batches=20",
    ),
    Rule(
        "data.max_document_chars",
        int_at_least(1),
        "a document's longest piece must be an int >= 1 characters",
        "data.max_document_chars=4096",
    ),
    Rule(
        "data.bpe_train_bytes",
        int_at_least(1),
        "the BPE's training sample must be an int >= 1 bytes",
        "data.bpe_train_bytes=100_000_000",
    ),
    Rule(
        "data.text_field",
        lambda v: isinstance(v, str) and v != "",
        "the records' text field must be a non-empty name",
        "data.text_field=text",
    ),
    Rule("data.num_workers", int_at_least(0), "the loader's workers must be an int >= 0", "data.num_workers=2"),
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
    Rule("schedule.warmup_steps", int_at_least(0), "the warm-up must be an int >= 0 steps", "schedule.warmup_steps=50"),
    Rule(
        "schedule.total_steps",
        lambda v: v is None or int_at_least(1)(v),
        "the schedule's length must be an int >= 1 steps, or null for trainer.max_steps",
        "schedule.total_steps=500",
    ),
    Rule(
        "schedule.min_lr_ratio",
        lambda v: is_number(v) and 0 <= v <= 1,
        "the final learning rate's share of optimizer.lr must be in [0, 1]",
        "schedule.min_lr_ratio=0.1",
    ),
    Rule("step.accumulate", int_at_least(1), "a step must take an int >= 1 micro-batches", "step.accumulate=2"),
    Rule(
        "step.gradient_clip_val",
        lambda v: v is None or (is_finite(v) and v > 0),
        "the clipping norm must be a finite number > 0, or null for no clipping",
        "step.gradient_clip_val=1.0",
    ),
    Rule(
        "callbacks.last_checkpoint.every_n_train_steps",
        int_at_least(1),
        "last.ckpt is written every this many steps (and at the end): an int >= 1",
        "callbacks.last_checkpoint.every_n_train_steps=50",
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
    Rule(
        "step.nonfinite",
        lambda v: v in NONFINITE_POLICIES,
        f"a non-finite step must {' or '.join(NONFINITE_POLICIES)}",
        "step.nonfinite=stop",
    ),
)


# --- every key against what reads it ---------------------------------------------------------


def unknown_keys(cfg: DictConfig, node: dict, path: str = "") -> Iterator[str]:
    """The keys of ``node`` (the part of ``cfg`` at ``path``, unresolved) that nothing reads.

    A node with a ``_target_`` takes its target's arguments; another node, the keys that the
    files under ``conf/`` give it. ``_target_``, ``_partial_`` and the like are Hydra's.
    """
    owner, options = node_options(node, path)
    for key, value in node.items():
        full = join(path, key)
        if key.startswith("_"):
            continue
        if full in SET_BY_LOSSLAB:
            yield f"{full}={shown(value_at(cfg, full))}: {SET_BY_LOSSLAB[full]}"
        elif options is not None and key not in options:
            yield unknown_option(cfg, full, owner, options)
        elif isinstance(value, dict):
            yield from unknown_keys(cfg, value, full)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if is_target(item):
                    yield from unknown_keys(cfg, item, f"{full}.{i}")


def is_target(value: Any) -> bool:
    """Whether ``value`` is a node that Hydra instantiates."""
    return isinstance(value, dict) and "_target_" in value


def node_options(node: dict, path: str) -> tuple[str, list[str] | None]:
    """What reads ``node`` and the keys it takes; ``None`` when any key goes (``**kwargs``)."""
    if path in OPEN_NODES:
        return path, None
    if not is_target(node):
        prefix = f"{path}." if path else ""
        children = {key.removeprefix(prefix) for key in conf_keys() if key.startswith(prefix)}
        return path or "the config", [child for child in children if "." not in child]
    target = get_object(node["_target_"])
    if target is build_loss:
        name = node.get("name")
        if name not in LOSSES:
            return f"loss {name!r}", None
        return f"loss {name!r}", ["name", *(o for o in loss_options(name) if f"loss.{o}" not in SET_BY_LOSSLAB)]
    parameters = inspect.signature(target).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return target.__name__, None
    return target.__name__, [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def unknown_option(cfg: DictConfig, key: str, owner: str, options: list[str]) -> str:
    """``model.n_layr=2: GPT has no option n_layr; did you mean model.n_layer?``"""
    parent, _, name = key.rpartition(".")
    matches = difflib.get_close_matches(name, options, n=1)
    if matches:
        fix = f"did you mean {join(parent, matches[0])}?"
    else:
        fix = f"it takes {', '.join(sorted(options))}" if options else "it takes no options"
    return f"{key}={shown(value_at(cfg, key))}: {owner} has no option {name}; {fix}"


# --- values that must agree ------------------------------------------------------------------
# Each returns what is wrong, or None; they run once every value alone is right.


def model_builds(cfg: DictConfig) -> str | None:
    """The model's shape, checked where it is defined (:class:`losslab.model.GPTConfig`)."""
    model = value_at(cfg, "model")
    if model is UNSET:
        return None
    # the tokenizer gives the real vocabulary size; unknown keys are unknown_keys' to report
    known = {field.name for field in fields(GPTConfig)} - {"vocab_size"}
    options = {key: value for key, value in model.items() if key in known}
    try:
        GPTConfig(vocab_size=1, **options)
    except ValueError as error:
        return f"model.{error}"
    return None


def rows_fit_the_model(cfg: DictConfig) -> str | None:
    rows, model = value_at(cfg, "data.context_length"), value_at(cfg, "model.context_length")
    if rows is UNSET or model is UNSET or rows <= model:
        return None
    return (
        f"data.context_length={rows} is longer than model.context_length={model}: use "
        f"data.context_length<={model} or a model with a longer context (model.context_length={rows})"
    )


def vocab_size_fits_the_tokenizer(cfg: DictConfig) -> str | None:
    tokenizer, vocab_size = value_at(cfg, "data.tokenizer"), value_at(cfg, "data.vocab_size")
    if tokenizer is UNSET or vocab_size is UNSET:
        return None
    if tokenizer == "bpe":
        if is_int(vocab_size) and vocab_size >= BPE_MIN_VOCAB_SIZE:
            return None
        return (
            f"data.vocab_size={shown(vocab_size)}: tokenizer=bpe needs an int >= {BPE_MIN_VOCAB_SIZE} "
            "(256 bytes and <|endoftext|>, then the merges) (e.g. data.vocab_size=4096)"
        )
    size = FIXED_VOCAB_SIZES[tokenizer]
    if vocab_size is None or vocab_size == size:
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


def tensor_parallelism_fits(cfg: DictConfig) -> str | None:
    """Tensor parallelism (trainer=tp, fsdp_tp) splits the processes into groups of its size, and the
    LM head by vocabulary rows, which only a loss that takes them (vocab_parallel) can train."""
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
    """The loss's own checks of its option values (label_smoothing in [0, 1]...)."""
    loss = value_at(cfg, "loss")
    if loss is UNSET:
        return None
    options = {key: value for key, value in loss.items() if not key.startswith("_")}
    try:
        build_loss(**options)
    except (ValueError, TypeError, RuntimeError) as error:  # RuntimeError: a peer that cannot run here
        return f"loss={options['name']}: {error}"
    return None


def corpus_has_a_path(cfg: DictConfig) -> str | None:
    """data=text, jsonl and parquet read the user's files: data.path must name them."""
    corpus, path = value_at(cfg, "data.corpus"), value_at(cfg, "data.path")
    if corpus not in PATH_CORPORA or path not in (UNSET, None):
        return None
    return (
        f"data.path={'???' if path is UNSET else 'null'}: data={corpus} reads your own files: "
        f"give data.path=<a file, a folder of {corpus} files or a glob>"
    )


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
    corpus_has_a_path,
    accelerator_is_here,
    rows_fit_the_model,
    vocab_size_fits_the_tokenizer,
    ignore_index_is_no_token,
    precision_fits_the_strategy,
    tensor_parallelism_fits,
    loss_builds,
)
