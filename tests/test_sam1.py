"""SAM 1 (segment-anything): checkpoints through the real resolution and loading code, and phase 1's masks
bit-identical to segment-anything's own generator with the same weights and settings.

A seeded random vit_b at 64 px (the real architecture: the file is ~360 MB, written once per module)."""
import dataclasses
import importlib
import inspect
import io
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, ModelConfig, PromptConfig, Sam1Config
from pipeline.stages import sam1 as s1
from pipeline.stages.models import RANDOM_WEIGHTS_KEY, CheckpointError, sha256_of
from pipeline.stages.prompt import amg_kwargs, prompts_from_records, select_records

SIZE = 64
SEED = 3
CPU = ModelConfig(device="cpu", threads=2, allow_download=False)
# Settings under test, given to segment-anything's generator by their own names (written out here, not
# derived from the code under test). Random weights score low and give masks with near-identical boxes, so
# nothing is filtered by score and box NMS is off (1.0): every frame then has dozens of records to compare
# (`test_generator_with_nms_is_bit_identical` covers NMS).
AMG = dict(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0,
           stability_score_offset=0.5, box_nms_thresh=1.0, min_mask_region_area=8)
PROMPT = PromptConfig(**AMG, min_area=600, max_objects=5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return s1.random_sam1_checkpoint(Sam1Config(seed=SEED, image_size=SIZE),
                                     tmp_path_factory.mktemp("sam1") / "vit_b_random.pth")


@pytest.fixture(scope="module")
def loaded(ckpt):
    return s1.load_sam1(Sam1Config(checkpoint=str(ckpt)), CPU)


def frames():
    """Two moving rectangles on a flat background; not square, so SAM's resize and padding are exercised."""
    out = []
    for t in range(3):
        f = np.full((48, 64, 3), 40, np.uint8)
        f[8 + t:24 + t, 10 + 2 * t:30 + 2 * t] = (220, 30, 30)
        f[28:44, 40 - 3 * t:60 - 3 * t] = (30, 200, 60)
        out.append(f)
    return out


def reference_sam(path):
    """segment-anything's own `_build_sam` (its source, with the 1024 literal set to SIZE) and the file's
    weights loaded by plain torch: nothing from pipeline/stages/sam1.py."""
    bs = importlib.import_module("segment_anything.build_sam")
    src = inspect.getsource(bs._build_sam)
    assert src.count("image_size = 1024") == 1
    namespace = dict(vars(bs))
    exec(src.replace("image_size = 1024", f"image_size = {SIZE}"), namespace)
    sam = namespace["_build_sam"](768, 12, 12, [2, 5, 8, 11])
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd.pop(RANDOM_WEIGHTS_KEY)
    sam.load_state_dict(sd)
    return sam


def test_random_checkpoint_loads_labelled_random(ckpt, loaded):
    assert loaded.random_weights and "RANDOM WEIGHTS" in loaded.label  # marked in the file, not the config
    assert loaded.image_size == SIZE and loaded.name == "vit_b" and loaded.checkpoint == str(ckpt)
    assert loaded.checkpoint_sha256 == sha256_of(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved[RANDOM_WEIGHTS_KEY] == {"seed": SEED, "image_size": SIZE, "name": "sam1_vit_b"}
    own = loaded.sam.state_dict()
    assert set(own) == set(saved) - {RANDOM_WEIGHTS_KEY}
    for name, tensor in own.items():
        assert torch.equal(tensor, saved[name]), name
    # the same seed without a file builds the same weights
    built = s1.load_sam1(Sam1Config(random_weights=True, seed=SEED, image_size=SIZE), CPU)
    assert built.random_weights and built.checkpoint is None
    assert all(torch.equal(t, own[k]) for k, t in built.sam.state_dict().items())


def test_builder_is_segment_anythings_at_1024():
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    theirs = sam_model_registry["vit_b"]()
    ours = s1._build_sam(s1.SAM1_SPECS["vit_b"], 1024)
    assert repr(ours) == repr(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_offline_without_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(CheckpointError) as e:
        s1.load_sam1(Sam1Config(name="vit_h"), ModelConfig(cache_dir=str(tmp_path), allow_download=False))
    msg = str(e.value)
    assert "curl -L -o sam_vit_h_4b8939.pth https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in msg
    assert str(tmp_path / "sam_vit_h_4b8939.pth") in msg and "sam1.checkpoint=" in msg
    assert "model.allow_download=false" in msg


def test_download_failure_leaves_nothing(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(CheckpointError, match="offline"):
        s1.load_sam1(Sam1Config(name="vit_l"), ModelConfig(cache_dir=str(tmp_path)))
    assert not list(tmp_path.iterdir())


def test_download_that_is_not_the_official_file_is_refused(tmp_path, monkeypatch):
    class Response(io.BytesIO):
        headers = {"Content-Length": "9"}

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Response(b"not a pth"))
    with pytest.raises(CheckpointError, match="not the official ec2df627"):
        s1.load_sam1(Sam1Config(), ModelConfig(cache_dir=str(tmp_path)))
    assert not list(tmp_path.iterdir()), "the wrong file must not stay in the cache"


def test_cached_file_checks(tmp_path):
    cached = tmp_path / "sam_vit_b_01ec64.pth"
    cached.write_bytes(b"a replaced file")
    cfg = ModelConfig(cache_dir=str(tmp_path), allow_download=False)
    with pytest.raises(CheckpointError, match="not the official"):  # no sidecar: the official digest decides
        s1.load_sam1(Sam1Config(), cfg)
    (tmp_path / "sam_vit_b_01ec64.pth.sha256").write_text("0" * 64 + "\n")
    with pytest.raises(CheckpointError, match="recorded sha256"):
        s1.load_sam1(Sam1Config(), cfg)


def test_corrupt_or_wrong_files_are_refused(tmp_path, ckpt):
    cut = tmp_path / "cut.pth"
    with open(ckpt, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(CheckpointError, match="truncated"):
        s1.load_sam1(Sam1Config(checkpoint=str(cut)), CPU)
    with pytest.raises(CheckpointError, match="does not exist"):
        s1.load_sam1(Sam1Config(checkpoint=str(tmp_path / "nope.pth")), CPU)
    with pytest.raises(CheckpointError, match="does not fit sam1.name=vit_l"):
        s1.load_sam1(Sam1Config(name="vit_l", checkpoint=str(ckpt)), CPU)
    with pytest.raises(CheckpointError, match="is a 64 px model"):
        s1.load_sam1(Sam1Config(checkpoint=str(ckpt), image_size=128), CPU)
    sam2_like = tmp_path / "sam2.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, sam2_like)
    with pytest.raises(CheckpointError, match="segment-anything checkpoint"):
        s1.load_sam1(Sam1Config(checkpoint=str(sam2_like)), CPU)


def test_settings_sam1_lacks_are_refused_not_ignored():
    kwargs = s1.sam1_amg_kwargs(PROMPT)
    assert set(kwargs) == set(AMG) | {"crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio",
                                      "crop_n_points_downscale_factor"}
    assert all(kwargs[k] == v for k, v in AMG.items())
    assert set(amg_kwargs(PROMPT)) - set(kwargs) == {"mask_threshold", "use_m2m", "multimask_output"}
    for key, value in [("mask_threshold", 0.5), ("use_m2m", True), ("multimask_output", False)]:
        with pytest.raises(ConfigError, match=f"prompt.{key}="):
            s1.sam1_amg_kwargs(PromptConfig(**{key: value}))


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        assert ra["segmentation"].dtype == rb["segmentation"].dtype == bool
        assert np.array_equal(ra["segmentation"], rb["segmentation"])
        for key in ("area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"):
            assert ra[key] == rb[key], key


@pytest.fixture(scope="module")
def reference(ckpt):
    return reference_sam(ckpt)


def test_generator_is_bit_identical_to_segment_anythings(loaded, reference):
    from segment_anything import SamAutomaticMaskGenerator

    ours = s1.make_sam1_generator(loaded, PROMPT)
    theirs = SamAutomaticMaskGenerator(reference, **AMG)
    seen = set()
    for t, rgb in enumerate(frames()):
        a, b = ours.generate(rgb), theirs.generate(rgb)
        assert len(b) > 10, t
        assert_same_records(a, b)
        seen |= {r["segmentation"].tobytes() for r in a}
        prompts = s1.sam1_prompts(ours, rgb, PROMPT, frame=t)
        expected = prompts_from_records(select_records(b, PROMPT), t)
        assert 0 < len(prompts) == len(expected) <= PROMPT.max_objects
        for p, q in zip(prompts, expected):
            assert p.source == "sam1" and p.frame == t and np.array_equal(p.mask, q.mask)
            assert (p.object_id, p.point, p.predicted_iou, p.stability_score, p.area, p.bbox) == \
                   (q.object_id, q.point, q.predicted_iou, q.stability_score, q.area, q.bbox)
    assert len(seen) > 10  # masks differ between records and frames: the comparison is not of one constant


def test_generator_with_nms_is_bit_identical(loaded, reference):
    from segment_anything import SamAutomaticMaskGenerator

    settings = {**AMG, "box_nms_thresh": 0.7}
    ours = s1.make_sam1_generator(loaded, dataclasses.replace(PROMPT, **settings))
    a, b = ours.generate(frames()[1]), SamAutomaticMaskGenerator(reference, **settings).generate(frames()[1])
    assert 0 < len(b) < 4 * 4 * 3  # NMS removed some
    assert_same_records(a, b)


def test_sam1_records_wants_rgb_uint8(loaded):
    with pytest.raises(TypeError, match="RGB uint8"):
        s1.sam1_records(s1.make_sam1_generator(loaded, PROMPT), np.zeros((8, 8), np.uint8), PROMPT)


def test_random_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        s1.random_sam1_checkpoint(Sam1Config(image_size=SIZE), tmp_path / "x.pth")
    assert not list(tmp_path.iterdir())
