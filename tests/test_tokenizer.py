"""BPE text tokenizer: round trip, normalisation, pads, truncation, BPE-dropout, files, CLI."""

import argparse
import json
import random
import unicodedata
import warnings

import numpy as np
import pytest

from dalle_jax.commands.tokenizer import register as register_tokenizer
from dalle_jax.data.tokenizer import (
    CaptionTruncatedWarning,
    TextTokenizer,
    captions_from_dataset,
)

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "magenta", "white", "black"]
SHAPES = ["square", "circle", "triangle", "pentagon", "hexagon", "star", "ellipse", "rectangle"]
WORDS = COLORS + SHAPES + ["a", "an", "the", "on", "left", "right", "top", "bottom", "of", "and", "small"]
ODD_CAPTIONS = [
    "  A  Red\tSQUARE\n on the LEFT  ",
    "ﬁne Café, naïve ÜBER-größe!",
    "東京の 赤い 四角 🙂🚀",
    "it's (ok): 3.5% of x/y; \"quoted\"",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ ①②",
    "aaaaaaa bbbbbbbb aaaa",
]


def random_captions(rng: np.random.Generator, count: int, max_words: int = 8) -> list[str]:
    """Captions of vocabulary words plus, now and then, a random letter string the corpus never saw."""
    captions = []
    for _ in range(count):
        words = [str(w) for w in rng.choice(WORDS, size=rng.integers(1, max_words + 1))]
        if rng.random() < 0.3:
            letters = rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(1, 10))
            words.insert(int(rng.integers(0, len(words) + 1)), "".join(letters))
        captions.append(" ".join(words))
    return captions


