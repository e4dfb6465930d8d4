"""The values behind ``--strategy`` and ``--preset``: each strategy's defaults, and the named recipes
of the classic transfer-learning tutorials (docs/recipes.md). Plain tables; ``config.resolve`` and
``config.apply_preset`` apply them."""

from __future__ import annotations

from typing import Any

# Per-strategy defaults, tuned on small datasets such as hymenoptera (docs/benchmarks.md).
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear-probe": {"epochs": 8, "lr": 3e-3, "backbone_lr_factor": 0.0},
    "finetune": {"epochs": 6, "lr": 1e-3, "backbone_lr_factor": 0.1},
    "gradual": {"epochs": 8, "lr": 2e-3, "backbone_lr_factor": 0.05},
    "scratch": {"epochs": 30, "lr": 1e-3, "backbone_lr_factor": 1.0},
}

# Named recipes of the classic transfer-learning tutorials (docs/recipes.md).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Keras: VGG16 without top, global average pooling, Dense(1024, relu), Dense(classes), Adam.
    "keras-vgg16": {
        "model": {"name": "torchvision:vgg16", "body": "conv", "head": "mlp", "head_hidden": 1024},
        "train": {"strategy": "linear-probe", "optimizer": "adam", "lr": 1e-3},
    },
    # PyTorch tutorial: ResNet-18, last layer replaced, SGD lr 1e-3 momentum 0.9 on all weights.
    "resnet18-sgd": {
        "model": {"name": "torchvision:resnet18"},
        "train": {"strategy": "finetune", "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9,
                  "backbone_lr_factor": 1.0, "weight_decay": 0.0, "epochs": 25},
    },
    # ResNet-50, last layer replaced, Adam.
    "resnet50-adam": {
        "model": {"name": "resnet50"},
        "train": {"strategy": "finetune", "optimizer": "adam", "lr": 1e-4, "backbone_lr_factor": 1.0,
                  "weight_decay": 0.0, "epochs": 5},
    },
    # Deep Learning with Python (Chollet, 1st edition, 5.3, feature extraction): VGG16's conv base frozen at
    # 150 px, Dense(256, relu), Dropout(0.5), Dense(classes), RMSprop lr 2e-5 (Keras: no momentum, no weight
    # decay), 30 epochs of batch 20. The book flattens the 4x4x512 feature map; the conv body pools it.
    "dlwp-vgg16": {
        "model": {"name": "torchvision:vgg16", "body": "conv", "head": "mlp", "head_hidden": 256, "dropout": 0.5,
                  "img_size": 150},
        "train": {"strategy": "linear-probe", "optimizer": "rmsprop", "lr": 2e-5, "momentum": 0.0,
                  "weight_decay": 0.0, "epochs": 30},
        "data": {"batch_size": 20},
    },
    # Baseline: a small CNN (three conv+pool blocks, two dense layers) trained from scratch.
    "small-cnn": {
        "model": {"name": "imgtune:small_cnn", "pretrained": False, "img_size": 128},
        "train": {"strategy": "scratch", "optimizer": "adam", "lr": 1e-3, "epochs": 30},
        "data": {"augment": "light"},
    },
}
