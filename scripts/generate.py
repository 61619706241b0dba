"""Sample text from a checkpoint: ``python scripts/generate.py CKPT --prompt "..."`` (see --help)."""

from losslab.generate import main

if __name__ == "__main__":
    main()
