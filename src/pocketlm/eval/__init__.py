"""The measuring instrument: perplexity, KL-divergence, top-1 agreement, MMLU, speed, size."""