def reference_normalize(text: str) -> str:
    """NFKC, lowercase, collapse whitespace: written independently of the tokenizer's HF normaliser."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


@pytest.fixture(scope="module")
def seed() -> int:
    value = int(np.random.SeedSequence().entropy % (2**31))
    print(f"test_tokenizer seed: {value}")  # shown by pytest on failure
    return value


@pytest.fixture(scope="module")
def corpus(seed) -> list[str]:
    return random_captions(np.random.default_rng(seed), 1500) + ["a " * 5] * 20


@pytest.fixture(scope="module")
def tokenizer(corpus) -> TextTokenizer:
    return TextTokenizer.train(corpus, vocab_size=600, text_len=24, dropout=0.1)


def hf_ids(tok: TextTokenizer, captions: list[str]) -> list[list[int]]:
    return [enc.ids for enc in tok._hf.encode_batch(captions, add_special_tokens=False)]


def test_check_config_names_the_mismatched_field(tokenizer):
    from dalle_jax.config import ConfigError, TextConfig

    tokenizer.check_config(TextConfig(vocab_size=600, text_len=24))  # what it was trained with
    tokenizer.check_config(TextConfig(vocab_size=tokenizer.vocab_size, text_len=24))  # exactly its BPE ids
    for text, fix in ((TextConfig(vocab_size=600, text_len=32), "text.text_len=32"),
                      (TextConfig(vocab_size=600, text_len=24, pad_mode="shared"), "text.pad_mode=shared"),
                      (TextConfig(vocab_size=tokenizer.vocab_size - 1, text_len=24),
                       f"--set text.vocab_size={tokenizer.vocab_size}")):
        with pytest.raises(ConfigError, match=fix):
            tokenizer.check_config(text)


def test_vocab_is_dense_and_within_request(tokenizer):
    assert 256 < tokenizer.vocab_size <= 600
    assert tokenizer.requested_vocab_size == 600
    assert sorted(tokenizer._vocab.values()) == list(range(tokenizer.vocab_size))
    # A tiny corpus cannot fill a big request: vocab_size is what was trained, and ids stay below it.
    small = TextTokenizer.train(["a red square", "a blue circle"], vocab_size=5000, text_len=8)
    assert 256 <= small.vocab_size < 5000
    ids = small.encode(["a red circle", "blue square ü"])
    assert ids[~small.pad_mask(ids)].max() < small.vocab_size


def test_round_trip_fresh_captions(seed):
    rng = np.random.default_rng(seed + 1)
    captions = random_captions(rng, 200) + ODD_CAPTIONS
    tok = TextTokenizer.train(random_captions(rng, 500), vocab_size=400, text_len=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptionTruncatedWarning)  # everything must fit
        ids = tok.encode(captions)
    assert ids.dtype == np.int32 and ids.shape == (len(captions), 128)
    decoded = tok.decode(ids)
    for caption, text in zip(captions, decoded, strict=True):
        assert text == tok.normalize(caption) == reference_normalize(caption), caption
    # Byte-level BPE has no unknown token: unseen unicode survives byte-exactly.
    assert decoded[-4] == "東京の 赤い 四角 🙂🚀"


def test_lowercase_and_nfkc(corpus):
    tok = TextTokenizer.train(corpus, vocab_size=400, text_len=16)
    np.testing.assert_array_equal(tok.encode(["A RED Square"]), tok.encode(["a red square"]))
    np.testing.assert_array_equal(tok.encode(["ﬁve ＲＥＤ"]), tok.encode(["five red"]))
    cased = TextTokenizer.train(corpus, vocab_size=400, text_len=16, lowercase=False)
    assert cased.decode(cased.encode(["A RED Square"])) == ["A RED Square"]
    assert not np.array_equal(cased.encode(["A RED Square"]), cased.encode(["a red square"]))


@pytest.mark.parametrize("pad_mode", ["per_position", "shared"])
def test_pads_and_pad_mask(corpus, seed, pad_mode):
    tok = TextTokenizer.train(corpus, vocab_size=600, text_len=24, pad_mode=pad_mode)
    captions = random_captions(np.random.default_rng(seed + 2), 64, max_words=6) + [""]
    ids = tok.encode(captions)
    lengths = [len(x) for x in hf_ids(tok, captions)]
    positions = np.arange(tok.text_len)
    for row, (tokens, n) in enumerate(zip(hf_ids(tok, captions), lengths, strict=True)):
        assert n < tok.text_len
        np.testing.assert_array_equal(ids[row, :n], tokens)
        expected_pads = tok.vocab_size + positions[n:] if pad_mode == "per_position" else tok.vocab_size
        np.testing.assert_array_equal(ids[row, n:], np.broadcast_to(expected_pads, (tok.text_len - n,)))
    expected_mask = positions[None, :] >= np.array(lengths)[:, None]
    np.testing.assert_array_equal(tok.pad_mask(ids), expected_mask)
    expected_rows = tok.vocab_size + (tok.text_len if pad_mode == "per_position" else 1)
    assert tok.embedding_size == expected_rows
    assert ids.max() < tok.embedding_size and ids.min() >= 0
    assert tok.decode(ids)[-1] == ""


def test_truncation_warns_once_with_count(tokenizer, seed):
    rng = np.random.default_rng(seed + 3)
    captions = random_captions(rng, 40, max_words=3) + random_captions(rng, 40, max_words=40)
    full = hf_ids(tokenizer, captions)
    expected_count = sum(len(x) > tokenizer.text_len for x in full)
    assert 0 < expected_count < len(captions)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tokenizer.encode(captions)
    truncation_warnings = [w for w in caught if issubclass(w.category, CaptionTruncatedWarning)]
    assert len(truncation_warnings) == 1
    assert str(truncation_warnings[0].message).startswith(f"{expected_count} of {len(captions)} captions")
    for row, tokens in enumerate(full):
        kept = tokens[: tokenizer.text_len]
        np.testing.assert_array_equal(ids[row, : len(kept)], kept)
    short = [c for c, tokens in zip(captions, full, strict=True) if len(tokens) <= tokenizer.text_len]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptionTruncatedWarning)
        tokenizer.encode(short)  # nothing to truncate: no warning


def test_python_merges_without_dropout_equal_hf(tokenizer, seed):
    captions = random_captions(np.random.default_rng(seed + 4), 300, max_words=12) + ODD_CAPTIONS
    expected = hf_ids(tokenizer, captions)
    for caption, ids in zip(captions, expected, strict=True):
        assert tokenizer._encode_python(caption, 0.0, None) == ids, caption
    # Uncached path too (dropout > 0 code with a generator that never drops).
    never = random.Random(0)
    for caption, ids in zip(captions[:50], expected[:50], strict=True):
        words = tokenizer._pre_tokenize(caption)
        assert sum((tokenizer._word_ids(w, 1e-12, never) for w in words), []) == ids, caption


def test_dropout_rate_on_single_merge_words(tokenizer, seed):
    """A word needing exactly one merge stays split with probability p: count it."""
    (merged_id,) = hf_ids(tokenizer, ["a"])[0]
    split_ids = [tokenizer._vocab["Ġ"], tokenizer._vocab["a"]]
    caption = " ".join(["a"] * 400)
    rng = np.random.default_rng(seed + 5)
    kept_split = []
    for _ in range(5):
        tokens = tokenizer.encode_unpadded([caption], training=True, rng=rng)[0]
        assert tokens.count(merged_id) + 2 * tokens.count(split_ids[0]) == len(tokens)
        assert tokens.count(split_ids[0]) == tokens.count(split_ids[1])
        kept_split.append(tokens.count(split_ids[0]))
    rate = sum(kept_split) / (5 * 400)
    assert abs(rate - tokenizer.dropout) < 0.03, rate  # 2000 Bernoulli(0.1) draws: sd 0.0067


def test_dropout_only_in_training_and_reproducible(tokenizer, seed):
    captions = random_captions(np.random.default_rng(seed + 6), 32, max_words=4)
    deterministic = tokenizer.encode(captions)
    rng = np.random.default_rng(seed + 7)
    for _ in range(3):  # eval mode ignores rng and never drops merges
        np.testing.assert_array_equal(tokenizer.encode(captions, rng=rng), deterministic)
    draws = np.stack([tokenizer.encode(captions, training=True, rng=rng) for _ in range(20)])
    differs = (draws != deterministic[None]).any(axis=-1)  # (draws, captions)
    assert 0.0 < differs.mean() < 1.0
    for draw in draws:  # a dropout encoding still spells the caption
        assert tokenizer.decode(draw) == tokenizer.decode(deterministic)
    first = tokenizer.encode(captions, training=True, rng=np.random.default_rng(seed))
    again = tokenizer.encode(captions, training=True, rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(first, again)
    with pytest.raises(ValueError, match="rng"):
        tokenizer.encode(captions, training=True)


@pytest.mark.filterwarnings("ignore::dalle_jax.data.tokenizer.CaptionTruncatedWarning")
def test_save_load_identical(tokenizer, tmp_path, seed):
    path = tmp_path / "run" / "tokenizer.json"
    tokenizer.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]
    loaded = TextTokenizer.load(path)
    assert loaded.settings() == tokenizer.settings()
    captions = random_captions(np.random.default_rng(seed + 8), 64) + ODD_CAPTIONS
    np.testing.assert_array_equal(loaded.encode(captions), tokenizer.encode(captions))
    np.testing.assert_array_equal(
        loaded.encode(captions, training=True, rng=np.random.default_rng(seed)),
        tokenizer.encode(captions, training=True, rng=np.random.default_rng(seed)),
    )


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        TextTokenizer.load(missing)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json"):
        TextTokenizer.load(garbage)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="wrong.json"):
        TextTokenizer.load(wrong)


def _build_caption_dataset(data_dir, captions: list[str]) -> str:
    """A minimal TFDS dataset with the project's common schema; returns its version directory."""
    import tensorflow_datasets as tfds

    class TokenizerTestCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
                        "caption": tfds.features.Text(),
                        "id": tfds.features.Scalar(dtype=np.int64),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for i, caption in enumerate(captions):
                image = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
                yield i, {"image": image, "caption": caption, "id": i}

    builder = TokenizerTestCaptions(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


def test_cli_train_on_tfds_dataset(tmp_path, seed, capsys):
    captions = random_captions(np.random.default_rng(seed + 9), 22, max_words=10) + ODD_CAPTIONS[:2]
    dataset_dir = _build_caption_dataset(tmp_path / "tfds", captions)
    assert sorted(captions_from_dataset(dataset_dir)) == sorted(captions)

    parser = argparse.ArgumentParser(prog="dalle-jax")
    register_tokenizer(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "run" / "tokenizer.json"
    args = parser.parse_args(
        ["tokenizer", "train", "--data", dataset_dir, "--out", str(out), "--vocab-size", "320",
         "--text-len", "8", "--pad-mode", "shared", "--dropout", "0.2"]
    )  # fmt: skip
    assert args.func(args) == 0
    loaded = TextTokenizer.load(out)
    assert (loaded.text_len, loaded.pad_mode, loaded.dropout) == (8, "shared", 0.2)
    direct = TextTokenizer.train(captions, vocab_size=320, text_len=8, pad_mode="shared")
    assert loaded.vocab_size == direct.vocab_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptionTruncatedWarning)
        np.testing.assert_array_equal(loaded.encode(captions), direct.encode(captions))
    lengths = [len(x) for x in hf_ids(direct, captions)]
    printed = capsys.readouterr().out
    assert f"vocab size: {direct.vocab_size}" in printed
    assert f"max {max(lengths)}" in printed
    assert f"text_len=8: {sum(n > 8 for n in lengths)} " in printed
