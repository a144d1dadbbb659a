"""Shared machinery of the transformers captioners (``vit-gpt2``, ``blip``, ``git``).

Each family subclass says how to build and load its model, how its text inputs look, and which
native modules map to the canonical hooks. This base class does the rest the same way for all
three: resolving ``--weights``, preprocessing with the family's image processor, teacher-forced
logits, batched captioning, and capture *during* generation with the KV cache on.

Capture during generation stores, per generated token and layer, only the new query row of the
text patterns: generation runs one forward per token, and the text pattern hooks are captured
with ``rows=[-1]``, so call 0 (the prompt) gives the row that predicted token 0 and call k the row
that predicted token k. Vision patterns are captured once per image, whole.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from probe.adapter import ModelAdapter
from probe.capture import HeadReduction, Intervention, MaskTokens, hf_attention
from probe.capture.cache import ActivationCache
from probe.capture.generation import generate_and_capture, generated_tokens
from probe.data import to_rgb
from probe.types import Capabilities, InputMeta, WeightsInfo
from probe.weights import hub_reachable, load_hf, offline
from probe.zoo import demo_path

log = logging.getLogger(__name__)

# one small word vocabulary for the tiny test models and the probe-shapes zoo
SHAPES_WORDS = (
    "a an the and of left right above below to next small large big red green blue yellow "
    "circle square triangle circles squares triangles one two three"
).split()


@dataclass(frozen=True)
class Specials:
    """Special token ids of a family: the first decoder input, end of caption, padding."""

    start: int
    eos: int
    pad: int


def word_tokenizer(words: Sequence[str], specials: dict[str, str]) -> Any:
    """A word-level `PreTrainedTokenizerFast`: special tokens first (in `specials`' order), then
    `words`, split on whitespace and punctuation. `save_pretrained`/`AutoTokenizer` round-trip it.

    Args:
        specials: role -> token, roles among ``pad_token``, ``unk_token``, ``cls_token``,
            ``sep_token``, ``bos_token``, ``eos_token``, ``mask_token``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in [*specials.values(), *words]:
        vocab.setdefault(tok, len(vocab))
    unk = specials.get("unk_token", next(iter(specials.values())))
    tk = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, **specials)


def placeholder_tokenizer(vocab_size: int, specials: dict[str, tuple[str, int]]) -> Any:
    """A tokenizer for random-weight models built without their published tokenizer (no network):
    ids map to ``[unusedN]``, special tokens sit at the ids the config expects."""
    names = [f"[unused{i}]" for i in range(vocab_size)]
    for _role, (tok, idx) in specials.items():
        names[idx] = tok
    return word_tokenizer(names, {role: tok for role, (tok, _) in specials.items()})


