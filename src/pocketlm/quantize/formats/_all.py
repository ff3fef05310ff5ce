"""Importing this registers every block type."""
from . import kquants, legacy  # noqa: F401
