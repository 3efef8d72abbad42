"""The package version, in a module of its own so that any layer can name it without importing
the `stackwise` package's public surface (which points back into those layers)."""

__version__ = "0.1.0"
