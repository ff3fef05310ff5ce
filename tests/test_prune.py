"""Width pruning: GQA expanded to MHA computes the same function; cuts give aligned shapes."""
import pytest
import torch
from conftest import make_tiny_llama

from pocketlm.distill.prune import prune_llama_width
from pocketlm.errors import PocketError
from pocketlm.models import load


@pytest.fixture(scope="module")
def gqa_teacher(tmp_path_factory):
    return load(make_tiny_llama(tmp_path_factory.mktemp("t") / "gqa", hidden=320, heads=5, kv_heads=1, ffn=640, layers=2))


def test_keeping_everything_is_exact(gqa_teacher):
    student = prune_llama_width(gqa_teacher, hidden=320, heads=5, ffn=640)
    assert student.model.config.num_key_value_heads == 5  # GQA groups became MHA
    ids = torch.arange(3, 60)[None]
    with torch.inference_mode():
        a, b = gqa_teacher.model(ids).logits, student.model(ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_pruned_shapes_are_aligned(gqa_teacher):
    student = prune_llama_width(gqa_teacher, hidden=256, heads=4, ffn=512).model
    for name, mod in student.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 256 == 0, name
    with torch.inference_mode():
        assert torch.isfinite(student(torch.arange(3, 40)[None]).logits).all()
    with pytest.raises(PocketError, match="must not exceed"):
        prune_llama_width(gqa_teacher, hidden=512, heads=4)
