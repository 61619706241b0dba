"""``python train.py [overrides]`` and the installed ``losslab-train``: the command line's keys and
group choices are checked before Lightning is imported (about 7 s on a small CPU), so that a typo
or an unknown loss is named at once rather than after the import."""

from __future__ import annotations

import sys

from losslab.config_keys import check_overrides


def main() -> None:
    """Check the command line's keys, then run Hydra (:func:`losslab.train.run`)."""
    problem = check_overrides(sys.argv[1:])
    if problem:
        sys.exit(f"error: {problem}")
    from losslab.train import register_resolvers, run  # imports Lightning: only for a good command line

    register_resolvers()
    run()
