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
