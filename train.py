"""Train a GPT: ``python train.py loss=logsumexp`` (see conf/ and README.md)."""

from losslab.command_line import main

if __name__ == "__main__":
    main()
