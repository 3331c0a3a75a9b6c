"""Eager PyTorch reference implementations: speed baselines only (need `pip install torch`)."""
