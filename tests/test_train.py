from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probe import registry
from probe.data import ImageDataset
from probe.train import DEFAULT_CLIP, DEFAULT_WARMUP, evaluate_classifier, fit, train_classifier


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


def _lr_formula(step: int, steps: int, warmup: int, lr: float) -> float:
    """The schedule `fit` documents: linear warm-up over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


@pytest.mark.parametrize("warmup", [0, 1, 5])
def test_learning_rate_per_step_follows_warmup_then_cosine(warmup):
    """With a constant gradient and no weight decay, AdamW moves a weight by exactly the step's
    learning rate (m_hat / sqrt(v_hat) = 1), so the weight's path reads off the schedule."""
    steps, lr = 20, 0.1
    w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    seen: list[float] = []

    def loss_at(_step: int) -> torch.Tensor:
        seen.append(float(w.detach()))
        return 3.0 * w

    fit([w], steps, loss_at, lr=lr, weight_decay=0.0, warmup=warmup, clip=None, progress=False)
    seen.append(float(w.detach()))
    moves = -np.diff(seen)
    want = [_lr_formula(s, steps, warmup, lr) for s in range(steps)]
    np.testing.assert_allclose(moves, want, rtol=1e-6, atol=1e-9)
    if warmup:
        assert moves[warmup - 1] == pytest.approx(lr) and moves[0] == pytest.approx(lr / warmup)


def test_train_classifier_hands_its_recipe_to_fit(monkeypatch):
    """`warmup` is a fraction of the run's steps; the defaults are the recipe `probe train vit` uses."""
    import probe.train

    calls = []
    real_fit = probe.train.fit

    def spy(params, steps, loss_at, **kw):
        calls.append((steps, kw))
        return real_fit(params, steps, loss_at, **kw)

    monkeypatch.setattr(probe.train, "fit", spy)
    ds, config = _colour_data()
    for kw, want_warmup, want_clip in (({}, round(DEFAULT_WARMUP * 30), DEFAULT_CLIP),
                                       ({"warmup": 0.25, "clip": None}, 8, None),
                                       ({"warmup": 0.0, "clip": 0.5}, 0, 0.5)):
        model = registry.load_model("vit-standard", weights="random", seed=0, config=config)
        train_classifier(model, ds, ds, epochs=10, batch_size=16, progress=False, **kw)  # 3 steps a epoch
        steps, got = calls[-1]
        assert steps == 30 and got["warmup"] == want_warmup and got["clip"] == want_clip, got
    model = registry.load_model("vit-standard", weights="random", seed=0, config=config)
    for bad in ({"warmup": 1.0}, {"warmup": -0.1}, {"clip": 0.0}, {"clip": float("nan")}):
        with pytest.raises(ValueError, match="warm-up|clip"):
            train_classifier(model, ds, ds, epochs=1, progress=False, **bad)


def _colour_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 48)
    x = rng.integers(0, 40, (48, 16, 16, 3), dtype=np.uint8)
    for c in range(3):
        x[y == c, :, :, c] = 220
    config = {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 1, "heads": 2, "num_classes": 3}
    return ImageDataset(x, y, ["r", "g", "b"]), config
