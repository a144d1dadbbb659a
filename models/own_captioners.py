"""Adapters of our character-level captioners: ``prefix-vlm`` and ``mmca``.

Checkpoint folder: ``config.json`` (``{"probe_model": KIND, "config": ..., "vision_config": ...}``),
``model.safetensors`` (the whole model, frozen vision encoder included) and ``tokenizer.json``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from probe.adapter import ModelAdapter
from probe.capture import HeadReduction, Intervention, MaskTokens, hf_attention
from probe.capture.cache import ActivationCache
from probe.capture.generation import generate_and_capture, generated_tokens
from probe.data import images_to_tensor
from probe.io import atomic_dir
from probe.models.hf_vit import vision_specs
from probe.models.mmca import MMCACaptioner, MMCAConfig
from probe.models.prefix_vlm import PrefixDecoderConfig, PrefixVLM
from probe.models.text import CharTokenizer
from probe.models.vit import vit_specs
from probe.types import (
    FUSION_PROJ,
    TEXT_PATTERN,
    TEXT_RESID_POST,
    TEXT_XATTN_PATTERN,
    TEXT_Z,
    Capabilities,
    HookSpec,
    InputMeta,
    WeightsInfo,
)
from probe.weights import files_sha256, state_dict_sha256
from probe.zoo import source_of

log = logging.getLogger(__name__)

DEFAULT_CHARS = "abcdefghijklmnopqrstuvwxyz ,.'-"
PREFIX_VISION_HUB_ID = "google/vit-base-patch16-224-in21k"
TINY_HF_VIT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
               "image_size": 64, "patch_size": 8}


class CharCaptionerAdapter(ModelAdapter):
    """Shared behaviour: preprocessing, teacher-forced forward, greedy captions, checkpoints."""

    kind: str
    model: Any

    def __init__(self, model: nn.Module, tokenizer: CharTokenizer, weights: WeightsInfo) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.weights = weights

    # -- subclasses
    @property
    def image_size(self) -> int:
        raise NotImplementedError

    @property
    def n_image_tokens(self) -> int:
        """Vision tokens (CLS + patches) reaching the text."""
        raise NotImplementedError

    def text_offset(self) -> int:
        """Position of the first text token in the sequence that the text hooks index."""
        return 0

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g

    # -- shared
    def preprocess(self, images: Sequence[Image.Image], captions: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Images -> ``pixel_values`` (b, 3, H, W); with `captions`, ``input_ids`` (b, T) too."""
        batch = {"pixel_values": images_to_tensor(images, self.image_size).to(self.device, self.dtype)}
        if captions is not None:
            if len(captions) != len(images):
                raise ValueError(f"{len(images)} images but {len(captions)} captions")
            batch["input_ids"] = self.tokenizer.batch(captions).to(self.device)
        return batch

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced logits (b, T, vocab); without ``input_ids``, the first step from ``<bos>``."""
        ids = batch.get("input_ids")
        if ids is None:
            ids = torch.full((batch["pixel_values"].shape[0], 1), self.tokenizer.bos_id, device=self.device)
        return self.model(batch["pixel_values"], ids)

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image], max_new_tokens: int = 32, num_beams: int = 1) -> dict[str, Any]:
        """Greedy captions: ``{"ids": (b, new tokens), "tokens": [[str]] up to and including <eos>,
        "text": [str]}``, the same contract as the transformers captioners."""
        return self.caption_pixels(self.preprocess(images)["pixel_values"], max_new_tokens, num_beams)

    @torch.no_grad()
    def caption_pixels(self, pixel_values: torch.Tensor, max_new_tokens: int = 32, num_beams: int = 1) -> dict[str, Any]:
        """`caption` from preprocessed ``pixel_values`` (b, 3, H, W)."""
        if num_beams != 1:
            raise ValueError("our character captioners decode greedily; use num_beams=1")
        return self._decode(self.model.generate(pixel_values, max_new_tokens)[:, 1:])

    def _decode(self, new: torch.Tensor) -> dict[str, Any]:
        tok = self.tokenizer
        tokens = generated_tokens(new, tok.eos_id, tok.pad_id, tok.tokens)
        return {"ids": new, "tokens": tokens, "text": [tok.decode(tok.stoi[c] for c in t) for t in tokens]}

    @torch.no_grad()
    def generate_with_cache(
        self,
        images: Sequence[Image.Image],
        hooks: str | Sequence[str] = "*.pattern",
        *,
        max_new_tokens: int = 32,
        heads: Any = None,
        reduce: HeadReduction | None = None,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device | None = "cpu",
    ) -> tuple[dict[str, Any], ActivationCache]:
        """Greedy captions with hooks captured during generation; see
        `probe.generation.capture_generation` (our decoders re-run the prefix, no KV cache: the
        newest query row is the last one all the same)."""
        px = self.preprocess(images)["pixel_values"]
        return generate_and_capture(self, px, lambda: self.model.generate(px, max_new_tokens)[:, 1:], self._decode,
                                    hooks, heads=heads, reduce=reduce, dtype=dtype, device=device)

    @property
    def flow_hook(self) -> str:
        """Name template of the pattern whose keys hold the image tokens."""
        raise NotImplementedError

    def input_meta(self, batch: dict[str, torch.Tensor]) -> InputMeta:
        ids = batch.get("input_ids")
        nt = 1 if ids is None else ids.shape[1]
        g = self.image_size // self.patch_size
        t0 = self.text_offset()
        return InputMeta(
            spans={"cls": (0, 1), "image": (1, self.n_image_tokens), "text": (t0, t0 + nt)},
            grid=(g, g), image_size=(self.image_size, self.image_size),
            tokens=None if ids is None else [self.tokenizer.tokens(r) for r in ids],
            flow_hook=self.flow_hook,
        )

    def mask_image_tokens(self, removed: torch.Tensor | None = None) -> list[Intervention]:
        """Interventions that remove image tokens from everything the text attends to.

        `removed`: bool (batch, n_image_tokens), True = removed, over [CLS, patches]; None removes all.
        """
        raise NotImplementedError

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            (tmp / "config.json").write_text(json.dumps(self._config_json(), indent=2))
            state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            self.tokenizer.save(tmp / "tokenizer.json")
        return folder

    def _config_json(self) -> dict[str, Any]:
        raise NotImplementedError


def _read_checkpoint(folder: Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], CharTokenizer]:
    need = [folder / n for n in ("config.json", "model.safetensors", "tokenizer.json")]
    if not all(p.is_file() for p in need):
        raise FileNotFoundError(f"{folder} is not a {kind} checkpoint: expected config.json, model.safetensors, "
                                "tokenizer.json (written by adapter.save)")
    meta = json.loads(need[0].read_text())
    if meta.get("probe_model") != kind:
        raise ValueError(f"{folder} holds a {meta.get('probe_model')!r} checkpoint, not {kind!r}")
    return meta, load_file(str(need[1])), CharTokenizer.load(need[2])


def _auto(weights: str, name: str) -> str:
    """``demo``/``auto`` -> the bundled zoo checkpoint; ``auto`` without one -> ``random``."""
    if weights not in ("auto", "demo"):
        return weights
    from probe.zoo import demo_path

    demo = demo_path(name)
    if (demo / "config.json").is_file():
        log.info("%s: bundled demo weights (probe-shapes zoo) from %s", name, demo)
        return str(demo)
    if weights == "demo":
        raise FileNotFoundError(f"no demo weights are bundled for {name}; use --weights random, a checkpoint "
                                f"folder, or build them with `probe zoo train {name}`")
    log.warning("%s: no bundled weights; using random weights", name)
    return "random"


class PrefixVLMAdapter(CharCaptionerAdapter):
    kind = "prefix-vlm"
    name = "prefix-vlm"
    capabilities = Capabilities(family="prefix-vlm", fusion="prefix", has_cross_attention=False,
                                attention_kind="standard", tasks=("caption",))
    model: PrefixVLM

    def __init__(self, model: PrefixVLM, tokenizer: CharTokenizer, weights: WeightsInfo) -> None:
        model.vision.set_attn_implementation(hf_attention.register())
        super().__init__(model, tokenizer, weights)

    @classmethod
    def load(cls, *, weights: str = "auto", seed: int = 0, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, decoder: dict[str, Any] | None = None,
             vision: dict[str, Any] | None = None) -> PrefixVLMAdapter:
        """``random``: a tiny random ViT + decoder; a checkpoint folder; ``pretrained`` or a hub id:
        that ViT (default ``google/vit-base-patch16-224-in21k``) with an untrained projection and decoder."""
        from transformers import ViTConfig, ViTModel

        weights = _auto(weights, cls.name)
        path = Path(weights).expanduser()
        if path.is_dir():
            meta, state, tok = _read_checkpoint(path, cls.kind)
            vmodel = ViTModel._from_config(ViTConfig(**meta["vision_config"]), attn_implementation="sdpa")
            model = PrefixVLM(vmodel, PrefixDecoderConfig(**meta["config"]))
            model.load_state_dict(state)
            info = WeightsInfo(source_of(path), str(path.resolve()), files_sha256([path / "model.safetensors"]))
        else:
            torch.manual_seed(seed)
            tok = CharTokenizer(DEFAULT_CHARS)
            if weights == "random":
                vmodel = ViTModel._from_config(copy.deepcopy(ViTConfig(**(vision or TINY_HF_VIT))))
                ref = "random init"
            else:
                from probe.weights import load_hf

                vmodel, vinfo, _ = load_hf(
                    lambda r, lo: ViTModel.from_pretrained(r, local_files_only=lo, add_pooling_layer=False),
                    lambda: ViTModel._from_config(ViTConfig()), weights,
                    hub_id=PREFIX_VISION_HUB_ID, model_name=cls.name)
                ref = f"vision {vinfo.ref}; projection and decoder random"
            model = PrefixVLM(vmodel, PrefixDecoderConfig(vocab_size=len(tok), **(decoder or {})))
            info = WeightsInfo("random", ref, state_dict_sha256(model))
        return cls(model, tok, info).to(device, dtype)  # type: ignore[return-value]

    def _config_json(self) -> dict[str, Any]:
        vcfg = {k: getattr(self.model.vision.config, k) for k in ViTFields}
        return {"probe_model": self.kind, "config": self.model.cfg.to_dict(), "vision_config": vcfg}

    @property
    def image_size(self) -> int:
        return int(self.model.vision.config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.model.vision.config.patch_size)

    @property
    def n_image_tokens(self) -> int:
        return self.model.n_prefix

    def text_offset(self) -> int:
        return self.model.n_prefix

    @property
    def flow_hook(self) -> str:
        return "text.blocks.{i}.attn.pattern"

    def hook_specs(self) -> list[HookSpec]:
        cfg = self.model.cfg
        specs = vision_specs(self.model.vision.config, "vision.")
        specs.append(HookSpec(FUSION_PROJ, "proj", "output", "(batch, prefix tokens, d_model)"))
        for i in range(cfg.depth):
            specs += [
                HookSpec(TEXT_PATTERN.format(i=i), f"blocks.{i}.attn", "pattern",
                         "(batch, heads, prefix + text, prefix + text): joint attention", n_heads=cfg.heads),
                HookSpec(TEXT_Z.format(i=i), f"blocks.{i}.attn.out_proj", "input",
                         "(batch, tokens, heads * head_dim)", n_heads=cfg.heads),
                HookSpec(TEXT_RESID_POST.format(i=i), f"blocks.{i}", "output", "(batch, prefix + text, d_model)"),
            ]
        return specs

    def mask_image_tokens(self, removed: torch.Tensor | None = None) -> list[Intervention]:
        tokens: Any = list(range(self.n_image_tokens)) if removed is None else removed
        return [MaskTokens(tokens, attention="text.blocks.*.attn.pattern")]

    def param_groups(self) -> dict[str, list[str]]:
        n = self.model.cfg.depth
        return {
            "vision": ["vision"],  # frozen
            "fusion": ["proj"],  # the one trained projection
            "embeddings": ["tok_emb", "pos_emb"],
            # one joint self-attention over [prefix; text]: no cross-attention parameters
            "text_self_attention": [p for i in range(n) for p in (f"blocks.{i}.norm1", f"blocks.{i}.attn")],
            "cross_attention": [],
            "feed_forward": [p for i in range(n) for p in (f"blocks.{i}.norm2", f"blocks.{i}.mlp")],
            "head": ["norm", "head"],
        }

    @classmethod
    def on_meta(cls, decoder: dict[str, Any] | None = None) -> PrefixVLMAdapter:
        """The published vision encoder (ViT-B/16, ``google/vit-base-patch16-224-in21k``) with the
        default decoder, on the meta device: for parameter and FLOP accounting only."""
        from transformers import ViTConfig, ViTModel

        tok = CharTokenizer(DEFAULT_CHARS)
        with torch.device("meta"):
            vmodel = ViTModel._from_config(ViTConfig(), add_pooling_layer=False)
            model = PrefixVLM(vmodel, PrefixDecoderConfig(vocab_size=len(tok), **(decoder or {})))
        return cls(model, tok, WeightsInfo("meta", "published vision config, default decoder, no weights"))


ViTFields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
             "patch_size", "num_channels", "qkv_bias", "layer_norm_eps", "hidden_act")


class MMCAAdapter(CharCaptionerAdapter):
    kind = "mmca"
    name = "mmca"
    capabilities = Capabilities(family="mmca", fusion="mmca", has_cross_attention=True,
                                attention_kind="standard", tasks=("caption",))
    model: MMCACaptioner

    @classmethod
    def load(cls, *, weights: str = "auto", seed: int = 0, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, config: dict[str, Any] | None = None) -> MMCAAdapter:
        """``random`` (a small config) or a checkpoint folder written by `save`."""
        weights = _auto(weights, cls.name)
        if weights == "random":
            torch.manual_seed(seed)
            tok = CharTokenizer(DEFAULT_CHARS)
            model = MMCACaptioner(MMCAConfig(vocab_size=len(tok), **(config or {})))
            info = WeightsInfo("random", f"seed={seed}", state_dict_sha256(model))
        else:
            path = Path(weights).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"mmca: weights {weights!r}: no such folder (use random or a checkpoint)")
            meta, state, tok = _read_checkpoint(path, cls.kind)
            model = MMCACaptioner(MMCAConfig(**meta["config"]))
            model.load_state_dict(state)
            info = WeightsInfo(source_of(path), str(path.resolve()), files_sha256([path / "model.safetensors"]))
        return cls(model, tok, info).to(device, dtype)  # type: ignore[return-value]

    def _config_json(self) -> dict[str, Any]:
        return {"probe_model": self.kind, "config": self.model.cfg.to_dict()}

    @property
    def image_size(self) -> int:
        return self.model.vision.cfg.image_size

    @property
    def patch_size(self) -> int:
        return self.model.vision.cfg.patch_size

    @property
    def n_image_tokens(self) -> int:
        return self.model.n_image_tokens

    @property
    def flow_hook(self) -> str:
        return "text.blocks.{i}.xattn.pattern"

    def hook_specs(self) -> list[HookSpec]:
        cfg = self.model.cfg
        specs = vit_specs(self.model.vision.cfg, "vision.")
        specs.append(HookSpec(FUSION_PROJ, "proj", "output", "(batch, image tokens, dim)"))
        for i in range(cfg.depth):
            specs += [
                HookSpec(TEXT_PATTERN.format(i=i), f"blocks.{i}.attn.text_site", "pattern",
                         "(batch, heads, text, text): causal text->text softmax", n_heads=cfg.heads),
                HookSpec(TEXT_XATTN_PATTERN.format(i=i), f"blocks.{i}.attn.cross_site", "pattern",
                         "(batch, heads, text, image): text->image softmax", n_heads=cfg.heads),
                HookSpec(TEXT_Z.format(i=i), f"blocks.{i}.attn.out_proj", "input",
                         "(batch, tokens, heads * head_dim), both streams", n_heads=cfg.heads),
            ]
        return specs

    def mask_image_tokens(self, removed: torch.Tensor | None = None) -> list[Intervention]:
        tokens: Any = list(range(self.n_image_tokens)) if removed is None else removed
        return [MaskTokens(tokens, attention="text.blocks.*.xattn.pattern")]

    def param_groups(self) -> dict[str, list[str]]:
        n = self.model.cfg.depth
        return {
            "vision": ["vision"],
            "fusion": ["proj"],
            "embeddings": ["tok_emb", "pos_emb"],
            # MMCA's text->text and text->image softmaxes share one set of q/k/v/out projections:
            # the cross-modal path adds no parameters, so they all count as self-attention
            "text_self_attention": [p for i in range(n) for p in (f"blocks.{i}.norm1", f"blocks.{i}.attn")],
            "cross_attention": [],
            "feed_forward": [p for i in range(n) for p in (f"blocks.{i}.norm2", f"blocks.{i}.mlp")],
            "head": ["norm", "head"],
        }


def register() -> None:
    from probe.registry import register_model

    register_model("prefix-vlm", PrefixVLMAdapter.load, capabilities=PrefixVLMAdapter.capabilities,
                   summary="frozen ViT + one trained Linear prefix projection + causal char decoder")
    register_model("mmca", MMCAAdapter.load, capabilities=MMCAAdapter.capabilities,
                   summary="ViT + MMCA decoder: separate text->text and text->image softmaxes")
