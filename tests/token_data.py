"""A tiny token dataset (shapes captions + random 8x8 image tokens) and its BPE tokenizer, for prior tests."""

from pathlib import Path

import numpy as np

from dalle_jax.data.shapes import ShapesSpec, render_example
from dalle_jax.data.tokenizer import TextTokenizer
from dalle_jax.data.tokens import TokenSpec, token_builder

GRID, VOCAB, TEXT_LEN = 8, 128, 12  # the quick preset: 32 px, 3 dVAE groups, 128 codes


def make_token_data(root: Path, posterior_topk: int = 0) -> Path:
    """Writes root/tokens (train 96, validation 32 incl. held-out pairs) and root/tokenizer.json; returns root.

    `posterior_topk` k > 0 adds a random top-k posterior per token, as `encode --posterior-topk` writes it:
    k distinct codes, the first the token itself, with descending logits."""
    spec = ShapesSpec(image_size=32, num_train=96, num_validation=32, num_test=0)
    rng = np.random.default_rng(0)
    encoded = {}
    for split, count in (("train", 96), ("validation", 32)):
        captions = [render_example(spec, split, i)["caption"] for i in range(count)]
        encoded[split] = {"tokens": list(rng.integers(0, VOCAB, (count, GRID, GRID)).astype(np.uint16)),
                          "caption": captions, "id": list(range(count))}
        if posterior_topk:
            codes = (np.stack(encoded[split]["tokens"])[..., None].astype(np.int64) + np.arange(posterior_topk)) % VOCAB
            logits = -np.sort(rng.exponential(1.0, (count, GRID, GRID, posterior_topk)), axis=-1)
            encoded[split] |= {"posterior_codes": list(codes.astype(np.uint16)),
                               "posterior_logits": list(logits.astype(np.float32))}
    builder = token_builder(str(root / "tokens"), TokenSpec("shapes", "random", GRID, VOCAB, posterior_topk), encoded)
    builder.download_and_prepare()
    tokenizer = TextTokenizer.train(encoded["train"]["caption"], vocab_size=300, text_len=TEXT_LEN)
    tokenizer.save(root / "tokenizer.json")
    return root
