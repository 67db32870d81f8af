"""The sample command's pieces that need no trained model: prompt checks, truncation, output layout."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from dalle_jax.commands.sample import read_prompts
from dalle_jax.data.tokenizer import TextTokenizer
from dalle_jax.sampling.rerank import RankedSample, SampleInputError, encode_prompts, write_outputs


@pytest.fixture(scope="module")
def tokenizer():
    captions = ["a red circle", "a large blue square in the top left", "a green cross above a black triangle"] * 20
    return TextTokenizer.train(captions, vocab_size=300, text_len=6)


def test_empty_prompt_is_named(tokenizer):
    with pytest.raises(SampleInputError, match=r"prompt 1 is empty"):
        encode_prompts(tokenizer, ["a red circle", " \t"])


def test_long_prompt_is_truncated_with_what_was_kept(tokenizer, caplog):
    long = "a large blue square in the top left above a green cross"
    with caplog.at_level(logging.WARNING, logger="dalle_jax.sampling.rerank"):
        ids = encode_prompts(tokenizer, ["a red circle", long])
    assert ids.shape == (2, 6)
    kept = tokenizer.decode(ids[1:2])[0]
    assert long.startswith(kept.strip()) and len(kept.strip()) < len(long)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "prompt 1" in messages[0] and repr(kept) in messages[0]


def test_unseen_characters_still_encode(tokenizer):
    ids = encode_prompts(tokenizer, ["ä ☃ circle"])
    assert ids.shape == (1, 6) and (ids[0] < tokenizer.embedding_size).all()


def test_output_layout(tmp_path):
    rng = np.random.default_rng(0)
    prompts = ["a red circle", "a blue square"]
    results = [[RankedSample(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), s, i)
                for i, s in enumerate(scores)] for scores in ([0.9, 0.5, 0.1], [0.3, 0.2, -0.4])]
    grid = write_outputs(tmp_path, prompts, results, seed=3)
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [line["file"] for line in lines] == [f"{p:04d}_{r:02d}.png" for p in range(2) for r in range(3)]
    assert lines[4] == {"prompt_index": 1, "prompt": "a blue square", "rank": 1, "file": "0001_01.png",
                        "clip_score": 0.2, "seed": 3, "sample_index": 1}
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "0001_02.png")), results[1][2].image)
    with Image.open(grid) as img:
        assert img.size[0] >= 3 * 16 and img.size[1] >= 2 * 16


def test_prompts_file_and_missing_prompts(tmp_path):
    import argparse

    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n  \na blue square\n")
    args = argparse.Namespace(prompt=["a cyan cross"], prompts_file=str(path))
    assert read_prompts(args) == ["a cyan cross", "a red circle", "a blue square"]
    with pytest.raises(SampleInputError, match="at least one"):
        read_prompts(argparse.Namespace(prompt=[], prompts_file=None))
    with pytest.raises(SampleInputError, match="no such file"):
        read_prompts(argparse.Namespace(prompt=[], prompts_file=str(tmp_path / "nope.txt")))
