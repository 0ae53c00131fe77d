"""Device detection (CPU, whole GPU, MIG slice) and the work-sizing rule, against the memory of every cluster
profile. The expected figures follow from the rule in `size_work`'s docstring and the constants of
pipeline/device.py; each case says how."""
from __future__ import annotations

import types

import pytest
import torch

from pipeline import device as dev
from pipeline.config import MODEL_NAMES, PROFILES_DIR, load_config
from pipeline.device import DeviceInfo, GiB, detect_device, is_mig, size_work, visible_devices

TINY, SMALL, BASE, LARGE = MODEL_NAMES


def test_facts_behind_the_rule():
    # Published parameter counts (38.9M, 46M, 80.8M, 224.4M), to the counted digits.
    assert [round(dev.MODEL_PARAMS[m] / 1e6, 1) for m in MODEL_NAMES] == [39.0, 46.1, 80.9, 224.4]
    assert dev.frame_bytes(1024) == 12 * 1024**2  # float32 (3, 1024, 1024)
    assert dev.state_bytes_per_object_frame(1024) == 787_456
    # The features sam2 keeps per frame: FPN 32x256^2 + 64x128^2 + 256x64^2, vision features 256x64^2, and a
    # 256-channel position encoding per level, float32.
    values = 32 * 256**2 + 64 * 128**2 + 256 * 64**2 + 256 * 64**2 + 256 * (256**2 + 128**2 + 64**2)
    assert dev.FEATURE_BYTES_1024 == 4 * values
    # Model cost: weights + encoder peak, scaling with the square of the image size.
    assert dev.model_bytes(LARGE, 1024) == 897_786_568 + 415_236_096
    assert dev.model_bytes(TINY, 512) == 155_849_992 + 297_271_808 // 4


# memory -> (object batch for tiny, object batch for large). With usable = memory - 1 GiB and
# free = usable - model_bytes, the batch is floor(0.5 * free / (160 * 1024**2)), capped at 64:
# 10 GB: (10e9 - 2**30 - 453,121,800) / 2 / 167,772,160 = 25.25 -> 25; large (1,313,022,664): 22.69 -> 22.
CASES_1024 = {
    10e9: (25, 22),
    12e9: (31, 28),
    40e9: (64, 64),
    80e9: (64, 64),
}


@pytest.mark.parametrize("memory", sorted(CASES_1024), ids=lambda m: f"{m / 1e9:.0f}GB")
def test_gpu_sizing_at_1024(memory):
    tiny_batch, large_batch = CASES_1024[memory]
    tiny = size_work(int(memory), TINY, None)
    large = size_work(int(memory), LARGE, 1024)
    assert tiny.image_size == 1024
    assert (tiny.object_batch, large.object_batch) == (tiny_batch, large_batch)
    # Every SAM 2.1 model fits from 10 GB up: inference holds weights and one frame's activations only
    # (1.2 GiB for large at 1024); what memory buys is objects per step.
    assert large.model_fits and large.largest_model == LARGE and large.refusal() is None
    # 5% of free over 12 MiB frames is far above the cap of 8.
    assert large.frames_ahead == 8
    # 64 objects x 16 frames x 787,456 B = 0.75 GiB of state: under a quarter of free from 10 GB up.
    assert not large.offload_state


@pytest.mark.parametrize("profile", sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
def test_each_profile_memory_runs_every_model(profile):
    cfg = load_config(profile=profile)
    gb = cfg.slurm.gpu_memory_gb
    if gb is None:  # CPU profiles: sized by host memory at run time
        assert cfg.model.device == "cpu"
        return
    assert gb * 1e9 in CASES_1024
    for model in MODEL_NAMES:
        assert size_work(int(gb * 1e9), model, 1024).model_fits, (profile, model)
    batches = (size_work(int(gb * 1e9), TINY, 1024).object_batch, size_work(int(gb * 1e9), LARGE, 1024).object_batch)
    assert batches == CASES_1024[gb * 1e9]


def test_object_batch_grows_with_memory_and_shrinks_with_model_and_image_size():
    batches = [size_work(int(gb * 1e9), BASE, 1024).object_batch for gb in (6, 10, 12, 24, 40)]
    assert batches == sorted(batches) and batches[0] < batches[-1]
    assert size_work(int(10e9), LARGE, 1024).object_batch < size_work(int(10e9), TINY, 1024).object_batch
    assert size_work(int(10e9), TINY, 512).object_batch == 64  # 4x fewer pixels per object


def test_cpu_sizing():
    cpu = size_work(16 * GiB, LARGE, None, kind="cpu")
    assert (cpu.object_batch, cpu.frames_ahead, cpu.offload_state) == (1, 2, False)
    assert cpu.model_fits and cpu.largest_model == LARGE


def test_offload_when_many_objects_on_a_small_slice():
    # 256 objects x 16 x 787,456 B = 3.0 GiB > a quarter of the 7.1 GiB left by large on 10 GB.
    assert size_work(int(10e9), LARGE, 1024, max_objects=256).offload_state
    assert not size_work(int(80e9), LARGE, 1024, max_objects=256).offload_state


def test_a_model_too_big_is_refused_with_the_way_out():
    # 2.2 GB: usable = 2.2e9 - 2**30 = 1,126,258,176 B, half of it 563 MB: small (481.5 MB) fits, base+ (646.4 MB)
    # and large (1,313 MB) do not.
    sizing = size_work(int(2.2e9), LARGE, 1024)
    assert not sizing.model_fits and sizing.largest_model == SMALL
    text = sizing.refusal()
    assert "sam2.1_hiera_large" in text and "largest that fits is sam2.1_hiera_small" in text
    assert "new run with a smaller model.name" in text
    assert size_work(int(1e9), TINY, 1024).largest_model is None


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="not a SAM 2.1 model"):
        size_work(int(10e9), "sam2_hiera_huge", 1024)


