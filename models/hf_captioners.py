"""`HFCaptioner`: what the transformers captioners (``vit-gpt2``, ``blip``, ``git``) share on top of
`probe.adapter.Captioner`: building (published config, or a small config with a word tokenizer over
`SHAPES_WORDS`), loading with ``from_pretrained``, saving with ``save_pretrained``, the image
processor, token decoding and ``generate``. A family names its classes and gives its configs,
special tokens, logits and hook templates; a family whose text decoder is a stack of blocks with
cross-attention also declares a `TextStack` and gets `Captioner.text_run` (`HFTextRun`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn

from probe.adapter import Captioner, Specials, TextRun
from probe.capture import Precomputed, intervene, uncached
from probe.capture.engine import first_tensor
from probe.types import HookSpec, WeightsInfo
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


@dataclass(frozen=True)
class TextStack:
    """Where a family's text decoder can be resumed (`HFTextRun`). Paths are relative to the model
    (`blocks`, with ``{i}`` = block index) or to one block (the others).

    Attributes:
        blocks: the text blocks, run in order; the ``text`` stack of `blocks()`.
        image_kv: modules of a block whose output depends on the image features alone (the
            cross-attention key and value projections).
        residual: the module whose first input is the state the cross-attention output is added to.
    The cross-attention output projection is the module of the ``text.blocks.{i}.xattn.z`` hook.
    """

    blocks: str
    image_kv: tuple[str, ...]
    residual: str


class _Modules:
    """The `probe.capture` view (``model``, ``hook_specs()``, ``module()``) of ad-hoc specs."""

    def __init__(self, model: nn.Module, specs: list[HookSpec]) -> None:
        self.model, self._specs = model, specs

    def hook_specs(self) -> list[HookSpec]:
        return self._specs

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)


class HFTextRun(TextRun):
    """`TextRun` of a transformers captioner with a `TextStack`: one whole forward records, per
    text block, the arguments it was called with, its cross-attention keys and values, the
    residual and the head outputs (``xattn.z``); resuming re-calls the native modules on rows
    gathered by image, so hooks and interventions fire as in a whole forward. A block re-call
    drops the key/value cache of the recorded call (`transformers.Cache` arguments -> None,
    ``use_cache=False``); the cross-attention key/value projections are replaced, only while a
    resumed block runs, by the engine's `Precomputed` stand-ins returning the recorded rows.
    """

    def __init__(self, adapter: HFCaptioner, stack: TextStack, pixel_values: torch.Tensor, ids: torch.Tensor,
                 mask: torch.Tensor | None) -> None:
        self.adapter, self.stack, self.n = adapter, stack, pixel_values.shape[0]
        self.depth = len(adapter.module(stack.blocks.split(".{i}")[0]))
        self.paths = [stack.blocks.format(i=i) for i in range(self.depth)]
        z_modules = {s.name: s.module for s in adapter.hook_specs()}
        self.z_paths = [z_modules[f"text.blocks.{i}.xattn.z"] for i in range(self.depth)]
        calls: list[list[Any]] = [[] for _ in range(self.depth)]
        kv: dict[str, list[torch.Tensor]] = {f"{p}.{m}": [] for p in self.paths for m in stack.image_kv}
        z: list[list[torch.Tensor]] = [[] for _ in range(self.depth)]
        resid: list[list[torch.Tensor]] = [[] for _ in range(self.depth)]
        owner = threading.get_ident()

        def keep(store: list[Any], what: Any) -> None:
            if threading.get_ident() == owner:
                store.append(what)

        handles = []
        try:
            for i, path in enumerate(self.paths):
                block = adapter.module(path)
                handles.append(block.register_forward_pre_hook(
                    lambda _m, a, k, i=i: keep(calls[i], (a, k)), with_kwargs=True))
                handles.append(adapter.module(self.z_paths[i]).register_forward_pre_hook(
                    lambda _m, a, i=i: keep(z[i], a[0])))
                handles.append(block.get_submodule(stack.residual).register_forward_pre_hook(
                    lambda _m, a, i=i: keep(resid[i], a[0])))
                for m in stack.image_kv:
                    handles.append(block.get_submodule(m).register_forward_hook(
                        lambda _m, _a, out, key=f"{path}.{m}": keep(kv[key], first_tensor(out))))
            self.logits = adapter.forward({"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask})
        finally:
            for h in handles:
                h.remove()
        for what, got in (("block", calls), ("xattn.z", z), ("residual", resid), ("image key/value", kv.values())):
            if any(len(c) != 1 for c in got):
                raise RuntimeError(f"{adapter.name}: text_run needs each text block's {what} module to run once per "
                                   f"forward; counted {[len(c) for c in got]}")
        from transformers.cache_utils import Cache

        def fresh(x: Any) -> Any:  # a block re-call starts without the recorded call's key/value cache
            return None if isinstance(x, Cache) else x

        self._calls = []
        for (args, kwargs), in calls:
            kwargs = {k: fresh(v) for k, v in kwargs.items()}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            self._calls.append((tuple(fresh(a) for a in args), kwargs))
        self._z, self._resid = [c[0] for c in z], [c[0] for c in resid]
        self._kv = {k: v[0] for k, v in kv.items()}

    def _rows(self, value: Any, images: torch.Tensor) -> Any:
        """A recorded block argument for rows reading `images`: batch-first tensors gathered. A tensor
        counts as batch-first when it has two or more dims and n rows; 1-D arguments (positions such
        as `cache_position`, whose length can equal the image count) are passed as recorded."""
        if isinstance(value, torch.Tensor):
            return value[images.to(value.device)] if value.dim() >= 2 and value.shape[0] == self.n else value
        if isinstance(value, tuple | list):
            return type(value)(self._rows(v, images) for v in value)
        return value

    def hidden(self, layer: int, images: torch.Tensor) -> torch.Tensor:
        h = self._calls[layer][0][0]
        return h[images.to(h.device)]

    def block(self, layer: int, hidden: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        args, kwargs = self._calls[layer]
        args = (hidden, *(self._rows(a, images) for a in args[1:]))
        kwargs = {k: self._rows(v, images) for k, v in kwargs.items()}
        with self._shared_kv(images, [layer]):
            return first_tensor(self.adapter.module(self.paths[layer])(*args, **kwargs))

    def finish_block(self, layer: int, images: torch.Tensor) -> torch.Tensor:
        z, resid = self._z[layer], self._resid[layer]
        idx = images.to(z.device)
        return self.adapter._finish_block(self.adapter.module(self.paths[layer]), z[idx], resid[idx])

    def shared_image_kv(self, images: torch.Tensor) -> Any:
        return self._shared_kv(images, range(self.depth))

    @contextmanager
    def _shared_kv(self, images: torch.Tensor, layers: Sequence[int]) -> Iterator[None]:
        specs = [HookSpec(f"image_kv.{i}.{m}", f"{self.paths[i]}.{m}", "output")
                 for i in layers for m in self.stack.image_kv]

        def rows(module: str) -> Any:
            recorded = self._kv[module]
            idx = images.to(recorded.device)

            def output(x: torch.Tensor, *_a: Any, **_k: Any) -> torch.Tensor:
                if x.shape[0] != len(idx) or x.shape[1:-1] != recorded.shape[1:-1]:
                    raise RuntimeError(f"{module}: shared image keys/values are for {len(idx)} rows of "
                                       f"{tuple(recorded.shape[1:-1])} image tokens; called on {tuple(x.shape)}")
                return recorded[idx]

            return output

        with intervene(_Modules(self.adapter.model, specs), [Precomputed(s.name, rows(s.module)) for s in specs]):
            yield


class HFCaptioner(Captioner):
    """Base of the transformers captioners; see the module docstring."""

    auto = ("hub", "demo", "random")
    capture_attention: ClassVar[str | None] = ""
    #: where the text decoder can be resumed (`text_run`); None: it cannot
    text_stack: ClassVar[TextStack | None] = None

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

    def _finish_block(self, block: nn.Module, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The rest of text `block` from its cross-attention head outputs `z` (r, T, d), the input of
        the output projection, and the `TextStack.residual` state (r, T, d): (r, T, d)."""
        raise NotImplementedError(f"{self.name} declares no text stack")

    def text_run(self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> TextRun:
        """`HFTextRun` where the family declares a `TextStack`; see `Captioner.text_run`."""
        if self.text_stack is None:
            return super().text_run(pixel_values, ids, mask)
        return HFTextRun(self, self.text_stack, pixel_values, ids, mask)

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
