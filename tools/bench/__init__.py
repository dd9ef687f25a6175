"""Benchmarks of the control plane, one module per benchmark; `python -m tools.bench` runs them."""
