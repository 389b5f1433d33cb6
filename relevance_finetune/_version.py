"""The package's version, below every module that records it (checkpoints, exports, the demo's cache)."""
__version__ = "0.1.0"
