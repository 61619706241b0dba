"""The keys of a training config: those the files under ``conf/`` set, those each node's reader
takes, and the keys that nothing reads, with the key meant ("did you mean model.n_layer?").

:func:`check_overrides` reads the command line before Hydra composes it: an override of a key that
no file under ``conf/`` has (``model.n_layr=2``) gets "did you mean model.n_layer?" instead of
Hydra's advice to add it with ``+``, and a misspelt choice (``loss=fusd``) "did you mean
loss=fused?" instead of Hydra's traceback. :func:`unknown_keys` reads the composed config, for
:mod:`losslab.config_checks`: every key against what reads it (the ``_target_``'s signature, or for
the nodes that train.py reads itself, the keys of the files under ``conf/``).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Iterator
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import yaml
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from losslab.losses import LOSSES, build_loss, loss_options
from losslab.settings import shown

if TYPE_CHECKING:
    from importlib.abc import Traversable

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


def check_overrides(overrides: list[str]) -> str | None:
    """The first command-line override of a key, or a group choice, that no file under ``conf/``
    has, as a message.

    ``overrides`` is ``sys.argv[1:]`` of ``python train.py``: flags (``-m``, ``--cfg job``) and
    anything that is not ``key=value`` are skipped, and so are additions and deletions (``+``,
    ``++``, ``~``) and Hydra's own keys (``hydra.``, ``hydra/``). A group choice (``loss=fusd``)
    must be a file of the group (:func:`unknown_choice`): "did you mean loss=fused?".
    A key counts as known when any option of any group has it (``loss.chunk_size`` is fused's
    only, yet known): which option was chosen is Hydra's to check. An unknown top-level key
    (``foo=1``) is reported too. A key added with ``+`` is :func:`losslab.config_checks.check_config`'s
    to judge, once composed. With configs from elsewhere (``--config-dir``...) nothing is reported.
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
REFERENCE = re.compile(r"\$\{([\w.]+)\}")  # a value that is another key's, whole: ${paths.cache_dir}


def value_at(cfg: DictConfig, key: str) -> Any:
    """The value at dotted ``key``, resolved, as plain Python (lists, dicts); or :data:`UNSET`."""
    try:
        value = OmegaConf.select(cfg, key, default=UNSET)
        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
        return value
    except InterpolationResolutionError:
        return UNSET


def origin(cfg: DictConfig, key: str) -> str:
    """The key that gives ``key`` its value, the one to set: ``key`` itself, or, when its value is
    another key's whole (``data.cache_dir: ${paths.cache_dir}``), that key's origin."""
    seen = {key}
    while True:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        raw = OmegaConf.to_container(node, resolve=False).get(leaf) if isinstance(node, DictConfig) else None
        match = REFERENCE.fullmatch(raw) if isinstance(raw, str) else None
        if match is None or match[1] in seen:
            return key
        key = match[1]
        seen.add(key)


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
    return target.__name__, target_options(target)


def target_options(target: Any) -> list[str] | None:
    """The keyword arguments that ``target`` takes; ``None`` when it takes any (``**kwargs``)."""
    parameters = inspect.signature(target).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def unknown_option(cfg: DictConfig, key: str, owner: str, options: list[str]) -> str:
    """``model.n_layr=2: GPTConfig has no option n_layr; did you mean model.n_layer?``"""
    parent, _, name = key.rpartition(".")
    matches = difflib.get_close_matches(name, options, n=1)
    if matches:
        fix = f"did you mean {join(parent, matches[0])}?"
    else:
        fix = f"it takes {', '.join(sorted(options))}" if options else "it takes no options"
    return f"{key}={shown(value_at(cfg, key))}: {owner} has no option {name}; {fix}"
