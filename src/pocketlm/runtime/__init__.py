"""Backends that run a model: llama.cpp for GGUF files (what users run), torch for HF folders."""
