"""The papers' transfer-learning recipes as presets: `--preset transfer-adam` and
`--preset transfer-sgd`, EASIER Table 4's rows beyond CIFAR-10 and Tiny-ImageNet-200.

The values here are the data, model and training settings (every training of a run, as
`depthcut.experiment.EXPERIMENT_PRESETS`); each method adds its own for the same preset names
(stages per run, finetune epochs = the epochs here, see `depthcut.stages.FINETUNE_PRESETS`).
Both rows use the same numbers for ResNet-18, Swin-T, MobileNetV2 and VGG-16, so, unlike the
paper preset, the learning rate does not depend on the model. The paper starts the
Flowers-102/DTD/Aircraft models from ImageNet weights: pass them with `--dense-checkpoint`.
"""

from __future__ import annotations

TRANSFER_PRESETS: dict[str, dict] = {
    # EASIER Table 4, rows Flowers-102, DTD and Aircraft (every model): 50 epochs, batch 16,
    # Adam, lr 1e-4, no milestones (a constant rate), weight decay 0.
    "transfer-adam": {
        "width": 1.0,
        "epochs": 50,
        "batch_size": 16,
        "optimizer": "adam",
        "lr": 1e-4,
        "schedule": "constant",
        "milestones": [],
        "weight_decay": 0.0,
        "decay_norm_and_bias": True,
        "nesterov": False,
    },
    # EASIER Table 4, rows PACS and VLCS (every model): 30 epochs, batch 16, SGD momentum 0.9,
    # lr 1e-3, milestone [24], drop factor 0.1, weight decay 5e-4 (on every parameter, as the
    # paper preset: the authors' code).
    "transfer-sgd": {
        "width": 1.0,
        "epochs": 30,
        "batch_size": 16,
        "optimizer": "sgd",
        "lr": 1e-3,
        "momentum": 0.9,
        "schedule": "multistep",
        "milestones": [24],
        "gamma": 0.1,
        "weight_decay": 5e-4,
        "decay_norm_and_bias": True,
        "nesterov": False,
    },
}