# --- detection -------------------------------------------------------------------------------------------------

def test_visible_devices_and_mig_names():
    assert visible_devices({}) is None
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "0,1"}) == ["0", "1"]
    mig = "MIG-2f5c1a4e-8a43-5e8b-9c5e-0e6f0b7d2a11"
    assert visible_devices({"CUDA_VISIBLE_DEVICES": mig}) == [mig]
    assert is_mig(mig) and is_mig("MIG-GPU-5e7c/1/0")
    assert is_mig("0", "NVIDIA A100-SXM4-80GB MIG 1g.10gb")
    assert not is_mig("0", "NVIDIA H100 80GB HBM3") and not is_mig(None)


def test_without_cuda_the_device_is_the_cpu():
    # As on the local test cluster: SLURM hands the job a (fake) GPU index, but CUDA cannot open it.
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    info = detect_device({"CUDA_VISIBLE_DEVICES": "0"})
    assert info.kind == "cpu" and info.torch_device == "cpu"
    assert info.memory_bytes > 0


def _fake_cuda(monkeypatch, name: str, memory: int, uuid: str):
    props = types.SimpleNamespace(name=name, total_memory=memory, uuid=uuid)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)


def test_a_mig_slice_is_detected_by_its_uuid(monkeypatch):
    mig = "MIG-2f5c1a4e-8a43-5e8b-9c5e-0e6f0b7d2a11"
    _fake_cuda(monkeypatch, "NVIDIA A100-SXM4-80GB MIG 1g.10gb", 9_938_665_472, "2f5c1a4e")
    info = detect_device({"CUDA_VISIBLE_DEVICES": mig})
    assert info == DeviceInfo("mig", "NVIDIA A100-SXM4-80GB MIG 1g.10gb", 9_938_665_472, uuid=mig, index=0)
    assert info.torch_device == "cuda:0"
    sizing = dev.size_for_device(info, LARGE, 1024)
    assert sizing.model_fits and sizing.object_batch == 22


def test_a_whole_gpu_reports_its_uuid(monkeypatch):
    _fake_cuda(monkeypatch, "NVIDIA H100 80GB HBM3", 85_045_559_296, "8c1e0b51-aaaa-bbbb-cccc-0123456789ab")
    info = detect_device({"CUDA_VISIBLE_DEVICES": "3"})
    assert info.kind == "gpu" and info.uuid == "GPU-8c1e0b51-aaaa-bbbb-cccc-0123456789ab" and info.index == 0
    assert "gpu NVIDIA H100 80GB HBM3" in info.describe()


@pytest.mark.parametrize("setting, sized, expected", [(None, True, True), (None, False, False),
                                                      (False, True, False), (True, False, True)])
def test_the_worker_offloads_the_state_when_the_sizing_or_the_config_says_so(setting, sized, expected):
    from pipeline.worker import Models

    cfg = load_config(overrides=[f"propagate.offload_state={'null' if setting is None else str(setting).lower()}"])
    models = Models(cfg)
    models.sizing = size_work(int(10e9), LARGE, 1024, max_objects=256 if sized else 8)
    assert models.sizing.offload_state is sized
    assert models.track_options().offload_state is expected


# --- one item: the AMG's and the upsampling's memory grow with the video's resolution -------------------------

UHD = (2304, 4096)  # height, width: 4K as decode.max_side=4096 leaves it


def test_the_item_costs_that_grow_with_resolution():
    # 64 points' masks at 4K: 16 B x 64 x 9,437,184 px = 9.0 GiB; one object's upsampling: 5 B x 9,437,184.
    assert dev.amg_bytes(64, *UHD) == 16 * 64 * 4096 * 2304
    assert dev.object_bytes(1024, *UHD) == 160 * 1024**2 + 5 * 4096 * 2304


