"""Compare a sweep's runs: ``python scripts/compare_runs.py logs/multiruns/<sweep>`` (see --help)."""

from losslab.compare import main

if __name__ == "__main__":
    main()
