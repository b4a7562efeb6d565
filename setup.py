"""Ships the top-level ``kernels/`` folder as the subpackage ``grao_fast.kernels``.

A top-level import name ``kernels`` would shadow Hugging Face's ``kernels`` package, which
transformers probes for. Everything else is configured in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["grao_fast", "grao_fast.*"]), "grao_fast.kernels"],
    package_dir={"grao_fast.kernels": "kernels"},
)
