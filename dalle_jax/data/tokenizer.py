"""BPE text tokenizer for the prior: lowercase + NFKC, byte-level BPE, BPE-dropout, per-position pads.

Design choices (DALL·E, Ramesh et al. 2021, §2.2 and appendix):

* **Byte-level pre-tokenizer** (GPT-2 style regex split, 256-symbol byte alphabet always in the vocab). Any
  unicode caption encodes without an unknown token and decodes back byte-exactly, and punctuation keeps its
  spacing, which a whitespace/punctuation splitter would lose. ``add_prefix_space`` makes a word's first
  occurrence and its mid-caption occurrences share tokens (helps a small vocab); ``decode`` drops that space.
* **Normalisation**: NFKC, lowercase (paper), runs of whitespace collapsed to one space, ends stripped.
  ``normalize`` exposes it, and ``decode(encode(c)) == normalize(c)`` for captions that fit in ``text_len``.
* **Id space**: ids ``0 .. vocab_size - 1`` are BPE tokens, where ``vocab_size`` is the size the trainer
  actually produced (it can be below the requested size on a small corpus such as the shapes dataset); every
  id below ``vocab_size`` is therefore a real token and the text softmax has no dead classes. The requested
  size is kept in the file for reference. No special tokens are reserved: the prior adds its own
  start-of-image position. Pads live above the BPE ids:
    - ``"per_position"`` (paper): the pad at text position ``i`` has id ``vocab_size + i``,
      ``embedding_size = vocab_size + text_len``;
    - ``"shared"`` (ablation): one pad id ``vocab_size``, ``embedding_size = vocab_size + 1``.
* **BPE-dropout** (Provilkov et al. 2020) only when ``encode(training=True)``: merges are applied in Python,
  one at a time (lowest merge rank first, leftmost on ties, exactly HF's order), and at every step each
  candidate merge is dropped with probability ``dropout``; when all candidates are dropped the word is done.
  Randomness comes from the caller's ``numpy.random.Generator``, so a seed reproduces the segmentation (HF's
  built-in dropout uses an unseeded RNG). Eval-mode encoding uses HF's Rust encoder.
* **Truncation**: captions longer than ``text_len`` tokens are cut to their first ``text_len`` tokens and one
  ``CaptionTruncatedWarning`` per ``encode`` call reports how many were cut.
* **File**: one JSON file holds our settings and HF's tokenizer JSON (``save`` / ``load``).
"""

from __future__ import annotations

import functools
import json
import os
import random
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle_jax.errors import DatasetError

FILE_FORMAT = "dalle_jax.text_tokenizer"
FILE_VERSION = 1
PAD_MODES = ("per_position", "shared")
BYTE_ALPHABET_SIZE = 256  # byte-level BPE always keeps the 256 byte symbols


class CaptionTruncatedWarning(UserWarning):
    """Some captions had more than ``text_len`` tokens and were cut (one warning per ``encode`` call)."""


