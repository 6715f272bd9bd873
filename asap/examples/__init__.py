"""Runnable examples: ``python -m asap.examples.<name>``."""
