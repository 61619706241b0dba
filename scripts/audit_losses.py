"""Audit every loss implementation on a run's own activations: ``python scripts/audit_losses.py CKPT`` (see --help)."""

from losslab.audit import main

if __name__ == "__main__":
    main()
