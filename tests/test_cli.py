"""The `dalle-jax` command as a user runs it (in-process through main(argv))."""

import json

import numpy as np
import pytest
from PIL import Image

from dalle_jax.cli import main


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for stage in ("data shapes", "data folder", "data show", "tokenizer train", "config", "train-dvae", "encode",
                  "reconstruct", "convert openai-dvae"):
        assert stage in text


def test_build_then_show_a_grid(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "data"), "--num", "40", "--num-validation", "16",
                 "--num-test", "0", "--image-size", "32", "--seed", "4"]) == 0
    out = tmp_path / "grid.png"
    assert main(["data", "show", str(tmp_path / "data"), "--split", "validation", "--num", "12", "--columns", "4",
                 "--out", str(out)]) == 0
    assert "12 of 16 validation examples" in capsys.readouterr().out
    grid = np.asarray(Image.open(out).convert("RGB"))
    # 3 rows x 4 columns of 64 px tiles (32 px at scale 2) plus captions and padding
    assert grid.shape[1] >= 4 * 64 and grid.shape[0] >= 3 * 64
    # the palette colours of the shapes made it into the picture
    assert (np.abs(grid.astype(int) - [255, 255, 255]).sum(-1) > 100).mean() > 0.01


def test_show_names_a_missing_dataset(tmp_path, capsys):
    assert main(["data", "show", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no prepared dataset" in capsys.readouterr().err


def test_config_prints_overrides_and_rejects_bad_ones(capsys):
    assert main(["config", "--preset", "quick", "--set", "dvae_train.batch_size=48"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dvae_train"]["batch_size"] == 48 and printed["name"] == "quick"
    assert main(["config", "--set", "dvae_train.batch_size=lots"]) == 2
    assert "dvae_train.batch_size" in capsys.readouterr().err


@pytest.mark.parametrize("override, allowed", [
    ("dvae.pooling=median", "'max' or 'avg'"),
    ("dvae.logits=cosine", "'linear' (released) or 'distance'"),
    ("prior.remat=some", "['dots', 'full', 'none']"),
    ("prior.attention=strided", "'sparse'"),
    ("prior.conv_kernel=4", "positive odd number"),
    ("clip.image_pool=max", "'map' or 'mean'"),
    ("clip.compute_dtype=float16", "float32 or bfloat16"),
    ("mesh.ici_parallelism=0,1,1", "positive or -1"),
    ("data.dataset=imagenet", "'shapes' or 'folder'"),
    ("text.pad_mode=global", "'per_position' or 'shared'"),
    ("dvae_train.temperature_schedule=step", "cosine or linear"),
    ("prior_train.lr_schedule=step", "plateau, cosine or constant"),
    ("clip_train.retrieval_batch=1", ">= 2"),
])
def test_a_bad_value_in_any_section_is_one_line_naming_the_field(override, allowed, capsys):
    """Every section's validation (model configs included) reaches the user as one line, exit 2, no traceback."""
    assert main(["config", "--preset", "demo", "--set", override]) == 2
    err = capsys.readouterr().err
    field = override.split("=")[0]
    assert err.count("\n") == 1 and err.startswith(f"error: {field}") and allowed in err, err
