"""The package version, in one place (read by the package root, export metadata and benchmarks)."""

__version__ = "0.1.0"
