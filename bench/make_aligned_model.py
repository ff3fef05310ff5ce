"""A 256-aligned model for exercising k-quants: SmolLM2-135M pruned to hidden 512, 8 heads
(MHA), MLP 1536, without healing (so its perplexity is poor; it is a test object, not a
product). Usage: .venv/bin/python bench/make_aligned_model.py OUT_FOLDER"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from pocketlm.distill.prune import prune_llama_width  # noqa: E402
from pocketlm.models import load  # noqa: E402
from pocketlm.models.export_hf import save_hf  # noqa: E402

save_hf(prune_llama_width(load("smollm2-135m"), hidden=512, heads=8, ffn=1536), sys.argv[1], "f32")
print(sys.argv[1])
