"""edm: networks, losses, samplers, datasets, metrics and the training loop of EDM and EDM2."""

__version__ = '0.1.0'  # keep equal to pyproject.toml (tests/test_packaging.py checks it)
