"""probe: interpretability and probing for vision transformers and vision-language captioners.

The Python API in one import::

    import probe
    adapter = probe.load_model("vit-performer", weights="random")
    with probe.capture(adapter, "vision.blocks.*.attn.pattern", rows=[0], reduce="mean") as cache:
        adapter.forward(adapter.preprocess(images))
"""

__version__ = "0.1.0"

from probe.capture import MaskTokens, Replace, ZeroHeads, capture, intervene
from probe.capture import ActivationCache
from probe.data import load_images
from probe.registry import load_model, models
from probe.runs.store import RunStore

__all__ = [
    "ActivationCache",
    "MaskTokens",
    "Replace",
    "RunStore",
    "ZeroHeads",
    "capture",
    "intervene",
    "load_images",
    "load_model",
    "models",
]
