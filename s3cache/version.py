"""The package's version, in a module of its own so that any layer may read it without importing the
readers' API that ``s3cache/__init__`` re-exports."""

__version__ = "0.1.0"
