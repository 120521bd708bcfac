"""Calibration statistics: Hessians of linear inputs and embedding row frequencies.

A tiny random BERT with a tiny word-piece vocabulary stands in for a real
model (no hub access), so every calibration run takes a fraction of a second.
"""

import os
import re

import numpy as np
import pytest
from dcm.calibrate import calibrate, load_stats
from dcm.errors import CheckpointError, OutputExistsError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

WORDS = ["the", "a", "of", "to", "and", "is", "in", "it", "that", "for", "on", "with", "as", "was",
         "at", "by", "be", "this", "are", "from", "or", "an", "not"]
SEQ_LEN = 24
QUERY = "encoder.layer.0.attention.self.query.weight"
FFN_OUT = "encoder.layer.1.output.dense.weight"  # input width 64: the intermediate size


def _vocab() -> dict:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = specials + WORDS + letters + ["##" + c for c in letters] + list(".,;")
    return {t: i for i, t in enumerate(tokens)}


def _text(rng) -> str:
    """Paragraphs of 2..40 words: sequences of many lengths (padded in batches), two truncated."""
    paragraphs = []
    for n in (7, 2, 40, 9, 3, 12, 5, 16, 4, 30, 6, 14, 8, 10):
        words = rng.choice(WORDS + ["cat", "mat", "dog"], size=n)
        paragraphs.append(" ".join(words) + ".")
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, text file) of a tiny random BERT and its calibration text."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("calib")
    torch.manual_seed(0)
    vocab = _vocab()
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=40)
    transformers.BertModel(config).eval().save_pretrained(root / "model")
    transformers.BertTokenizer(vocab=vocab).save_pretrained(root / "model")
    text = root / "text.txt"
    text.write_text(_text(np.random.default_rng(0)), encoding="utf-8")
    return root / "model", text


@pytest.fixture(scope="module")
def stats_b4(tiny, tmp_path_factory):
    model_dir, text = tiny
    out = tmp_path_factory.mktemp("b4") / "stats.safetensors"
    report = calibrate(model_dir, text, out, seq_len=SEQ_LEN, batch_size=4)
    return report, load_stats(out)


