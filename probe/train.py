"""Training loop for the from-scratch ViT family (classification, top-1 and top-5)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from probe.data import ImageDataset, images_to_tensor
from probe.models.vit import ViT, ViTConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReport:
    """Metrics of a training run: losses per step, final test accuracies in [0, 1]."""

    losses: list[float]
    top1: float
    top5: float
    steps: int
    seconds: float


def _pixels(images: np.ndarray, cfg: ViTConfig) -> torch.Tensor:
    from PIL import Image

    return images_to_tensor([Image.fromarray(a) for a in images], cfg.image_size, cfg.mean, cfg.std)


@torch.no_grad()
def evaluate(model: ViT, data: ImageDataset, batch_size: int = 128, device: str = "cpu") -> tuple[float, float]:
    """Top-1 and top-5 accuracy (top-k with k capped at the number of classes)."""
    model.eval()
    correct1 = correct5 = 0
    k = min(5, model.cfg.num_classes)
    for xb, yb in data.batches(batch_size):
        logits = model(_pixels(xb, model.cfg).to(device))
        y = torch.from_numpy(yb).to(device)
        topk = logits.topk(k, dim=-1).indices
        correct1 += int((topk[:, 0] == y).sum())
        correct5 += int((topk == y[:, None]).any(-1).sum())
    n = max(len(data), 1)
    return correct1 / n, correct5 / n


def train_vit(
    model: ViT,
    train: ImageDataset,
    test: ImageDataset,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    device: str = "cpu",
    max_steps: int | None = None,
    progress: bool = True,
) -> TrainReport:
    """AdamW with cosine decay and cross-entropy; returns losses and test top-1/top-5."""
    if len(train.classes) > model.cfg.num_classes:
        raise ValueError(f"data has {len(train.classes)} classes, model head has {model.cfg.num_classes}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"train vit-{model.cfg.attention}", disable=not progress)
    step = 0
    for _ in range(epochs):
        for xb, yb in train.batches(batch_size, shuffle=True, generator=g):
            if step >= total:
                break
            logits = model(_pixels(xb, model.cfg).to(device))
            loss = F.cross_entropy(logits, torch.from_numpy(yb).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    top1, top5 = evaluate(model, test, device=device)
    model.eval()
    log.info("trained %d steps: test top-1 %.3f, top-5 %.3f", step, top1, top5)
    return TrainReport(losses, top1, top5, step, time.perf_counter() - t0)
