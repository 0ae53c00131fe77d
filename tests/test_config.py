import math
import typing
from pathlib import Path

import pytest

from pipeline.config import (PROFILES_DIR, ConfigError, Range, RunConfig, check_ranges, config_from_dict,
                             config_to_dict, field_range, load_config, numeric_fields)


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


# --- ranges: every numeric key, found by walking the dataclasses, so a new key is covered without editing this --

NUMERIC_KEYS = list(numeric_fields())


def _bad_values(valid: Range, tp) -> list:
    """Values just outside the key's range (integers for int keys), and NaN/infinities for float keys."""
    is_float = float in (typing.get_args(tp) or (tp,))
    step = 0.001 if is_float else 1
    bad = []
    if valid.lo is not None:
        bad.append(valid.lo if valid.open_lo else valid.lo - step)
        bad.append(valid.lo - 1000)
    if valid.hi is not None:
        bad.append(valid.hi + step)
    if is_float:
        bad += [math.nan, math.inf, -math.inf]
    return bad


def _yaml(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return repr(value)


def test_the_walk_finds_the_keys_issue_8_names():
    keys = {key for key, _, _ in NUMERIC_KEYS}
    assert {"propagate.prefetch", "propagate.object_batch", "prompt.points_per_batch", "prompt.pred_iou_thresh",
            "slurm.gpu_memory_gb", "retries", "store.level"} <= keys
    assert len(keys) >= 35


@pytest.mark.parametrize("key, fld, tp", NUMERIC_KEYS, ids=[k for k, _, _ in NUMERIC_KEYS])
def test_every_numeric_key_declares_a_range_and_refuses_values_outside_it(key, fld, tp):
    valid = field_range(fld)
    assert valid is not None, f"{key} has no declared range: declare it with ranged(default, lo, hi)"
    bad = _bad_values(valid, tp)
    assert bad, f"{key}: an integer key needs at least one bound"
    for value in bad:
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={_yaml(value)}"])
        message = str(e.value)
        assert "\n" not in message
        assert message.startswith(f"{key}=") and "out of range" in message and valid.describe() in message, message
    # The bounds themselves are valid (the edge of the range is in it), and so is the default.
    edges = [b for b in (None if valid.open_lo else valid.lo, valid.hi) if b is not None]
    is_int = int in (typing.get_args(tp) or (tp,))
    for value in edges:
        value = int(value) if is_int else float(value)
        extra = {"store.level": ["store.compressor=zstd"],  # blosc stops at 9 (below)
                 "qa.tiny_area": ["qa.huge_area=1"], "qa.huge_area": ["qa.tiny_area=0"],
                 "prompt.hotstart_frames": ["prompt.hotstart_min=1"]}.get(key, [])
        load_config(None, [f"{key}={value}", *extra])


def test_rules_that_are_not_ranges():
    with pytest.raises(ConfigError, match=r"store.level=10 is out of range for store.compressor=blosc-zstd"):
        load_config(None, ["store.level=10"])
    assert load_config(None, ["store.level=10", "store.compressor=zstd"]).store.level == 10
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(None, ["model.image_size=100"])


def test_bad_values_in_a_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("propagate:\n  prefetch: 0\n")
    with pytest.raises(ConfigError, match=r"propagate.prefetch=0 is out of range: valid range is >= 1 \(in .*bad.yaml\)"):
        load_config(bad)


def test_a_run_json_with_a_bad_value_is_refused_too():
    data = config_to_dict(RunConfig())
    data["prompt"]["points_per_batch"] = 0
    with pytest.raises(ConfigError, match="prompt.points_per_batch=0"):
        config_from_dict(data)


CONFIG_FILES = sorted(Path("configs").glob("*.yaml")) + sorted(PROFILES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p))
def test_every_shipped_config_and_profile_loads(path):
    if path.parent == PROFILES_DIR:
        cfg = load_config(profile=path.stem)
        assert load_config("configs/random-demo.yaml", profile=path.stem).model.random_weights
    else:
        cfg = load_config(path)
    check_ranges(cfg)
