"""Data: finding and checking labelled images, decoding them exactly, and feeding them to models.

The names below are imported on first use (PEP 562), so that importing a torch-free submodule
(``imgtune.data.decode``, ``imgtune.data.image_ref``) does not import torch through ``transforms``."""

from importlib import import_module

_WHERE = {"ALPHA_BACKGROUND": "decode", "DecodeError": "decode", "load_rgb": "decode", "probe": "decode",
          "ImageRef": "image_ref", "DataSplits": "scan", "Sample": "scan", "find_samples": "scan",
          "load_splits": "scan", "Preprocessing": "transforms", "eval_transform": "transforms",
          "train_transform": "transforms"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
