"""Export a checkpoint for Hugging Face transformers: ``python scripts/export.py CKPT OUT_DIR`` (see --help)."""

import sys

try:
    from losslab.export import main
except ModuleNotFoundError as error:  # transformers, an optional dependency, is not installed
    sys.exit(f"error: {error}")

if __name__ == "__main__":
    main()
