import dataclasses
import json

import pytest

from dalle_jax import config as config_lib
from dalle_jax.config import ConfigError


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_every_preset_loads_and_round_trips_through_json(name, tmp_path):
    cfg = config_lib.get_preset(name)
    path = tmp_path / "config.json"
    config_lib.save_config(cfg, path)
    assert config_lib.load_config(path) == cfg
    assert json.loads(path.read_text())["name"] == name


def test_overrides_parse_by_field_type():
    cfg = config_lib.resolve("demo", [
        "dvae_train.batch_size=64", "dvae.compute_dtype=bfloat16", "text.bpe_dropout=0.25",
        "mesh.ici_parallelism=2,2,-1", 'mesh.rules=[["batch", ["data"]], ["embed", null]]',
        "data.holdout=red square",
    ])
    assert cfg.dvae_train.batch_size == 64 and isinstance(cfg.dvae_train.batch_size, int)
    assert cfg.dvae.compute_dtype == "bfloat16"
    assert cfg.text.bpe_dropout == 0.25
    assert cfg.mesh.ici_parallelism == (2, 2, -1)
    assert cfg.mesh.rules == (("batch", ("data",)), ("embed", None))
    assert cfg.data.holdout == "red square"
    # untouched fields keep the preset's values
    assert cfg.data.image_size == config_lib.get_preset("demo").data.image_size


@pytest.mark.parametrize("override, fragment", [
    ("dvae_train.batch_size=abc", "dvae_train.batch_size"),
    ("dvae_train.nope=1", "no field 'nope'"),
    ("nosection.x=1", "no field 'nosection'"),
    ("dvae_train.batch_size", "section.field=value"),
    ("text.pad_mode=global", "per_position"),
    ("mesh.ici_parallelism=1,2", "3 entries"),
    ("mesh.ici_parallelism=-1,-1,1", "at most one -1"),
    ('mesh.rules=[["batch", ["pipeline"]]]', "unknown mesh axis 'pipeline'"),
    ("dvae_train.likelihood=l1", "likelihood"),
    ("data.grid=0", "data.grid=0 must be in"),
])
def test_bad_overrides_name_the_field(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        config_lib.resolve("demo", [override])


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="paper_12b"):
        config_lib.get_preset("nope")


def test_load_config_rejects_unknown_fields(tmp_path):
    data = config_lib.to_dict(config_lib.get_preset("quick"))
    data["dvae_train"]["learning_rat"] = 1.0
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="learning_rat"):
        config_lib.load_config(path)


def test_configs_are_frozen():
    cfg = config_lib.get_preset("demo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dvae_train.batch_size = 3
