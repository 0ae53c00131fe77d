"""Checkpoint resolution and verification through the real sam2 loading code."""
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.stages.models import CheckpointError, load_model, patched_method, resolve_checkpoint, sha256_of


def test_random_checkpoint_loads_through_the_real_loader(random_checkpoint):
    loaded = load_model(ModelConfig(checkpoint=random_checkpoint, random_weights=True, image_size=256, device="cpu"))
    assert loaded.image_size == 256 and loaded.random_weights
    assert "RANDOM WEIGHTS" in loaded.label
    assert loaded.checkpoint_sha256 == sha256_of(__import__("pathlib").Path(random_checkpoint))
    saved = torch.load(random_checkpoint, map_location="cpu", weights_only=True)["model"]
    for name, tensor in loaded.predictor.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_offline_without_checkpoint_fails_before_work_with_instructions(tmp_path):
    cfg = ModelConfig(cache_dir=str(tmp_path), allow_download=False)
    with pytest.raises(CheckpointError) as e:
        load_model(cfg)
    msg = str(e.value)
    assert "sam2.1_hiera_tiny.pt" in msg and "curl -L -o" in msg and str(tmp_path) in msg


def test_download_failure_names_the_fix(tmp_path, monkeypatch):
    import urllib.request

    def refuse(*a, **k):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(CheckpointError, match="offline"):
        resolve_checkpoint(ModelConfig(name="sam2.1_hiera_large", cache_dir=str(tmp_path)))
    assert not list(tmp_path.iterdir()), "no partial file may be left in the cache"


def test_corrupt_cached_checkpoint_is_refused(tmp_path):
    f = tmp_path / "sam2.1_hiera_small.pt"
    f.write_bytes(b"not the file")
    (tmp_path / "sam2.1_hiera_small.pt.sha256").write_text("0" * 64 + "\n")
    with pytest.raises(CheckpointError, match="recorded sha256"):
        resolve_checkpoint(ModelConfig(name="sam2.1_hiera_small", cache_dir=str(tmp_path)))


def test_checkpoint_of_another_model_is_refused(random_checkpoint):
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(ModelConfig(name="sam2.1_hiera_small", checkpoint=random_checkpoint, image_size=256, device="cpu"))


def test_missing_explicit_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(ModelConfig(checkpoint=str(tmp_path / "nope.pt")))


def test_truncated_checkpoint_is_named(tmp_path, random_checkpoint):
    data = open(random_checkpoint, "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(ModelConfig(checkpoint=str(cut), image_size=256, device="cpu"))


def test_patched_method_puts_back_what_the_instance_held():
    class Model:
        def forward(self, x):
            return x + 1

    m = Model()
    with patched_method(m, "forward", lambda own: lambda x: own(x) * 10):
        assert m.forward(1) == 20
    assert m.forward(1) == 2 and "forward" not in vars(m)  # the class's method again
    m.forward = lambda x: -x  # a wrapper already on the instance (a profiler's)
    with patched_method(m, "forward", lambda own: lambda x: own(x) * 10):
        assert m.forward(1) == -10
        with pytest.raises(KeyError):
            with patched_method(m, "forward", lambda own: lambda x: {}[x]):
                m.forward(1)
        assert m.forward(1) == -10  # restored after the error
    assert m.forward(1) == -1
