"""How a setting's value is checked and refused, in the words every check uses.

Each component checks its own values where they are defined (``GPTConfig``, ``DataConfig``,
``StepConfig``...), and :mod:`losslab.config_checks` builds them before any data work; a refusal is
one line, ``name=value: what it must be (e.g. a good override)``, which the config check puts in the
config's terms (``data.batch_size=0: ...``).
"""

from __future__ import annotations

import math
from typing import Any


def shown(value: Any) -> str:
    """``value`` as a user writes it on the command line: ``null``, ``true``, ``0.1``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def refusal(name: str, value: Any, must_be: str, example: str | None = None) -> str:
    """``name=value: must_be (e.g. example)``; no example where ``must_be`` says the fix already."""
    return f"{name}={shown(value)}: {must_be}" + (f" (e.g. {example})" if example else "")


def require(ok: bool, name: str, value: Any, must_be: str, example: str | None = None) -> None:
    """Raise ValueError with :func:`refusal`'s line unless ``ok``."""
    if not ok:
        raise ValueError(refusal(name, value, must_be, example))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def is_int_at_least(value: Any, minimum: int) -> bool:
    return is_int(value) and value >= minimum
