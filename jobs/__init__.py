"""Entry points, each runnable as ``python -m jobs.<name>``."""
