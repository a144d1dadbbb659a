"""`CharCaptioner`: what our character-level captioners (``prefix-vlm``, ``mmca``) share on top of
`probe.adapter.Captioner`: the `CharTokenizer`, our checkpoint format, greedy decoding.

Checkpoint folder: ``config.json`` (``{"probe_model": NAME, "config": ..., ...}``), ``model.safetensors``
(the whole model, frozen vision encoder included) and ``tokenizer.json``. A family gives its
geometry, hook templates and how its model is built from a checkpoint's config (`_model`,
`_spec`, `_config_json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import torch
from PIL import Image

from probe.adapter import Captioner, Specials
from probe.data import images_to_tensor
from probe.models.text import CharTokenizer, EncodeDecodeCaptioner
from probe.weights import load_state, read_checkpoint, write_checkpoint

DEFAULT_CHARS = "abcdefghijklmnopqrstuvwxyz ,.'-"


class CharCaptioner(Captioner):
    """Base of our character-level captioners; see the module docstring."""

    model: EncodeDecodeCaptioner
    tokenizer: CharTokenizer

    # ------------------------------------------------------------------ family primitives
    @classmethod
    def _spec(cls, config: dict[str, Any], vocab_size: int, meta: bool) -> dict[str, Any]:
        """A `load(config=...)` dict -> the config.json entries `_model` builds from."""
        raise NotImplementedError

    @classmethod
    def _model(cls, spec: dict[str, Any]) -> EncodeDecodeCaptioner:
        raise NotImplementedError

    def _config_json(self) -> dict[str, Any]:
        """config.json entries (besides ``probe_model``) that rebuild this model with `_model`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @classmethod
    def _build(cls, config: dict[str, Any] | None, meta: bool) -> Self:
        tok = CharTokenizer(DEFAULT_CHARS)
        return cls(cls._model(cls._spec(config or {}, len(tok), meta)), tokenizer=tok)

    @classmethod
    def _load(cls, ref: str, local_only: bool) -> Self:
        meta, state = read_checkpoint(ref, cls.name, "tokenizer.json")
        tok = CharTokenizer.load(Path(ref) / "tokenizer.json")
        return cls(load_state(cls._model(meta), state, ref), tokenizer=tok)

    def _save(self, folder: Path) -> None:
        write_checkpoint(folder, self.name, self.model, **self._config_json())
        self.tokenizer.save(folder / "tokenizer.json")

    @property
    def specials(self) -> Specials:
        return Specials(self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id)

    @property
    def max_caption_tokens(self) -> int:
        """The longest caption the decoder's positions allow (``max_len - 1``)."""
        return self.model.cfg.max_len - 1

    @property
    def max_new_tokens(self) -> int:  # type: ignore[override]
        """Default caption length: as long as the positions allow (greedy decoding stops at <eos>)."""
        return self.max_caption_tokens

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return images_to_tensor(images, self.image_size)

    def _logits(self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.model(pixel_values, ids)  # causal: right padding never reaches real tokens

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Our decoders are pre-norm: the final ``norm``, then the ``head``."""
        return self.model.head(self.model.norm(resid))

    def _generate(self, pixel_values: torch.Tensor, max_new_tokens: int, num_beams: int, **kw: Any) -> torch.Tensor:
        """Greedy ids (b, new tokens). Options: ``min_new_tokens``, and ``use_cache`` (default True:
        the decoder's key/value cache, which `EncodeDecodeCaptioner.can_cache` turns off while a
        position-indexed intervention is active; False re-runs the prefix every step)."""
        known = ("min_new_tokens", "do_sample", "use_cache")
        extra = {k: v for k, v in kw.items() if k not in known or (k == "do_sample" and v)}
        if num_beams != 1 or extra:
            raise ValueError(f"our character captioners decode greedily: use num_beams=1 and no generate options "
                             f"{extra} (min_new_tokens and use_cache are supported)")
        return self.model.generate(pixel_values, max_new_tokens, kw.get("min_new_tokens", 0),
                                   use_cache=bool(kw.get("use_cache", True)))[:, 1:]

    def _encode_text(self, caption: str) -> list[int]:
        return self.tokenizer.encode(caption, bos=False, eos=False)

    def _tokens(self, ids: list[int]) -> list[str]:
        return self.tokenizer.tokens(ids)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _groups(self) -> dict[str, list[str]]:
        # one self-attention per block: the prefix VLM's joint attention over [prefix; text], and
        # MMCA's two softmaxes, which share one set of q/k/v/out projections: no parameter is
        # cross-attention only, so they all count as self-attention
        return {"vision": ["vision"], "fusion": ["proj"], "embeddings": ["tok_emb", "pos_emb"],
                "text_self_attention": ["blocks.{i}.norm1", "blocks.{i}.attn"], "cross_attention": [],
                "feed_forward": ["blocks.{i}.norm2", "blocks.{i}.mlp"], "head": ["norm", "head"]}
