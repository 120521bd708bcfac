"""Decoded checkpoints load in transformers and compute what the fine-tune computes.

A tiny random BERT stands in for a real model (no hub access); the real pair is
exercised by scripts/demo.py.
"""

import os

import pytest

import dcm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny_bert(seed, dtype):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=40)
    return transformers.BertModel(config).to(dtype).eval()


def _fine_tune(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.add_((0.01 * p.float().abs().mean() * noise).to(p.dtype))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decoded_checkpoint_loads_and_matches(tmp_path, dtype):
    os.environ["HF_HUB_OFFLINE"] = "1"
    base = _tiny_bert(0, dtype)
    base.save_pretrained(tmp_path / "base")
    ft = _fine_tune(_tiny_bert(0, dtype), 1)
    ft.save_pretrained(tmp_path / "ft")

    dcm.encode(tmp_path / "base", tmp_path / "ft", tmp_path / "ft.dcm")
    dcm.decode(tmp_path / "ft.dcm", tmp_path / "base", tmp_path / "decoded")

    loaded = transformers.AutoModel.from_pretrained(tmp_path / "decoded", dtype=dtype).eval()
    expected = ft.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == dtype or not tensor.is_floating_point(), name
        assert torch.equal(tensor.view(torch.uint8) if tensor.is_floating_point() else tensor,
                           expected[name].view(torch.uint8) if tensor.is_floating_point()
                           else expected[name]), name
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, ft(ids).last_hidden_state)
    assert (tmp_path / "decoded" / "config.json").exists()