def test_a_4k_item_on_a_10gb_slice_is_refused_with_what_would_fit():
    sizing = size_work(int(10e9), TINY, 1024)
    with pytest.raises(dev.ItemTooLargeError) as e:
        dev.size_item(sizing, "clip_4k", *UHD, points_per_batch=64)
    assert isinstance(e.value, ValueError)  # the worker records it as the item's failure
    text = str(e.value)
    # free = 10e9 - 2**30 - 453,121,800 = 8,473,136,376 B; the AMG fits while 16 x ppb x 9,437,184 <= free: 56.
    assert "item clip_4k (4096x2304)" in text and "prompt.points_per_batch=56" in text
    assert "mig-1g.12gb" in text and "mig-3g.40gb" in text and "mig-1g.10gb" not in text
    assert "decode.max_side=" in text and "GiB" in text
    assert dev.size_item(sizing, "clip_4k", *UHD, points_per_batch=56).object_batch >= 1
    # the same item fits on 12 GB, with fewer objects per step than the model input alone would allow
    twelve = size_work(int(12e9), TINY, 1024)
    assert dev.size_item(twelve, "clip_4k", *UHD, 64).object_batch < twelve.object_batch


def test_the_object_batch_leaves_room_for_the_upsampling():
    sizing = size_work(int(10e9), TINY, 1024)
    # half of free / (160 x 1024^2 + 5 x pixels): 720p 24, 1080p 23, 4K (with a smaller AMG batch) 19
    got = [dev.size_item(sizing, "x", h, w, 32).object_batch for h, w in ((720, 1280), (1080, 1920), UHD)]
    assert got == [24, 23, 19] and sizing.object_batch == 25
    assert dev.size_item(size_work(int(80e9), TINY, 1024), "x", *UHD, 64).object_batch == 64


def test_even_one_object_too_many_is_refused():
    sizing = size_work(int(4e9), LARGE, 1024)  # model fits (1.3 GB <= half of 2.9 GB usable)
    assert sizing.model_fits
    with pytest.raises(dev.ItemTooLargeError, match="even one object at a time"):
        dev.size_item(sizing, "huge", 20000, 20000, 1)


def test_gpu_memory_gb_sizes_when_the_device_cannot_be_asked_and_caps_it_otherwise():
    gpu80 = DeviceInfo("gpu", "NVIDIA A100-SXM4-80GB", 85_899_345_920, index=0)
    assert dev.memory_for(gpu80, None) == 85_899_345_920
    assert dev.memory_for(gpu80, 40) == 40 * 10**9  # "set 40 for 40 GB cards": the smaller wins
    assert dev.memory_for(DeviceInfo("mig", "x MIG 1g.10gb", 9_938_665_472, index=0), 12) == 9_938_665_472
    assert dev.memory_for(None, 10) == 10 * 10**9
    with pytest.raises(ValueError, match="slurm.gpu_memory_gb"):
        dev.memory_for(None, None)
    assert dev.memory_for(DeviceInfo("cpu", "cpu", 8 * GiB), 10) == 8 * GiB  # a GPU's figure, not the host's
    assert dev.size_for_device(gpu80, TINY, 1024, gpu_memory_gb=10).object_batch == 25


def test_the_worker_reads_gpu_memory_gb_and_sizes_each_item(monkeypatch):
    from pipeline.worker import Models

    _fake_cuda(monkeypatch, "NVIDIA A100-SXM4-80GB", 85_899_345_920, "8c1e0b51")
    cfg = load_config(profile="mig-1g.10gb", overrides=["executor=local"])
    models = Models(cfg)
    models._model = types.SimpleNamespace(device=torch.device("cuda"), image_size=1024, label="fake")

    def sized_model():  # Models.model's sizing, without loading a model
        models._model, model = None, models._model
        monkeypatch.setattr("pipeline.worker.load_model", lambda cfg: model)
        return models.model

    sized_model()
    assert models.sizing.memory_bytes == 10 * 10**9 and models.sizing.object_batch == 25
    assert models.track_options("a", 720, 1280).object_batch == 24
    with pytest.raises(dev.ItemTooLargeError, match="item b "):
        models.track_options("b", *UHD)
    monkeypatch.setattr(dev, "detect_device", lambda: (_ for _ in ()).throw(RuntimeError("NVML gone")))
    monkeypatch.setattr("pipeline.worker.detect_device", dev.detect_device)
    sized_model()
    assert models.sizing.memory_bytes == 10 * 10**9


def test_the_readme_table_is_the_codes_output():
    import re
    import subprocess
    import sys
    from pathlib import Path

    printed = subprocess.run([sys.executable, "-m", "pipeline.device"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert printed == dev.sizing_table()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- sizing-table: python -m pipeline.device -->\n(.*?)\n<!-- /sizing-table -->", readme,
                      re.S)
    assert block, "README.md lost the sizing table's markers"
    assert block.group(1).strip() == printed
