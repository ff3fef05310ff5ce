"""Tiny generated models: Llama-shaped, every Linear input a multiple of 256, a BPE tokenizer
trained here on a paragraph, random weights scaled so that predictions are peaked (a near-uniform
model would make every logit comparison trivially pass)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker keeps to its own
# cores, and torch to as many threads: two workers spinning two threads each on two cores slow
# each other several-fold. Set before torch is imported; subprocesses inherit both.
_WORKER, _WORKERS = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKER and _WORKERS > 1 and hasattr(os, "sched_setaffinity"):
    _cpus = sorted(os.sched_getaffinity(0))
    if len(_cpus) >= _WORKERS:
        os.sched_setaffinity(0, _cpus[int(_WORKER.removeprefix("gw")) % _WORKERS::_WORKERS])
        os.environ["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))

WIKI_HELDOUT = Path(__file__).parent / "data" / "wiki-heldout.txt"  # see tests/data/README.md
# CI runs with POCKETLM_STRICT_TESTS=1 (scripts/test.sh sets it): a skipped test fails there, so a
# missing dependency or model can never pass CI by skipping what it should have tested.
STRICT = os.environ.get("POCKETLM_STRICT_TESTS") == "1"
CORPUS = (
    "The river runs past the old mill and under the stone bridge. In 1887 the town built a "
    "school, a library and 3 new roads. Children learn to read, to count from 1 to 100, and to "
    "write letters to friends far away. The library keeps maps, books and records of every "
    "family; its doors open at 9 and close at 5. Rain falls often in spring, and the river rises. "
)


def train_tokenizer(folder: Path, vocab_size: int = 400, seed_text: str = CORPUS) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([seed_text] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
    fast.save_pretrained(folder)


def make_tiny_llama(folder: Path, *, seed: int = 0, tied: bool = True, vocab_size: int = 400,
                    seed_text: str = CORPUS, layers: int = 2, hidden: int = 256, heads: int = 4, kv_heads: int = 2,
                    ffn: int = 512) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder, vocab_size, seed_text)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1,
                      initializer_range=0.08)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_gemma(folder: Path) -> Path:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder, 400, CORPUS)
    cfg = Gemma3TextConfig(vocab_size=400, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                           sliding_window=32, bos_token_id=0, eos_token_id=1, pad_token_id=1, initializer_range=0.08)
    torch.manual_seed(3)
    Gemma3ForCausalLM(cfg).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_qwen(folder: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder, 400, CORPUS)
    cfg = Qwen2Config(vocab_size=400, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=1, initializer_range=0.08)
    torch.manual_seed(4)
    Qwen2ForCausalLM(cfg).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def interrupt_once_started(args: list[str], env: dict, marker: str, wait: float = 0.5) -> tuple[int, str]:
    """Run a command, press Ctrl-C `wait` seconds after `marker` appears in its output (its
    training loop has started); returns its exit status and the rest of its output."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = "", time.time() + 120
    while marker not in seen and time.time() < deadline:
        seen += proc.stdout.read(1)
    time.sleep(wait)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    return proc.returncode, rest


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gguf_f32(tiny_hf, tmp_path_factory) -> Path:
    from pocketlm.models.export_gguf import export_gguf

    return export_gguf(tiny_hf, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "f32")


@pytest.fixture(scope="session")
def sample_text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "sample.txt"
    p.write_text(CORPUS * 12)
    return p


@pytest.fixture(scope="session")
def _shared_gguf_conversions() -> Path:
    # The float HF copies of GGUF files are keyed by the file's bytes and the code that converts
    # them, so they cannot go stale: kept across runs beside the user's own (as mypy's cache is),
    # which spares each run ~45 s per real model converted
    from pocketlm.util.cache import cache_dir

    folder = cache_dir() / "hf-from-gguf"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, _shared_gguf_conversions):
    """Each test its own cache, except the float HF copies of GGUF files (see above)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "hf-from-gguf").symlink_to(_shared_gguf_conversions, target_is_directory=True)
    monkeypatch.setenv("POCKETLM_CACHE", str(cache))


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under POCKETLM_STRICT_TESTS=1, which makes every skip a failure: {reason}"
