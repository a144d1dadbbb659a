from __future__ import annotations

import numpy as np
import torch

from probe import registry
from probe.data import ImageDataset
from probe.train import evaluate_classifier, train_classifier


def test_loss_falls_and_checkpoint_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 48)
    x = rng.integers(0, 40, (48, 16, 16, 3), dtype=np.uint8)
    for c in range(3):
        x[y == c, :, :, c] = 220
    ds = ImageDataset(x, y, ["r", "g", "b"])
    config = {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "num_classes": 3}
    model = registry.load_model("vit-performer", weights="random", seed=0, config=config)
    report = train_classifier(model, ds, ds, epochs=5, batch_size=16, lr=3e-3, progress=False)
    assert np.mean(report.losses[-3:]) < np.mean(report.losses[:3]) * 0.5, report.losses
    model.save(tmp_path / "c")
    back = registry.load_model("vit-performer", weights=str(tmp_path / "c"))
    assert evaluate_classifier(back, ds) == evaluate_classifier(model, ds)
    for k, v in model.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v)