def _reference_ids(model_dir, text) -> list:
    """Token ids of each paragraph of the text, tokenized here independently of dcm."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.read_text()) if p.strip()]
    return [tokenizer(p, truncation=True, max_length=SEQ_LEN, return_tensors="pt")["input_ids"]
            for p in paragraphs]


def _reference_inputs(model_dir, text, module_name):
    """Inputs of one linear, recomputed sequence by sequence (batch of one: no padding at all)."""
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    rows = []
    hook = model.get_submodule(module_name).register_forward_hook(
        lambda mod, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        for ids in _reference_ids(model_dir, text):
            model(input_ids=ids)
    hook.remove()
    return torch.cat(rows).numpy()


def test_file_has_every_linear_and_embedding(tiny, stats_b4):
    model_dir, _ = tiny
    report, stats = stats_b4
    model = transformers.AutoModel.from_pretrained(model_dir)
    linears = {f"{n}.weight": m.in_features for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    embeddings = {f"{n}.weight": m.num_embeddings for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Embedding)}
    assert set(stats.names()) == set(linears) | set(embeddings)
    assert report.layers == len(linears) + len(embeddings) == len(stats.names())
    for name, width in linears.items():
        assert stats.hessian(name).shape == (width, width) and stats.row_frequencies(name) is None
    for name, rows in embeddings.items():
        assert stats.row_frequencies(name).shape == (rows,) and stats.hessian(name) is None
    assert stats.hessian("no.such.weight") is None and "no.such.weight" not in stats
    assert QUERY in stats
    assert stats.tokens == report.tokens > 0
    assert stats.metadata["format"] == "dcm-calibration" and stats.metadata["version"] == "2" and stats.transposed == frozenset()
    assert stats.metadata["seq_len"] == str(SEQ_LEN) and stats.metadata["model"] == "model"
    assert int(stats.metadata["sequences"]) == report.sequences == 14


@pytest.mark.parametrize("name", [QUERY, FFN_OUT])
def test_hessian_is_mean_of_xtx_over_real_tokens(tiny, stats_b4, name):
    model_dir, text = tiny
    _, stats = stats_b4
    x = _reference_inputs(model_dir, text, name.removesuffix(".weight"))
    assert x.shape[0] == stats.tokens
    expected = x.T @ x / x.shape[0]
    h = stats.hessian(name)
    assert h.dtype == np.float64
    np.testing.assert_allclose(h, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(h, h.T)
    assert np.linalg.eigvalsh(h).min() >= -1e-5 * np.abs(h).max()


def test_padding_does_not_count(tiny, stats_b4, tmp_path):
    model_dir, text = tiny
    _, padded = stats_b4
    lengths = sorted(ids.shape[1] for ids in _reference_ids(model_dir, text))
    assert any(len(set(lengths[i:i + 4])) > 1 for i in range(0, len(lengths), 4))  # batches have padding
    calibrate(model_dir, text, tmp_path / "b1.safetensors", seq_len=SEQ_LEN, batch_size=1)
    single = load_stats(tmp_path / "b1.safetensors")
    assert single.names() == padded.names() and single.tokens == padded.tokens
    for name in padded.names():
        a, b = single.hessian(name), padded.hessian(name)
        if a is None:
            a, b = single.row_frequencies(name), padded.row_frequencies(name)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(a).max(), err_msg=name)
    words = padded.row_frequencies("embeddings.word_embeddings.weight")
    assert words[0] == 0  # [PAD] is never a real token


def test_embedding_frequencies(stats_b4):
    _, stats = stats_b4
    for name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                 "embeddings.token_type_embeddings.weight"):
        freq = stats.row_frequencies(name)
        assert abs(freq.sum() - 1) < 1e-6 and (freq >= 0).all(), name
    positions = stats.row_frequencies("embeddings.position_embeddings.weight")
    assert positions[0] > 0 and (positions[SEQ_LEN:] == 0).all()  # truncated at SEQ_LEN
    np.testing.assert_array_equal(stats.row_frequencies("embeddings.token_type_embeddings.weight"), [1, 0])


def test_max_tokens_is_exact(tiny, tmp_path):
    model_dir, text = tiny
    report = calibrate(model_dir, text, tmp_path / "s.safetensors", seq_len=SEQ_LEN, max_tokens=50)
    stats = load_stats(report.path)
    assert report.tokens == stats.tokens == 50
    assert abs(stats.row_frequencies("embeddings.word_embeddings.weight").sum() - 1) < 1e-6


def test_existing_output_is_refused(tiny, tmp_path):
    model_dir, text = tiny
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="exists"):
        calibrate(model_dir, text, out, seq_len=SEQ_LEN)
    assert out.read_bytes() == b"keep me"
    calibrate(model_dir, text, out, seq_len=SEQ_LEN, max_tokens=30, overwrite=True)
    assert load_stats(out).tokens == 30
    assert os.listdir(tmp_path) == ["s.safetensors"]  # no temporary file left behind


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_stats(path)


def test_file_without_format_tag_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors_numpy.save_file({"a.weight": np.eye(3, dtype=np.float32)}, str(path))
    with pytest.raises(CheckpointError, match="plain.safetensors.*not a calibration file"):
        load_stats(path)


META = {"format": "dcm-calibration", "version": "1", "tokens": "10"}


@pytest.mark.parametrize("array, message", [
    (np.ones((3, 4), dtype=np.float32), "not square"),
    (np.ones((2, 2, 2), dtype=np.float32), "neither 1-D nor 2-D"),
    (np.ones((3, 3), dtype=np.float16), "dtype F16"),
])
def test_bad_tensors_are_refused_on_open(tmp_path, array, message):
    path = tmp_path / "bad.safetensors"
    safetensors_numpy.save_file({"a.weight": array}, str(path), metadata=META)
    with pytest.raises(CheckpointError, match=f"bad.safetensors: tensor 'a.weight'.*{message}"):
        load_stats(path)


@pytest.mark.parametrize("array, message", [
    (np.array([[1, np.nan], [np.nan, 1]], dtype=np.float32), "not finite"),
    (np.array([[1, 2], [0, 1]], dtype=np.float32), "not symmetric"),
    (np.array([[-1, 0], [0, 1]], dtype=np.float32), "non-negative diagonal"),
])
def test_bad_hessians_are_refused_on_read(tmp_path, array, message):
    path = tmp_path / "bad.safetensors"
    safetensors_numpy.save_file({"a.weight": array}, str(path), metadata=META)
    stats = load_stats(path)
    with pytest.raises(CheckpointError, match=f"tensor 'a.weight'.*{message}"):
        stats.hessian("a.weight")


def test_wrong_version_is_refused(tmp_path):
    path = tmp_path / "v3.safetensors"
    safetensors_numpy.save_file({"a.weight": np.ones(3, dtype=np.float32)}, str(path),
                                metadata={**META, "version": "3"})
    with pytest.raises(CheckpointError, match="version '3'"):
        load_stats(path)


@pytest.mark.parametrize("transposed, message", [
    ("a.weight", "not a JSON list"), ('["a.weight", 3]', "not a JSON list"),
    ('["b.weight"]', "names 'b.weight', which is not a Hessian"), ('["c.weight"]', "names 'c.weight'"),
])
def test_bad_transposed_list_is_refused(tmp_path, transposed, message):
    path = tmp_path / "t.safetensors"
    safetensors_numpy.save_file({"a.weight": np.eye(3, dtype=np.float32), "b.weight": np.ones(3, dtype=np.float32)},
                                str(path), metadata={**META, "version": "2", "transposed": transposed})
    with pytest.raises(CheckpointError, match=message):
        load_stats(path)
