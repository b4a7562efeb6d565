"""Benchmarks of grao-fast against the plain-PyTorch reference and peer libraries.

``python -m benchmarks --help`` runs the report (Markdown, JSON and PNG under
``benchmarks/results/``); ``pytest benchmarks/ --benchmark-only`` runs the pytest-benchmark suite.
This folder lives in the repository, not in the wheel.
"""