def _build_normalizer(lowercase: bool) -> normalizers.Normalizer:
    steps = [normalizers.NFKC()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    return normalizers.Sequence(steps)


class TextTokenizer:
    """Byte-level BPE with fixed-length output and per-position (or shared) pad ids.

    Build with ``TextTokenizer.train`` or ``TextTokenizer.load``; the constructor wraps an already trained
    HF ``tokenizers.Tokenizer`` built by ``train`` (byte-level BPE without special tokens).
    """

    def __init__(
        self,
        hf_tokenizer: Tokenizer,
        text_len: int,
        pad_mode: str = "per_position",
        dropout: float = 0.1,
        lowercase: bool = True,
        requested_vocab_size: int | None = None,
    ):
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self._hf = hf_tokenizer
        self.text_len = int(text_len)
        self.pad_mode = pad_mode
        self.dropout = float(dropout)
        self.lowercase = bool(lowercase)

        model = json.loads(hf_tokenizer.to_str())["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"expected a BPE model, got {model.get('type')!r}")
        vocab: dict[str, int] = model["vocab"]
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("BPE vocab ids must be exactly 0 .. len(vocab) - 1")
        self.vocab_size = len(vocab)
        self.requested_vocab_size = int(requested_vocab_size or self.vocab_size)
        self._vocab = vocab
        # Older tokenizers files store merges as "a b" strings, newer ones as [a, b] pairs.
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self._merge_rank: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(pairs)}
        self._word_ids_cached = functools.lru_cache(maxsize=1 << 16)(self._word_ids_deterministic)

    # ------------------------------------------------------------------ sizes and pads

    @property
    def embedding_size(self) -> int:
        """Rows the prior's text embedding needs: BPE ids plus pad ids."""
        return self.vocab_size + (self.text_len if self.pad_mode == "per_position" else 1)

    def pad_ids(self) -> np.ndarray:
        """The pad id at each text position, shape (text_len,) int32."""
        if self.pad_mode == "per_position":
            return np.arange(self.vocab_size, self.vocab_size + self.text_len, dtype=np.int32)
        return np.full((self.text_len,), self.vocab_size, dtype=np.int32)

    def pad_mask(self, ids: np.ndarray) -> np.ndarray:
        """True where ``ids`` holds a pad (any id >= vocab_size), same shape as ``ids``."""
        return np.asarray(ids) >= self.vocab_size

    # ------------------------------------------------------------------ encoding

    def normalize(self, text: str) -> str:
        """The text the tokenizer actually sees: NFKC, lowercased, whitespace collapsed and stripped."""
        return self._hf.normalizer.normalize_str(text)

    def encode_unpadded(
        self,
        captions: Sequence[str],
        *,
        training: bool = False,
        rng: np.random.Generator | None = None,
    ) -> list[list[int]]:
        """BPE ids of each caption, untruncated and unpadded (see ``encode`` for the arguments)."""
        if isinstance(captions, str):
            raise TypeError("captions must be a sequence of strings, not one string")
        if training and self.dropout > 0.0:
            if rng is None:
                raise ValueError("encode(training=True) with dropout > 0 needs rng (a numpy Generator)")
            # One numpy draw per caption seeds a cheap Python RNG for the per-merge coin flips
            # (numpy's per-call overhead would dominate); the result still follows from `rng` alone.
            return [
                self._encode_python(caption, self.dropout, random.Random(int(rng.integers(2**63))))
                for caption in captions
            ]
        return [enc.ids for enc in self._hf.encode_batch(list(captions), add_special_tokens=False)]

    def encode(
        self,
        captions: Sequence[str],
        *,
        training: bool = False,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Tokenize, truncate and pad a batch of captions.

        Args:
          captions: raw caption strings.
          training: apply BPE-dropout with probability ``self.dropout`` (needs ``rng`` when dropout > 0).
          rng: source of the dropout randomness; the same generator state gives the same ids.

        Returns:
          (B, text_len) int32 ids; position ``i`` past a caption's end holds that position's pad id.
        """
        token_lists = self.encode_unpadded(captions, training=training, rng=rng)
        ids = np.tile(self.pad_ids(), (len(token_lists), 1))  # (B, text_len)
        num_truncated = 0
        for row, tokens in enumerate(token_lists):
            if len(tokens) > self.text_len:
                num_truncated += 1
                tokens = tokens[: self.text_len]
            ids[row, : len(tokens)] = tokens
        if num_truncated:
            warnings.warn(
                f"{num_truncated} of {len(token_lists)} captions had more than text_len={self.text_len} "
                "tokens and were truncated",
                CaptionTruncatedWarning,
                stacklevel=2,
            )
        return ids

    def _pre_tokenize(self, caption: str) -> list[str]:
        """Normalised caption split into byte-level words (each char is one byte symbol)."""
        normalized = self._hf.normalizer.normalize_str(caption)
        return [word for word, _ in self._hf.pre_tokenizer.pre_tokenize_str(normalized)]

    def _encode_python(self, caption: str, dropout: float, rng: random.Random | None) -> list[int]:
        """Encode with merges applied in Python; with dropout == 0 this equals HF's encoder."""
        ids: list[int] = []
        for word in self._pre_tokenize(caption):
            if dropout > 0.0:
                ids += self._word_ids(word, dropout, rng)
            else:
                ids += self._word_ids_cached(word)
        return ids

    def _word_ids_deterministic(self, word: str) -> tuple[int, ...]:
        return tuple(self._word_ids(word, 0.0, None))

    def _word_ids(self, word: str, dropout: float, rng: random.Random | None) -> list[int]:
        """BPE one word: repeatedly merge the lowest-rank adjacent pair (leftmost on ties).

        With dropout, each candidate merge is dropped with probability ``dropout`` at every step and the
        best surviving one is applied; when every candidate is dropped the word stays as it is.
        """
        symbols = list(word)
        while len(symbols) > 1:
            candidates = [
                (rank, pos)
                for pos in range(len(symbols) - 1)
                if (rank := self._merge_rank.get((symbols[pos], symbols[pos + 1]))) is not None
            ]
            if not candidates:
                break
            if dropout > 0.0:
                candidates = [c for c in candidates if rng.random() >= dropout]
                if not candidates:
                    break
            _, pos = min(candidates)
            symbols[pos : pos + 2] = [symbols[pos] + symbols[pos + 1]]
        return [self._vocab[symbol] for symbol in symbols]

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """Text of each row of ``ids`` with pads dropped (normalised text, see ``normalize``)."""
        rows = np.asarray(ids)
        if rows.ndim == 1:
            rows = rows[None]
        token_lists = [[int(i) for i in row if 0 <= i < self.vocab_size] for row in rows]
        texts = self._hf.decode_batch(token_lists, skip_special_tokens=False)
        # add_prefix_space put a space before the first word; normalised text never starts with one.
        return [text[1:] if text.startswith(" ") else text for text in texts]

    # ------------------------------------------------------------------ training and files

    @classmethod
    def train(
        cls,
        captions: Iterable[str],
        vocab_size: int,
        text_len: int,
        pad_mode: str = "per_position",
        dropout: float = 0.1,
        min_frequency: int = 1,
        lowercase: bool = True,
    ) -> TextTokenizer:
        """Train byte-level BPE on ``captions``.

        ``vocab_size`` is an upper bound (it includes the 256 byte symbols); the trained tokenizer's
        ``vocab_size`` is what the corpus supports, which a small corpus can leave below the request.
        """
        if vocab_size < BYTE_ALPHABET_SIZE:
            raise ValueError(
                f"vocab_size must be >= {BYTE_ALPHABET_SIZE} (the byte alphabet), got {vocab_size}"
            )
        hf_tokenizer = Tokenizer(models.BPE())
        hf_tokenizer.normalizer = _build_normalizer(lowercase)
        hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
        hf_tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        hf_tokenizer.train_from_iterator(captions, trainer)
        return cls(hf_tokenizer, text_len, pad_mode, dropout, lowercase, requested_vocab_size=vocab_size)

    def settings(self) -> dict[str, Any]:
        return {
            "text_len": self.text_len,
            "pad_mode": self.pad_mode,
            "dropout": self.dropout,
            "lowercase": self.lowercase,
            "vocab_size": self.vocab_size,
            "requested_vocab_size": self.requested_vocab_size,
            "embedding_size": self.embedding_size,
        }

    def check_config(self, text: Any) -> None:
        """Raises ConfigError naming the fix unless this tokenizer fits `text` (a config's TextConfig): the same
        text_len and pad_mode, and no more BPE ids than text.vocab_size."""
        from dalle_jax.errors import ConfigError

        if self.text_len != text.text_len or self.pad_mode != text.pad_mode:
            raise ConfigError(
                f"tokenizer has text_len={self.text_len}, pad_mode={self.pad_mode} but the config has "
                f"text.text_len={text.text_len}, text.pad_mode={text.pad_mode}: pass --set text.text_len=... to match")
        if self.vocab_size > text.vocab_size:
            raise ConfigError(f"tokenizer vocab {self.vocab_size} > text.vocab_size {text.vocab_size}: "
                              f"pass --set text.vocab_size={self.vocab_size}")

    def save(self, path: str | os.PathLike) -> None:
        """Write settings and the HF tokenizer into one JSON file (parent directories are created)."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        payload = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "settings": self.settings(),
            "hf_tokenizer": json.loads(self._hf.to_str()),
        }
        tmp_path = path + ".tmp"
        with open(tmp_path, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False)
        os.replace(tmp_path, path)  # never leave a half-written tokenizer behind

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextTokenizer:
        """Read a file written by ``save``; raises FileNotFoundError / ValueError naming the file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"tokenizer file {path!r} not found; train one with `dalle-jax tokenizer train --out {path}`"
            )
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
            if payload.get("format") != FILE_FORMAT:
                raise ValueError(f"'format' is {payload.get('format')!r}, expected {FILE_FORMAT!r}")
            if payload.get("version") != FILE_VERSION:
                raise ValueError(f"unsupported version {payload.get('version')!r}")
            settings = payload["settings"]
            tokenizer = cls(
                Tokenizer.from_str(json.dumps(payload["hf_tokenizer"])),
                text_len=settings["text_len"],
                pad_mode=settings["pad_mode"],
                dropout=settings["dropout"],
                lowercase=settings["lowercase"],
                requested_vocab_size=settings.get("requested_vocab_size"),
            )
        except Exception as err:  # json, missing keys, HF's parser errors: all mean a bad file
            raise DatasetError(f"tokenizer file {str(path)!r} is malformed ({type(err).__name__}: {err}); train it "
                               "again with `dalle-jax tokenizer train`") from err
        if tokenizer.vocab_size != settings.get("vocab_size", tokenizer.vocab_size):
            raise ValueError(
                f"tokenizer file {path!r} is malformed: settings say vocab_size={settings['vocab_size']} "
                f"but the BPE model has {tokenizer.vocab_size} tokens"
            )
        return tokenizer

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self.vocab_size}, text_len={self.text_len}, "
            f"pad_mode={self.pad_mode!r}, "
            f"dropout={self.dropout}, embedding_size={self.embedding_size})"
        )


def captions_from_dataset(dataset_dir: str, split: str = "train", chunk_size: int = 1024) -> list[str]:
    """All captions of one split of a TFDS dataset directory (the version dir holding dataset_info.json)."""
    import tensorflow_datasets as tfds  # heavy import, only needed here
    from tqdm.auto import tqdm

    from dalle_jax.data.pipeline import caption_text

    source = tfds.builder_from_directory(dataset_dir).as_data_source(split)
    captions: list[str] = []
    with tqdm(total=len(source), desc=f"reading captions ({split})", unit="caption") as progress:
        for start in range(0, len(source), chunk_size):
            indices = list(range(start, min(start + chunk_size, len(source))))
            captions.extend(caption_text(example["caption"]) for example in source.__getitems__(indices))
            progress.update(len(indices))
    return captions
