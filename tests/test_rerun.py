"""A mistaken rerun never damages a run: a stage trained with one config refuses another before writing anything,
while extending a run (more steps, other log/save intervals) resumes it."""

import hashlib
from pathlib import Path

import pytest

from dalle_jax import config as config_lib
from dalle_jax.cli import main
from dalle_jax.errors import ConfigError
from dalle_jax.train.stage import check_rerun


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_mismatched_dvae_rerun_leaves_every_file_byte_identical(tmp_path, capsys):
    run = tmp_path / "run"
    short = ["--set", "dvae_train.steps=2", "--set", "dvae_train.save_every=2", "--set", "dvae_train.eval_every=2"]
    assert main(["train-dvae", "--run", str(run), "--preset", "quick", *short]) == 0
    before = _snapshot(tmp_path)
    capsys.readouterr()
    # forgot --preset (the demo's sizes), and another model width with the right preset
    for mistake in ([], ["--preset", "quick", "--set", "dvae.n_hid=32", *short]):
        assert main(["train-dvae", "--run", str(run), *mistake]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "you asked" in err and "nothing was changed" in err
        assert _snapshot(tmp_path) == before
    assert "dvae.n_hid=16, you asked 32" in err
    # extending the run is a resume, not a mistake
    assert main(["train-dvae", "--run", str(run), "--preset", "quick", "--set", "dvae_train.steps=4",
                 "--set", "dvae_train.save_every=2", "--set", "dvae_train.eval_every=2"]) == 0
    assert (run / "dvae" / "checkpoints" / "4").is_dir()


@pytest.mark.parametrize("stage, override, allowed", [
    ("prior", "prior.d_model=128", False),
    ("prior", "prior_train.learning_rate=0.5", False),
    ("prior", "text.text_len=32", False),
    ("prior", "prior_train.steps=99", True),
    ("clip", "clip.embed_dim=64", False),
    ("clip", "clip_train.save_every=7", True),
    ("clip", "mesh.ici_parallelism=2,2,2", True),  # restores reshard onto another mesh
    ("clip", "prior.d_model=128", True),  # another stage's section
])
def test_check_rerun_names_the_changed_field(tmp_path, stage, override, allowed):
    saved = config_lib.get_preset("quick")
    config_lib.save_config(saved, tmp_path / stage / "config.json")
    asked = config_lib.resolve("quick", [override])
    if allowed:
        check_rerun(asked, tmp_path, stage)
    else:
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.") + "="):
            check_rerun(asked, tmp_path, stage)
    check_rerun(asked, tmp_path / "elsewhere", stage)  # a new run directory: nothing to compare
