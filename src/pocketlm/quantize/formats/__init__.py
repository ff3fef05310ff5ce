"""GGUF block formats, one small codec each, registered by ggml type name."""
from . import _all  # noqa: F401
from .base import REGISTRY, BlockFormat, BlockParams, get

__all__ = ["REGISTRY", "BlockFormat", "BlockParams", "get"]
