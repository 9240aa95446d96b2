"""batchgen's version, in a module of its own so that anything may import it without importing
the package's API (pipeline.run), which imports the runner."""

__version__ = "0.1.0"
