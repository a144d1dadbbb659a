"""Adapters: everything model-specific behind one interface, the shared behaviour written once.

`ModelAdapter` loads through the one weights resolver (`probe.weights.resolve`), expands the hook
block templates a family declares, preprocesses images and saves atomically. `Classifier` and
`Captioner` add the contract of their task. A family provides only primitives:

- every family: ``_build(config, meta)`` and ``_load(ref, local_only)`` (classmethods returning an
  adapter), ``_save(folder)``, ``blocks()`` (+ ``single_hooks()``), ``image_size``/``patch_size``,
  ``_groups()`` (parameter groups, ``{i}`` = block index); ``capture_attention`` names the
  submodule whose transformers attention runs on ``probe_capture``;
- classifiers: ``forward`` and ``labels``;
- captioners: ``specials``, ``max_new_tokens``, ``max_caption_tokens``, ``_logits(pixels, ids, mask)``,
  ``_generate(pixels, max_new_tokens, num_beams, **kw) -> new ids``, ``_encode_text``,
  ``_tokens``, ``_text``; optionally ``text_run`` (a forward whose text stack can be resumed at
  any block, see `TextRun`; families without it raise NotImplementedError).

``__init__`` only stores the model, its weights info and its parts (processor, tokenizer).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from PIL import Image
from torch import nn

from probe.capture import HeadReduction, Intervention, MaskTokens, envoys, hf_attention
from probe.capture.cache import ActivationCache
from probe.capture.engine import capture, standing_in
from probe.capture.generation import capture_generation, generated_tokens
from probe.data import to_rgb
from probe.io import atomic_dir
from probe.types import (
    TEXT_PATTERN,
    TEXT_XATTN_PATTERN,
    Block,
    Capabilities,
    HookSpec,
    InputMeta,
    ProbeError,
    WeightsInfo,
    expand,
)
from probe.weights import resolve


class ModelAdapter(abc.ABC):
    """Base class of every adapter; see the module docstring for what a family provides.

    Class attributes: `name`, `capabilities`, `hub_id` (what ``pretrained`` loads), `auto` (what
    ``weights="auto"`` tries, in order), `capture_attention` (the submodule put on ``probe_capture``:
    ``""`` the whole model, None none).
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    hub_id: ClassVar[str | None] = None
    auto: ClassVar[tuple[str, ...]] = ("demo", "random")
    capture_attention: ClassVar[str | None] = None

    def __init__(self, model: nn.Module, weights: WeightsInfo | None = None, *, processor: Any = None,
                 tokenizer: Any = None) -> None:
        self.model = model
        self.weights = weights
        self.processor = processor
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def load(cls, *, weights: str = "auto", seed: int = 0, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, config: dict[str, Any] | None = None) -> Self:
        """Load the model and its parts, in eval mode, on `device` in `dtype`.

        Args:
            weights: ``auto`` | ``pretrained`` | ``demo`` | ``random`` | ``meta`` | a hub id | a
                folder (see `probe.weights.resolve`; ``meta`` ignores `device`).
            seed: seeds whatever is randomly initialised.
            config: the family's config dict; it sizes what is built (``random``, ``meta``, an
                ``auto`` that falls back to random). None: the published or default size.
        """
        if not isinstance(weights, str) or not weights:
            raise ProbeError(f"weights {weights!r}: use auto, pretrained, demo, random, meta, a hub id or a folder")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ProbeError(f"dtype {dtype!r}: give a floating torch dtype, e.g. torch.float32 or torch.bfloat16")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ProbeError(f"device {device!r}: no CUDA device is available; use cpu")
        if config is not None and weights not in ("random", "meta", "auto"):
            raise ProbeError(f"config sizes what is built (weights random, meta or an auto fallback); weights "
                             f"{weights!r} come with their own config")
        def build(meta: bool) -> Self:
            if not meta:  # size it on the meta device first: a typo'd config must not fill the memory
                try:
                    with torch.device("meta"):
                        _fits_in_memory(cls._build(config, True), cls.name)
                except (ZeroDivisionError, TypeError, ValueError, AssertionError) as e:
                    if isinstance(e, ProbeError):
                        raise
                    raise ProbeError(f"{cls.name}: config {config} does not describe a valid model "
                                     f"({type(e).__name__}: {e})") from None
            return cls._build(config, meta)

        adapter, info = resolve(weights, name=cls.name, hub_id=cls.hub_id, auto=cls.auto, seed=seed,
                                load=cls._load, build=build)
        note = "; ".join(n for n in (info.note, adapter.weights.note if adapter.weights else "") if n)
        if info.source == "meta":
            size = "given config" if config else ("published architecture" if cls.capabilities.published
                                                  else "default config")
            info = dataclasses.replace(info, ref=f"{size}, no weights")
        adapter.weights = dataclasses.replace(info, note=note)
        adapter.model.eval()
        if cls.capture_attention is not None:
            adapter.module(cls.capture_attention).set_attn_implementation(hf_attention.register())
        return adapter.to(None if weights == "meta" else device, dtype)

    @classmethod
    @abc.abstractmethod
    def _build(cls, config: dict[str, Any] | None, meta: bool) -> Self:
        """The architecture with fresh weights: `config` (family dict) or the default/published size."""

    @classmethod
    @abc.abstractmethod
    def _load(cls, ref: str, local_only: bool) -> Self:
        """From a checkpoint folder (or a hub id, for families with published weights)."""

    @abc.abstractmethod
    def _save(self, folder: Path) -> None:
        """Write what `_load` reads into `folder` (which exists and is a staging folder)."""

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None, *, force: bool = False) -> Path:
        """Write the checkpoint to `folder` atomically (loadable with ``weights=folder``); `extra`
        (JSON facts, e.g. a training card) is merged into its config.json. A non-empty existing
        `folder` is refused unless `force` (see `probe.io.atomic_dir`)."""
        if swapped := standing_in(self.model):  # their parameters are out of the module tree meanwhile
            raise ProbeError(f"{self.name}: cannot save while a Precomputed intervention stands in for "
                             f"{', '.join(swapped)} (in another thread?); save after it ends")
        with atomic_dir(folder, force=force) as tmp:
            self._save(tmp)
            if extra:
                cfg = tmp / "config.json"
                cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **extra}, indent=2))
        return Path(folder)

    # ------------------------------------------------------------------ hooks and parameters
    @abc.abstractmethod
    def blocks(self) -> list[Block]:
        """Block templates of this model's canonical hooks."""

    def single_hooks(self) -> list[HookSpec]:
        """Hooks outside the blocks (``vision.output``, ``fusion.proj`` ...)."""
        return []

    def hook_specs(self) -> list[HookSpec]:
        """Every canonical hook this model offers, mapped to native module paths."""
        return expand(self.blocks(), self.single_hooks())

    def _groups(self) -> dict[str, list[str]]:
        raise NotImplementedError(f"{self.name} declares no parameter groups")

    def param_groups(self) -> dict[str, list[str]]:
        """Module paths per parameter group (`probe.types.PARAM_GROUPS`), for parameter accounting.

        A parameter belongs to the group of the longest declared path that contains it; every
        parameter must be covered. A path with ``{i}`` stands for every block of its stack.
        """
        depth = {b.path.split("{i}")[0]: b.depth for b in self.blocks()}

        def paths(p: str) -> list[str]:
            if "{i}" not in p:
                return [p]
            return [p.format(i=i) for i in range(depth[p.split("{i}")[0]])]

        return {g: [q for p in ps for q in paths(p)] for g, ps in self._groups().items()}

    def module(self, path: str) -> nn.Module:
        """The native module at a dotted path; a clear error when there is none."""
        try:
            return self.model.get_submodule(path)
        except AttributeError as e:
            raise KeyError(f"{self.name}: no module {path!r} in {type(self.model).__name__}") from e

    # ------------------------------------------------------------------ inputs
    @property
    def image_size(self) -> int:
        """Side in pixels of the preprocessed (square) image."""
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        raise NotImplementedError

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid."""
        g = self.image_size // self.patch_size
        return g, g

    @property
    def n_image_tokens(self) -> int:
        """Vision tokens: CLS + patches."""
        r, c = self.grid
        return 1 + r * c

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """Images -> (b, 3, H, W) with the family's image processor."""
        return self.processor(images=[to_rgb(im) for im in images], return_tensors="pt")["pixel_values"]

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """RGB PIL images -> model inputs, at least ``pixel_values`` (batch, 3, H, W)."""
        if isinstance(images, str | bytes) or not isinstance(images, Sequence) or not images:
            raise ValueError(f"give a non-empty list of PIL images (probe.load_images reads files); got {images!r:.60}")
        return {"pixel_values": self._pixels(list(images)).to(self.device, self.dtype)}

    @abc.abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Run the model on preprocessed inputs."""

    @abc.abstractmethod
    def input_meta(self, batch: dict[str, torch.Tensor]) -> InputMeta:
        """Token spans, patch grid and token strings for this batch."""

    # ------------------------------------------------------------------ facts and running
    @property
    def attn_implementation(self) -> str:
        """The attention implementation actually used, for the run manifest."""
        return "native"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Self:
        """Move the model; returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def describe(self) -> dict[str, Any]:
        """Model facts for a run manifest."""
        return {"name": self.name, "class": type(self.model).__name__, "capabilities": self.capabilities.to_dict(),
                "weights": self.weights.to_dict() if self.weights else None,
                "attn_implementation": self.attn_implementation,
                "parameters": sum(p.numel() for p in self.model.parameters())}

    def nnsight(self) -> Any:
        """An nnsight model over this model whose envoys answer to the canonical structure:
        ``m.vision.blocks[i]``, ``m.text.blocks[i]``, their ``.attn`` / ``.xattn`` and
        ``.attn.o_proj`` (whose ``.input`` is the ``attn.z`` hook), ``m.model.<native path>``.
        ``with m.trace(**self.preprocess(images, captions)):`` runs `forward` on that batch.
        See `probe.capture.envoys.canonical_model` and the README's nnsight section."""
        return envoys.canonical_model(self)

    def run_with_cache(self, images: Sequence[Image.Image], hooks: str | Sequence[str] = "*",
                       **capture_kwargs: Any) -> tuple[Any, ActivationCache]:
        """Preprocess `images`, run the model under `probe.capture.capture`; returns
        ``(output, cache)``, the cache's `meta` set to this batch's `InputMeta`."""
        batch = self.preprocess(images)
        with torch.no_grad(), capture(self, hooks, **capture_kwargs) as cache:
            out = self.forward(batch)
        cache.meta = self.input_meta(batch)
        return out, cache


