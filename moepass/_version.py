"""The package version (a leaf module, so library modules need not import the package root)."""

__version__ = "0.1.0"
