"""Methods choose quantized values: (weights, statistics, block format) -> GGUF block bytes.
They know nothing about files; formats know nothing about methods."""
