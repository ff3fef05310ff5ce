"""Quantization: GGUF block formats, methods that choose their values, plans, the GGUF writer."""
