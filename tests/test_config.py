import pytest

from pipeline.config import ConfigError, RunConfig, load_config


def test_embedded_default_is_the_sa_v_recipe_on_tiny():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.model.name == "sam2.1_hiera_tiny" and cfg.executor == "local"
    assert cfg.prompt.points_per_side == 32 and cfg.prompt.min_mask_region_area == 100


def test_default_yaml_writes_out_every_default():
    assert load_config("configs/default.yaml") == RunConfig()


def test_overrides_parse_as_yaml_and_nest():
    cfg = load_config(None, ["prompt.points_per_side=16", "model.checkpoint=null", "decode.target_fps=6"])
    assert cfg.prompt.points_per_side == 16 and cfg.model.checkpoint is None and cfg.decode.target_fps == 6.0


def test_unknown_key_is_rejected_with_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["prompt.points_per_sid=16"])
    assert "prompt.points_per_sid" in str(e.value) and "prompt.points_per_side" in str(e.value)


def test_wrong_types_and_values_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["prompt.points_per_side=many"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(None, ["model.image_size=100"])
    with pytest.raises(ConfigError, match="known model"):
        load_config(None, ["model.name=sam3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
