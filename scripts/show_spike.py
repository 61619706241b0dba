"""Explain a spike that training saved: ``python scripts/show_spike.py <run>/spikes/step-<n>.pt`` (see --help)."""

from losslab.show_spike import main

if __name__ == "__main__":
    main()
