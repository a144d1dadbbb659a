from __future__ import annotations

import numpy as np
import torch

from probe.data import ImageDataset
from probe.models.vit import ViT, ViTConfig, load_vit, save_vit
from probe.train import evaluate, train_vit


def test_loss_falls_and_checkpoint_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 48)
    x = rng.integers(0, 40, (48, 16, 16, 3), dtype=np.uint8)
    for c in range(3):
        x[y == c, :, :, c] = 220
    ds = ImageDataset(x, y, ["r", "g", "b"])
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=2, num_classes=3, attention="performer"))
    report = train_vit(model, ds, ds, epochs=5, batch_size=16, lr=3e-3, progress=False)
    assert np.mean(report.losses[-3:]) < np.mean(report.losses[:3]) * 0.5, report.losses
    save_vit(model, tmp_path / "c")
    back, _ = load_vit(tmp_path / "c")
    assert evaluate(back, ds) == evaluate(model, ds)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
