"""`HFCaptioner`: what the transformers captioners (``vit-gpt2``, ``blip``, ``git``) share on top of
`probe.adapter.Captioner`: building (published config, or a small config with a word tokenizer over
`SHAPES_WORDS`), loading with ``from_pretrained``, saving with ``save_pretrained``, the image
processor, token decoding and ``generate``. A family names its classes and gives its configs,
special tokens, logits and hook templates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import torch

from probe.adapter import Captioner, Specials
from probe.capture import uncached
from probe.types import WeightsInfo
from probe.weights import CheckpointError, from_pretrained, hf_part, read_json

log = logging.getLogger(__name__)

# one small word vocabulary for the tiny test models and the probe-shapes zoo
SHAPES_WORDS = (
    "a an the and of left right above below to next small large big red green blue yellow "
    "circle square triangle circles squares triangles one two three"
).split()


def word_tokenizer(tokens: Sequence[str], specials: dict[str, str]) -> Any:
    """A word-level `PreTrainedTokenizerFast` whose ids are the positions of `tokens` (first
    occurrence), split on whitespace and punctuation; `save_pretrained`/`AutoTokenizer` round-trip it.

    Args:
        specials: role -> token (among `tokens`), roles among ``pad_token``, ``unk_token``,
            ``cls_token``, ``sep_token``, ``bos_token``, ``eos_token``, ``mask_token``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast  # heavy: only when this family is built

    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials.get("unk_token", next(iter(specials.values())))))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, **specials)


# the probe-shapes zoo size of every transformers captioner (`tiny_config` keywords)
ZOO_CONFIG = {"image_size": 64, "patch_size": 8, "hidden": 64, "layers": 3, "heads": 4, "positions": 32}


class HFCaptioner(Captioner):
    """Base of the transformers captioners; see the module docstring."""

    auto = ("hub", "demo", "random")
    capture_attention: ClassVar[str | None] = ""
    @property
    def max_caption_tokens(self) -> int:
        """The text positions of the decoder, less the start token."""
        return int(self.model.config.get_text_config(decoder=True).max_position_embeddings) - 1

    @property
    def max_new_tokens(self) -> int:
        """Default caption length: 24 tokens (the zoo's captions need up to 22), or fewer where the
        decoder has fewer positions."""
        return min(24, self.max_caption_tokens)

    #: transformers class names of the model and of its PIL image processor
    model_class: ClassVar[str]
    processor_class: ClassVar[str]
    #: where the model config keeps the vision config
    vision_key: ClassVar[str] = "vision_config"
    #: a small model's word tokenizer: its special tokens, and which are start, end and padding
    tiny_specials: ClassVar[dict[str, str]]
    tiny_roles: ClassVar[tuple[str, str, str]] = ("bos_token", "eos_token", "pad_token")

    # ------------------------------------------------------------------ family primitives
    @classmethod
    def published_config(cls) -> Any:
        """The published architecture's config, built in code (no download)."""
        raise NotImplementedError

    @classmethod
    def tiny_config(cls, vocab_size: int, specials: Specials, **config: Any) -> Any:
        """A small config of the same classes; `config` as `load(config=...)` takes it."""
        raise NotImplementedError

    @classmethod
    def placeholder_specials(cls, config: Any) -> dict[str, tuple[str, int]]:
        """role -> (token, id) of the published tokenizer's special tokens."""
        raise NotImplementedError

    def _generate_kwargs(self, pixel_values: torch.Tensor) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ shared
    @classmethod
    def tiny(cls, *, seed: int = 0, **config: Any) -> Self:
        """``load(weights="random", seed=seed, config=config)``: a small random model of this family's
        real classes with a word tokenizer over `SHAPES_WORDS` (tests, and the probe-shapes zoo)."""
        return cls.load(weights="random", seed=seed, config=config)

    @classmethod
    def _klass(cls, name: str) -> Any:
        import transformers

        return getattr(transformers, name)

    @classmethod
    def _build(cls, config: dict[str, Any] | None, meta: bool) -> Self:
        """`config` given: `tiny_config` with the word tokenizer; else the published architecture
        with a placeholder tokenizer (``[unusedN]``; none on the meta device)."""
        note, tok = "", None
        if config is not None:
            sp = cls.tiny_specials
            tok = word_tokenizer([*sp.values(), *SHAPES_WORDS], sp)
            ids = Specials(*(tok.convert_tokens_to_ids(sp[r]) for r in cls.tiny_roles))
            model = cls._klass(cls.model_class)(cls.tiny_config(len(tok), ids, **config))
        else:
            model = cls._klass(cls.model_class)(cls.published_config())
            if not meta:
                names = [f"[unused{i}]" for i in range(model.get_input_embeddings().weight.shape[0])]
                roles = cls.placeholder_specials(model.config)
                for tok_, idx in roles.values():
                    names[idx] = tok_
                tok = word_tokenizer(names, {role: t for role, (t, _) in roles.items()})
                note = "placeholder tokenizer ([unusedN] tokens)"
        adapter = cls(model, WeightsInfo("random", "", note=note), tokenizer=tok)
        adapter.processor = adapter._new_processor()
        return adapter

    @classmethod
    def _load(cls, ref: str, local_only: bool) -> Self:
        klass = cls._klass(cls.model_class)
        folder = Path(ref)
        if folder.is_dir():  # say which family a folder holds before transformers tries to read it as ours
            found = read_json(folder / "config.json").get("model_type") if (folder / "config.json").is_file() else None
            if found != klass.config_class.model_type:
                raise CheckpointError(f"{ref} holds a {found or 'non-transformers'} checkpoint; {cls.name} loads "
                                      f"{klass.config_class.model_type} checkpoints: use the model it was saved from")
            if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.txt", "vocab.json")):
                raise CheckpointError(f"{ref} has no tokenizer (tokenizer.json, vocab.txt or vocab.json): captions "
                                      "cannot be decoded; save the tokenizer with the model (adapter.save does)")
        adapter = cls(from_pretrained(klass, ref, local_only),
                      tokenizer=hf_part(cls._klass("AutoTokenizer"), ref, local_only))
        if Path(ref).is_dir() and not (Path(ref) / "preprocessor_config.json").is_file():
            log.warning("%s: %s has no preprocessor_config.json; using the model config's image size", cls.name, ref)
            adapter.processor = adapter._new_processor()
        else:
            adapter.processor = hf_part(cls._klass(cls.processor_class), ref, local_only)
        return adapter

    def _new_processor(self) -> Any:
        s = self.image_size
        return self._klass(self.processor_class)(size={"height": s, "width": s})

    def _save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @property
    def attn_implementation(self) -> str:
        return ("probe_capture (SDPA kernel, patterns recomputed on request) where the model calls the attention "
                "interface; eager modules read by hooks elsewhere")

    @property
    def vision_config(self) -> Any:
        return getattr(self.model.config, self.vision_key)

    @property
    def image_size(self) -> int:
        return int(self.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    def _generate(self, pixel_values: torch.Tensor, max_new_tokens: int, num_beams: int, **kw: Any) -> torch.Tensor:
        kw.setdefault("do_sample", False)
        if uncached(self.model):  # a position-indexed intervention on the decoder: every step re-runs the prefix
            kw["use_cache"] = False
        out = self.model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                  **self._generate_kwargs(pixel_values), **kw)
        return out[:, 1:]  # the start token

    def _encode_text(self, caption: str) -> list[int]:
        return self.tokenizer(caption, add_special_tokens=False)["input_ids"]

    def _tokens(self, ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(ids)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
