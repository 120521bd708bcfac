"""Method profiles: ratio parsing, tensor selection by name patterns, the registry."""

from fractions import Fraction

import numpy as np
import pytest

import dcm
from dcm import methods
from dcm.constants import Kind
from dcm.errors import UsageError
from dcm.records import Full

from conftest import write_checkpoint


@pytest.mark.parametrize("text, value", [("1/16", Fraction(1, 16)), ("0.0625", Fraction(1, 16)),
                                         (" 1/4 ", Fraction(1, 4)), ("1", Fraction(1))])
def test_parse_ratio(text, value):
    assert methods.parse_ratio(text) == value


@pytest.mark.parametrize("text", ["0", "-1/16", "2", "1/0", "abc", ""])
def test_parse_ratio_rejects(text):
    with pytest.raises(UsageError):
        methods.parse_ratio(text)


def test_default_selection_is_every_2d_float_matrix():
    sel = methods.Selection()
    assert sel.selects("layer.0.attn.q.weight", "BF16", (8, 8))
    assert sel.selects("embeddings.word_embeddings.weight", "F32", (100, 8))
    assert not sel.selects("layer.0.attn.q.bias", "F32", (8,))
    assert not sel.selects("conv.weight", "F32", (4, 4, 3, 3))
    assert not sel.selects("embeddings.position_ids", "I64", (1, 512))


def test_selection_by_patterns():
    sel = methods.Selection(include=["*.mlp.*", "*.attn.*"], exclude=["*.attn.o.*"])
    assert sel.selects("l.0.mlp.up.weight", "F16", (4, 4))
    assert sel.selects("l.0.attn.q.weight", "F16", (4, 4))
    assert not sel.selects("l.0.attn.o.weight", "F16", (4, 4))
    assert not sel.selects("embed.weight", "F16", (4, 4))
    assert not sel.selects("l.0.mlp.up.bias", "F16", (4,))  # patterns never widen past 2-D floats


def test_registry_and_lossless_refuses_a_ratio():
    assert isinstance(methods.get_method("lossless"), methods.Lossless)
    with pytest.raises(UsageError, match="unknown method"):
        methods.get_method("no-such-method")
    with pytest.raises(UsageError, match="takes no ratio"):
        methods.get_method("lossless", ratio="1/16")
    with pytest.raises(UsageError, match="zstd level"):
        methods.get_method("lossless", zstd_level=0)


class _StoreWhole(methods.Method):
    """A stand-in lossy method: stores every selected tensor as ``full``."""

    name = "test-store-whole"
    takes_ratio = True

    def encode_tensor(self, name, ft, base, dtype_name, plan=None):
        return (Kind.FULL, *Full.encode(ft))


@pytest.fixture
def store_whole():
    methods.register(_StoreWhole)
    yield _StoreWhole.name
    del methods.METHODS[_StoreWhole.name]


def test_encoder_applies_the_method_to_selected_tensors_only(tmp_path, store_whole):
    rng = np.random.default_rng(0)
    tensors = {n: ("F32", rng.standard_normal(s).astype(np.float32))
               for n, s in [("a.weight", (4, 8)), ("b.weight", (4, 8)), ("a.bias", (4,))]}
    finetune = {n: (dt, a + np.float32(0.01)) for n, (dt, a) in tensors.items()}
    base_dir = write_checkpoint(tmp_path / "base", tensors)
    ft_dir = write_checkpoint(tmp_path / "ft", finetune)
    out = tmp_path / "x.dcm"
    dcm.encode(base_dir, ft_dir, out, method=store_whole, ratio="1/8", exclude=["b.*"])
    with dcm.open(out) as f:
        kinds = {r.name: r.kind_name for r in f.records()}
        params = f.metadata()["params"]
    assert kinds == {"a.weight": "full", "b.weight": "dense-delta", "a.bias": "dense-delta"}
    assert params["ratio"] == "1/8"
    assert params["selection"] == {"include": [], "exclude": ["b.*"]}