def _fits_in_memory(adapter: ModelAdapter, name: str) -> None:
    """Refuse to build a model whose float32 weights alone would take most of this machine's memory."""
    need = 4 * sum(p.numel() for p in adapter.model.parameters())
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    if have and need > 0.8 * have:
        raise ProbeError(f"{name}: this config needs {need / 2**30:.1f} GiB for its weights alone, more than this "
                         f"machine's {have / 2**30:.1f} GiB allow; check its sizes (dim, depth, ...)")


class Classifier(ModelAdapter):
    """An image classifier over CLS + patch tokens: ``forward(batch) -> logits (b, classes)``."""

    @property
    @abc.abstractmethod
    def labels(self) -> list[str]:
        """Class names, index = logit column."""

    def input_meta(self, batch: dict[str, torch.Tensor]) -> InputMeta:
        s = self.image_size
        return InputMeta(spans={"cls": (0, 1), "image": (1, self.n_image_tokens)}, grid=self.grid, image_size=(s, s),
                         approximate=self.capabilities.attention_weights == "effective")


@dataclass(frozen=True)
class Specials:
    """Special token ids of a captioner: the first decoder input, end of caption, padding."""

    start: int
    eos: int
    pad: int


class TextRun(abc.ABC):
    """One whole teacher-forced forward of a captioner on `n` images, kept so that its text stack
    can be resumed at any block on other rows: the optional primitive `Captioner.text_run`.

    Sweeps of interventions that change only what some text blocks do (ablations of a layer's or
    a head's cross-attention) use it to share work between variants: the blocks below the first
    changed block are the same as in this forward, and each image's cross-attention keys and values
    depend on the image features alone (an ablation changes what the queries do with them, not
    them). Rows are given by the image they read, ``images`` (r,) long indices into the `n` images,
    and carry that image's caption ids; hooks and interventions installed on the native modules
    act on resumed blocks exactly as in a whole forward (per-row masks see the resumed batch).

    Attributes:
        logits: (n, T, vocab) teacher-forced logits of the whole forward.
        depth: number of text blocks; `Captioner.unembed` of the last block's output gives logits.
    """

    logits: torch.Tensor
    depth: int

    @abc.abstractmethod
    def hidden(self, layer: int, images: torch.Tensor) -> torch.Tensor:
        """(r, T, d): the state entering text block `layer` in the whole forward, for each row's image."""

    @abc.abstractmethod
    def block(self, layer: int, hidden: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Text block `layer` on `hidden` (r, T, d), row k reading image ``images[k]``: (r, T, d).
        The cross-attention keys and values are the whole forward's, taken per row (never recomputed)."""

    @abc.abstractmethod
    def finish_block(self, layer: int, images: torch.Tensor) -> torch.Tensor:
        """Text block `layer` resumed at its cross-attention head outputs (hook
        ``text.blocks.{layer}.xattn.z``): each row starts from its image's state there in the whole
        forward, which then enters the output projection (where `ZeroHeads` acts) and the rest of
        the block: (r, T, d). For rows whose block `layer` is unchanged before those heads. The
        rest of the block runs its submodules directly: hooks on the block module itself (e.g.
        ``text.blocks.{layer}.resid_post``) or on the cross-attention module as a whole do not
        fire for this block; use `block` where they must."""

    @abc.abstractmethod
    def shared_image_kv(self, images: torch.Tensor) -> AbstractContextManager[None]:
        """While active, every text block's cross-attention keys and values are the whole forward's
        rows of `images` instead of being computed (forwards and ``generate`` over a batch of
        len(images) rows whose row k reads image ``images[k]``); removed on exit."""


class Captioner(ModelAdapter):
    """An image captioner; the contract analyses use. Text patterns index the text tokens from
    `text_offset()` on; `flow_hook` is the pattern whose keys hold the image tokens
    (``[CLS, patches]`` at ``0 .. n_image_tokens``)."""

    #: default number of new tokens of `caption` and `generate_with_cache`; the most its positions allow
    max_new_tokens: int
    max_caption_tokens: int

    @property
    @abc.abstractmethod
    def specials(self) -> Specials: ...

    @abc.abstractmethod
    def _logits(self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Teacher-forced logits (b, T, vocab) at the text positions."""

    @abc.abstractmethod
    def _generate(self, pixel_values: torch.Tensor, max_new_tokens: int, num_beams: int, **kw: Any) -> torch.Tensor:
        """Generated ids (b, new tokens), without the start token."""

    @abc.abstractmethod
    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """The decoder's read-out applied to a residual state: ``(..., dim) -> (..., vocab)`` logits,
        through the final norm when the stack is pre-norm (GPT-2's ``ln_f``, our decoders' ``norm``)
        and the prediction head (BLIP's transform + decoder, GIT's ``output``). On the last text
        block's ``resid_post`` it gives the model's logits; on earlier blocks, the logit lens."""

    @abc.abstractmethod
    def _encode_text(self, caption: str) -> list[int]:
        """Token ids of a caption, no special tokens."""

    @abc.abstractmethod
    def _tokens(self, ids: list[int]) -> list[str]: ...

    @abc.abstractmethod
    def _text(self, ids: list[int]) -> str:
        """Caption text of ids (special tokens dropped)."""

    # ------------------------------------------------------------------ derived once
    @property
    def flow_hook(self) -> str:
        """Name template (``{i}`` = layer) of the pattern whose keys hold the image tokens."""
        return TEXT_PATTERN if self.capabilities.joint_attention else TEXT_XATTN_PATTERN

    def text_offset(self) -> int:
        """Position of the first text token in the sequence the text patterns index."""
        return self.n_image_tokens if self.capabilities.joint_attention else 0

    def preprocess(self, images: Sequence[Image.Image],
                   captions: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Images -> ``pixel_values`` (b, 3, H, W); with `captions`, `encode_captions` too."""
        batch = super().preprocess(images)
        if captions is not None:
            if isinstance(captions, str) or len(captions) != len(images):
                raise ValueError(f"give one caption per image: {len(images)} images, captions={captions!r}")
            batch.update(self.encode_captions(captions))
        return batch

    def encode_captions(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (b, T): start, caption tokens, end, right-padded."""
        sp = self.specials
        rows = [[sp.start, *self._encode_text(c), sp.eos] for c in captions]
        ids = torch.full((len(rows), max(map(len, rows))), sp.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced logits (b, T, vocab): ``logits[:, t]`` predicts ``input_ids[:, t + 1]``.
        Without ``input_ids``, the first step from the start token."""
        ids = batch.get("input_ids")
        if ids is None:
            ids = torch.full((batch["pixel_values"].shape[0], 1), self.specials.start, dtype=torch.long,
                             device=self.device)
        # no mask means every token is real (and keeps meta-device FLOP counting free of .item())
        return self._logits(batch["pixel_values"], ids, batch.get("attention_mask"))

    def token_logprobs(self, pixel_values: torch.Tensor, ids: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced log-probabilities of the caption tokens, differentiable (no ``no_grad``).

        Args:
            pixel_values: (b, 3, H, W). ids: (b, T) ``[start, tok_1, ..., tok_{T-1}]``, right-padded.
            mask: (b, T) 1 for real tokens (None: all real).

        Returns:
            (b, T - 1), float32 (float64 for float64 models): entry ``k`` is ``log p(ids[:, k + 1] | image, ids[:, :k + 1])``, the
            log-probability of the token produced at generation step ``k``; 0 where ``ids[:, k + 1]``
            is padding. Computed from raw logits (never from post-processed generation scores).
        """
        logits = self._logits(pixel_values, ids, mask)
        logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), -1)
        target = ids[:, 1:].to(logits.device)
        out = logp.gather(-1, target[..., None])[..., 0]
        if mask is not None:
            out = out * mask[:, 1:].to(out.device, out.dtype)
        return out

    def token_logits(self, pixel_values: torch.Tensor, ids: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """Like `token_logprobs`, but the raw logit of each caption token (b, T - 1) (the target
        Chefer et al. differentiate); 0 where the token is padding."""
        logits = self._logits(pixel_values, ids, mask)[:, :-1]
        out = logits.gather(-1, ids[:, 1:].to(logits.device)[..., None])[..., 0]
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        if mask is not None:
            out = out * mask[:, 1:].to(out.device, out.dtype)
        return out

    def teacher_ids(self, new: torch.Tensor, tokens: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """From `caption`'s output: ids (b, T) ``[start] + generated tokens`` up to and including the
        end token, right-padded, and their mask (b, T); ``T = 1 + longest caption``. Step ``k`` of
        the caption is position ``k + 1`` here (`token_logprobs` column ``k``)."""
        lengths = [max(1, len(t)) for t in tokens]
        t = 1 + max(lengths)
        ids = torch.full((len(lengths), t), self.specials.pad, dtype=torch.long)
        mask = torch.zeros((len(lengths), t), dtype=torch.long)
        ids[:, 0], mask[:, 0] = self.specials.start, 1
        for i, n in enumerate(lengths):
            ids[i, 1 : 1 + n] = new[i, :n].cpu()
            mask[i, : 1 + n] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image], max_new_tokens: int | None = None, num_beams: int = 1,
                **generate_kwargs: Any) -> dict[str, Any]:
        """Captions of a batch of images (greedy, or beam search where the family has it).

        Returns:
            ``{"ids": (b, new tokens), "tokens": [[str]] up to and including the end token, "text": [str]}``.
        """
        return self.caption_pixels(self.preprocess(images)["pixel_values"], max_new_tokens, num_beams,
                                   **generate_kwargs)

    @torch.no_grad()
    def caption_pixels(self, pixel_values: torch.Tensor, max_new_tokens: int | None = None, num_beams: int = 1,
                       **generate_kwargs: Any) -> dict[str, Any]:
        """`caption` from preprocessed ``pixel_values`` (b, 3, H, W)."""
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams {num_beams!r}: use a whole number >= 1")
        n = self._length(max_new_tokens)
        return self._decode(self._generate(pixel_values, n, num_beams, **generate_kwargs))

    def _length(self, max_new_tokens: int | None) -> int:
        """`max_new_tokens`, or the model's default; checked against what its positions allow."""
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        limit = self.max_caption_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
            raise ValueError(f"--max-new-tokens {n!r}: {self.name} generates 1 to {limit} tokens (its positions)")
        return n

    def _decode(self, new: torch.Tensor) -> dict[str, Any]:
        kept = generated_tokens(new, self.specials.eos, self.specials.pad, list)
        return {"ids": new, "tokens": [self._tokens(k) for k in kept], "text": [self._text(k) for k in kept]}

    @torch.no_grad()
    def generate_with_cache(
        self, images: Sequence[Image.Image], hooks: str | Sequence[str] = "*.pattern", *,
        max_new_tokens: int | None = None, heads: Any = None, reduce: HeadReduction | None = None,
        dtype: torch.dtype | None = torch.float32, device: str | torch.device | None = "cpu", **generate_kwargs: Any,
    ) -> tuple[dict[str, Any], ActivationCache]:
        """Greedy captions with the hooks matching `hooks` captured during generation; see
        `probe.capture.capture_generation` for what each call holds (text patterns: the newest query
        row of each step). Beams would reorder the batch between steps, so there are none here.

        Returns:
            (captions as `caption` returns them, cache whose ``meta`` has the generated tokens and
            a ``text`` span over them).
        """
        if generate_kwargs.get("num_beams", 1) != 1:
            raise ValueError("generate_with_cache decodes greedily: beams reorder the batch between steps, so the "
                             "captured rows would mix beams; use caption(num_beams=...) without capture")
        generate_kwargs.pop("num_beams", None)
        px = self.preprocess(images)["pixel_values"]
        n = self._length(max_new_tokens)
        with capture_generation(self, hooks, heads=heads, reduce=reduce, dtype=dtype, device=device) as cache:
            caps = self._decode(self._generate(px, n, 1, **generate_kwargs))
        cache.meta = self._meta(caps["ids"].shape[1], caps["tokens"])
        cache.step_lengths = [len(t) for t in caps["tokens"]]
        return caps, cache

    def word_steps(self, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
        """The words of a generated caption, each with the generation steps that produced it.

        `ids`: one row of ``caption(...)["ids"]`` (the new tokens; step k produced ``ids[k]``).
        Words are whitespace-separated pieces of the decoded text; a word's steps are those whose
        token added characters to it (one step per word for word-level tokenizers, one per letter
        for our character captioners, several for sub-word pieces). Found by decoding every prefix
        with the model's own decoder, so it holds for any tokenizer.
        """
        kept = generated_tokens(torch.as_tensor([list(ids)]), self.specials.eos, self.specials.pad, list)[0]
        text = self._text(kept)
        ends = [len(os.path.commonprefix([self._text(kept[: k + 1]), text])) for k in range(len(kept))]
        starts = [0, *ends[:-1]]
        return [(m.group(), [k for k in range(len(kept)) if starts[k] < m.end() and ends[k] > m.start()])
                for m in re.finditer(r"\S+", text)]

    def input_meta(self, batch: dict[str, torch.Tensor]) -> InputMeta:
        ids = batch.get("input_ids")
        if ids is None:
            return self._meta(1, None)
        mask = batch.get("attention_mask", torch.ones_like(ids))
        tokens = [self._tokens(r[m.bool()].tolist()) for r, m in zip(ids, mask, strict=True)]
        return self._meta(ids.shape[1], tokens)

    def _meta(self, n_text: int, tokens: list[list[str]] | None) -> InputMeta:
        t0, s = self.text_offset(), self.image_size
        return InputMeta(spans={"cls": (0, 1), "image": (1, self.n_image_tokens), "text": (t0, t0 + n_text)},
                         grid=self.grid, image_size=(s, s), tokens=tokens, flow_hook=self.flow_hook,
                         joint=self.capabilities.joint_attention)

    def text_run(self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> TextRun:
        """Optional primitive: a whole teacher-forced forward (as `forward`) whose text stack can be
        resumed at any block (see `TextRun`). pixel_values (n, 3, H, W); ids, mask (n, T).

        Families whose text decoder is a stack of blocks reading the image through cross-attention
        provide it (BLIP, ViT-GPT2). The others raise NotImplementedError (joint attention, where
        the image tokens live in the text stream, and our character decoders): callers then run
        whole forwards.
        """
        raise NotImplementedError(f"{self.name}: no resumable text stack (Captioner.text_run); run whole forwards")

    def mask_image_tokens(self, removed: torch.Tensor | None = None) -> list[Intervention]:
        """Interventions that remove image tokens from everything the text attends to.

        `removed`: bool (batch, n_image_tokens), True = removed, over [CLS, patches]; None removes
        all. A removed token gets exactly zero attention; a query left with no key reads nothing.
        """
        tokens: Any = list(range(self.n_image_tokens)) if removed is None else removed
        return [MaskTokens(tokens, attention=self.flow_hook.format(i="*"))]
