"""Compare runs: ``python scripts/compare_runs.py logs/multiruns/<sweep>``, or runs chosen by path
or glob, ``python scripts/compare_runs.py 'logs/runs/2026-12-*' logs/runs/<run>`` (see --help)."""

from losslab.compare import main

if __name__ == "__main__":
    main()