class HFCaptionerAdapter(ModelAdapter):
    """Base adapter of a transformers captioner; see the module docstring."""

    hub_id: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    #: how many prompt tokens start every caption (the decoder start token)
    prompt_len: ClassVar[int] = 1

    def __init__(self, model: Any, processor: Any, tokenizer: Any, weights: WeightsInfo) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = tokenizer
        self.weights = weights
        self._use_capture_attention()

    # ------------------------------------------------------------------ family specifics
    @classmethod
    def published_config(cls) -> Any:
        """The published architecture's config, built in code (no download)."""
        raise NotImplementedError

    @classmethod
    def _from_pretrained(cls, ref: str, local_only: bool) -> Any:
        raise NotImplementedError

    @classmethod
    def _from_config(cls, config: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def _image_processor(cls, ref: str | None, model: Any, local_only: bool = True) -> Any:
        """The family's PIL image processor, from `ref` or (None) from the model's config."""
        raise NotImplementedError

    @classmethod
    def _placeholder_specials(cls, model: Any) -> dict[str, tuple[str, int]]:
        raise NotImplementedError

    def _use_capture_attention(self) -> None:
        """Put the layers that call transformers' attention interface on ``probe_capture``."""
        raise NotImplementedError

    @property
    def specials(self) -> Specials:
        raise NotImplementedError

    @property
    def vision_config(self) -> Any:
        raise NotImplementedError

    def _logits(self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _generate(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Generated ids (batch, prompt_len + new tokens)."""
        raise NotImplementedError

    def text_offset(self) -> int:
        """Position of the first text token in the sequence the text patterns' keys index."""
        return 0

    @property
    def flow_hook(self) -> str:
        """Name template of the pattern whose keys hold the image tokens."""
        return "text.blocks.{i}.xattn.pattern"

    #: the word tokenizer's special tokens of a tiny model, and which are start, end and padding
    tiny_specials: ClassVar[dict[str, str]] = {}
    tiny_roles: ClassVar[tuple[str, str, str]] = ("bos_token", "eos_token", "pad_token")

    @classmethod
    def tiny_config(cls, vocab_size: int, specials: Specials, **kw: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def tiny(cls, *, seed: int = 0, words: Sequence[str] = SHAPES_WORDS, **config_kw: Any) -> HFCaptionerAdapter:
        """A small random model of this family's real transformers classes, with a word-level
        tokenizer over `words` (tests, and the probe-shapes zoo). `config_kw` go to `tiny_config`."""
        hf_attention.register()
        tok = word_tokenizer(words, cls.tiny_specials)
        start, eos, pad = (tok.convert_tokens_to_ids(cls.tiny_specials[r]) for r in cls.tiny_roles)
        torch.manual_seed(seed)
        model = cls._from_config(cls.tiny_config(len(tok), Specials(start, eos, pad), **config_kw))
        from probe.weights import state_dict_sha256

        info = WeightsInfo("random", f"tiny {cls.name}, seed={seed}", state_dict_sha256(model))
        return cls(model, cls._image_processor(None, model), tok, info)

    @classmethod
    def on_meta(cls, config: Any = None) -> HFCaptionerAdapter:
        """The published architecture (or `config`) on the meta device: no weights, no memory, no
        download; for parameter and FLOP accounting. It cannot run on real inputs."""
        with torch.device("meta"):
            model = cls._from_config(copy.deepcopy(config) if config is not None else cls.published_config())
        return cls(model, None, None, WeightsInfo("meta", "published config, no weights"))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        *,
        weights: str = "auto",
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        config: Any = None,
    ) -> HFCaptionerAdapter:
        """Load from ``auto`` | ``pretrained`` | ``demo`` | ``random`` | a hub id | a local folder.

        ``random`` builds the published architecture (or `config`, a transformers config) with
        random weights and a placeholder tokenizer.
        """
        hf_attention.register()

        def build_random() -> Any:
            torch.manual_seed(seed)
            return cls._from_config(copy.deepcopy(config) if config is not None else cls.published_config())

        model, info, ref = load_hf(cls._from_pretrained, build_random, weights, hub_id=cls.hub_id,
                                   model_name=cls.name, demo=demo_path(cls.name))
        if ref:
            processor = _from_ref(lambda r, lo: cls._image_processor_from(r, lo, model), ref)
            tokenizer = _from_ref(_auto_tokenizer, ref)
        else:
            processor = cls._image_processor(None, model)
            tokenizer = placeholder_tokenizer(_vocab_size(model), cls._placeholder_specials(model))
            info = WeightsInfo(info.source, info.ref, info.sha256,
                               (info.note + "; " if info.note else "") + "placeholder tokenizer ([unusedN] tokens)")
        return cls(model, processor, tokenizer, info).to(device, dtype)  # type: ignore[return-value]

    @classmethod
    def _image_processor_from(cls, ref: str, local_only: bool, model: Any) -> Any:
        folder = Path(ref)
        if folder.is_dir() and not (folder / "preprocessor_config.json").is_file():
            log.warning("%s: %s has no preprocessor_config.json; using the model config's image size", cls.name, ref)
            return cls._image_processor(None, model)
        return cls._image_processor(ref, model, local_only)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write model, image processor and tokenizer to `folder` (loadable with ``weights=folder``).
        Atomic: a crash leaves no half-written folder."""
        from probe.io import atomic_dir

        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            self.model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        return folder

    @property
    def attn_implementation(self) -> str:
        return ("probe_capture (SDPA kernel, patterns recomputed on request) where the model calls the attention "
                "interface; eager modules read by hooks elsewhere")

    # ------------------------------------------------------------------ geometry and metadata
    @property
    def image_size(self) -> int:
        return int(self.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g

    @property
    def n_image_tokens(self) -> int:
        """Vision tokens reaching the text: CLS + patches."""
        r, c = self.grid
        return 1 + r * c

    def input_meta(self, batch: dict[str, torch.Tensor]) -> InputMeta:
        ids = batch.get("input_ids")
        nt = self.prompt_len if ids is None else ids.shape[1]
        t0 = self.text_offset()
        tokens = None
        if ids is not None:
            mask = batch.get("attention_mask", torch.ones_like(ids))
            tokens = [self.tokenizer.convert_ids_to_tokens(r[m.bool()].tolist()) for r, m in zip(ids, mask, strict=True)]
        return InputMeta(spans={"cls": (0, 1), "image": (1, self.n_image_tokens), "text": (t0, t0 + nt)},
                         grid=self.grid, image_size=(self.image_size, self.image_size), tokens=tokens,
                         flow_hook=self.flow_hook)

    # ------------------------------------------------------------------ running
    def preprocess(self, images: Sequence[Image.Image], captions: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Images -> ``pixel_values`` (b, 3, H, W) with the family's processor; with `captions`,
        ``input_ids`` and ``attention_mask`` (b, T): start token, caption, end token, right-padded."""
        if not images:
            raise ValueError("no images given")
        rgb = [to_rgb(im) for im in images]
        px = self.processor(images=rgb, return_tensors="pt")["pixel_values"]
        batch = {"pixel_values": px.to(self.device, self.dtype)}
        if captions is not None:
            if isinstance(captions, str) or len(captions) != len(images):
                raise ValueError(f"give one caption per image: {len(images)} images, captions={captions!r}")
            batch.update(self.encode_captions(captions))
        return batch

    def encode_captions(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (b, T): start, caption tokens, end, right-padded."""
        sp = self.specials
        rows = [[sp.start, *self.tokenizer(c, add_special_tokens=False)["input_ids"], sp.eos] for c in captions]
        n = max(map(len, rows))
        ids = torch.full((len(rows), n), sp.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced logits (b, T, vocab): ``logits[:, t]`` predicts ``input_ids[:, t + 1]``.
        Without ``input_ids``, the first step from the start token."""
        ids = batch.get("input_ids")
        if ids is None:
            b = batch["pixel_values"].shape[0]
            ids = torch.full((b, 1), self.specials.start, dtype=torch.long, device=self.device)
        # no mask means every token is real (and keeps meta-device FLOP counting free of .item())
        return self._logits(batch["pixel_values"], ids, batch.get("attention_mask"))

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image], max_new_tokens: int = 20, num_beams: int = 1,
                **generate_kwargs: Any) -> dict[str, Any]:
        """Captions of a batch of images with the family's own generate (greedy or beam search;
        `generate_kwargs` go to transformers' ``generate``, e.g. ``min_new_tokens``).

        Returns:
            ``{"ids": (b, new tokens) tensor, "tokens": [[str]] up to and including the end token,
            "text": [str]}``.
        """
        return self.caption_pixels(self.preprocess(images)["pixel_values"], max_new_tokens, num_beams,
                                   **generate_kwargs)

    @torch.no_grad()
    def caption_pixels(self, pixel_values: torch.Tensor, max_new_tokens: int = 20, num_beams: int = 1,
                       **generate_kwargs: Any) -> dict[str, Any]:
        """`caption` from preprocessed ``pixel_values`` (b, 3, H, W)."""
        generate_kwargs.setdefault("do_sample", False)
        out = self._generate(pixel_values, max_new_tokens=max_new_tokens, num_beams=num_beams, **generate_kwargs)
        return self._decode(out[:, self.prompt_len :])

    def _decode(self, new: torch.Tensor) -> dict[str, Any]:
        sp = self.specials
        tokens = generated_tokens(new, sp.eos, sp.pad, self.tokenizer.convert_ids_to_tokens)
        text = [self.tokenizer.decode(self.tokenizer.convert_tokens_to_ids(t), skip_special_tokens=True).strip()
                for t in tokens]
        return {"ids": new, "tokens": tokens, "text": text}

    @torch.no_grad()
    def generate_with_cache(
        self,
        images: Sequence[Image.Image],
        hooks: str | Sequence[str] = "*.pattern",
        *,
        max_new_tokens: int = 20,
        heads: Any = None,
        reduce: HeadReduction | None = None,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device | None = "cpu",
        **generate_kwargs: Any,
    ) -> tuple[dict[str, Any], ActivationCache]:
        """Greedy captions with the hooks matching `hooks` captured during generation (KV cache on);
        see `probe.generation.capture_generation` for what each call holds. Beam search is not
        offered here: beams reorder the batch between steps, so per-step rows would mix beams.

        Returns:
            (captions as `caption` returns them, cache with ``meta.tokens`` the generated tokens).
        """
        px = self.preprocess(images)["pixel_values"]

        def generate() -> torch.Tensor:
            out = self._generate(px, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False, **generate_kwargs)
            return out[:, self.prompt_len :]

        return generate_and_capture(self, px, generate, self._decode, hooks, heads=heads, reduce=reduce,
                                    dtype=dtype, device=device)

    def mask_image_tokens(self, removed: torch.Tensor | None = None) -> list[Intervention]:
        """Interventions that remove image tokens from everything the text attends to.

        `removed`: bool (batch, n_image_tokens), True = removed, over [CLS, patches]; None removes
        all. A removed token gets exactly zero attention; a query left with no key reads nothing.
        """
        tokens: Any = list(range(self.n_image_tokens)) if removed is None else removed
        return [MaskTokens(tokens, attention=self.flow_hook.format(i="*"))]


def _vocab_size(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def _auto_tokenizer(ref: str, local_only: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref, local_files_only=local_only)


def _from_ref(fn: Any, ref: str) -> Any:
    """`fn(ref, local_only)`: the local copy first, then the hub when it can be reached."""
    try:
        return fn(ref, True)
    except OSError as first:
        if Path(ref).is_dir() or offline() or not hub_reachable():
            raise OSError(f"{ref}: {first}") from first
        return fn(ref, False)
