"""The captioned-emoji dataset: captions state what is drawn, held-out (emoji, colour) pairs stay out of train, the
glyphs are the font's, and a missing font is one line naming the Debian package."""

import json
import unicodedata

import numpy as np

from dalle_jax.cli import main
from dalle_jax.data import emoji, shapes
from dalle_jax.data.pipeline import caption_text, open_split

FONT = emoji.FONT_PATHS[0]  # Debian's fonts-noto-color-emoji (.ci/run installs it; the README says so)


def test_names_come_from_the_unicode_names():
    assert len(emoji.NAMES) == len(emoji.EMOJI)  # no two emoji share a caption name
    for name, char in emoji.NAMES.items():
        unicode_words = unicodedata.name(char).lower().split()
        assert all(word in unicode_words for word in name.split()), (name, unicodedata.name(char))
        assert not set(name.split()) & set(shapes.COLORS)  # a colour word would read as the background


def test_captions_state_what_is_drawn_and_holdout_stays_out_of_train():
    spec = emoji.EmojiSpec(seed=int(np.random.default_rng().integers(1 << 30)))
    held = set(spec.holdout)
    seen_held = 0
    for split, count in (("train", 300), ("validation", 120)):
        for i in range(count):
            ex = emoji.render_example(spec, split, i, FONT)
            objects, background, caption = ex["objects"], ex["background"], ex["caption"]
            pairs = {(o["emoji"], background) for o in objects}
            if split == "train":
                assert not pairs & held, caption
            seen_held += split == "validation" and bool(pairs & held)
            assert caption.endswith(f"on {shapes.with_article(background)} background")
            assert objects[0]["emoji"] in caption
            image = ex["image"]
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
            covered = np.zeros((32, 32), bool)
            for o in objects:
                x0, y0, x1, y1 = o["box"]
                covered[y0:y1, x0:x1] = True
                assert np.abs(image[y0:y1, x0:x1].astype(int) - shapes.COLORS[background]).max() > 60  # drawn
            np.testing.assert_array_equal(image[~covered], np.broadcast_to(shapes.COLORS[background],
                                                                           image[~covered].shape))
            if ex["template"] == "relation":
                assert shapes.relation_between(objects[0]["center"], objects[1]["center"]) == ex["relation"]
                assert f" {ex['relation']} " in caption
            elif ex["template"] == "size_position":
                assert caption.startswith(shapes.with_article(f"{objects[0]['size']} {objects[0]['emoji']}"))
                assert f"in the {objects[0]['position']}" in caption
    assert seen_held >= 15  # ~25% of validation is forced onto a held-out pair


def test_cli_builds_a_dataset_and_a_missing_font_is_one_line(tmp_path, capsys):
    assert main(["data", "emoji", "--out", str(tmp_path), "--num", "8", "--num-validation", "4", "--num-test", "0",
                 "--holdout", "penguin red,owl blue"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("dataset: ")
    train = open_split(path, "train")
    assert len(train) == 8 and len(open_split(path, "validation")) == 4
    spec = emoji.EmojiSpec(num_train=8, num_validation=4, num_test=0, holdout=(("penguin", "red"), ("owl", "blue")))
    for i in range(8):
        expected = emoji.render_example(spec, "train", int(train[i]["id"]), FONT)
        np.testing.assert_array_equal(train[i]["image"], expected["image"])
        assert caption_text(train[i]["caption"]) == expected["caption"]
        assert json.loads(caption_text(train[i]["objects_json"]))["background"] == expected["background"]


def test_missing_font_names_the_package(tmp_path, capsys):
    code = main(["data", "emoji", "--out", str(tmp_path), "--num", "2", "--font", str(tmp_path / "none.ttf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and emoji.FONT_PACKAGE in err[0] and "none.ttf" in err[0]
