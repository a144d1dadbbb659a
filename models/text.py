"""Character-level text for our own captioners: a tokenizer, a training loop, greedy decoding."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from probe.capture.engine import standing_in, uncached

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


class CharTokenizer:
    """Characters of a corpus plus ``<pad>`` (0), ``<bos>`` (1) and ``<eos>`` (2).

    Unknown characters raise: a caption model should never silently drop letters.
    """

    def __init__(self, chars: Iterable[str]) -> None:
        chars = sorted(set(chars) - {PAD, BOS, EOS})
        if any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer takes single characters")
        self.itos = [PAD, BOS, EOS, *chars]
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def from_corpus(cls, texts: Iterable[str]) -> CharTokenizer:
        return cls(c for t in texts for c in t)

    pad_id, bos_id, eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, *, bos: bool = True, eos: bool = True) -> list[int]:
        bad = sorted({c for c in text if c not in self.stoi})
        if bad:
            raise ValueError(f"characters {bad} are not in this tokenizer's vocabulary")
        return ([self.bos_id] if bos else []) + [self.stoi[c] for c in text] + ([self.eos_id] if eos else [])

    def batch(self, texts: Sequence[str]) -> torch.Tensor:
        """(batch, longest + 2) ids, ``<bos> text <eos>`` right-padded with ``<pad>``."""
        ids = [self.encode(t) for t in texts]
        out = torch.full((len(ids), max(map(len, ids))), self.pad_id, dtype=torch.long)
        for i, row in enumerate(ids):
            out[i, : len(row)] = torch.tensor(row)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(self.itos[i])
        return "".join(out)

    def tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"type": "char", "itos": self.itos}))

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        d = json.loads(Path(path).read_text())
        if d.get("type") != "char" or d["itos"][:3] != [PAD, BOS, EOS]:
            raise ValueError(f"{path} is not a probe character tokenizer")
        return cls(d["itos"][3:])


@torch.no_grad()
def greedy_generate(
    step_logits: Callable[[torch.Tensor], torch.Tensor], batch: int, max_new_tokens: int, device: torch.device,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """Greedy decoding from ``<bos>``: `step_logits(ids (batch, t)) -> (batch, t', vocab)` whose last
    position predicts the next token (t' = t re-running the prefix, or the new positions only with a
    key/value cache); ``<eos>`` is not chosen before `min_new_tokens` steps.

    Returns (batch, 1 + generated) ids; finished rows are padded with ``<pad>`` after ``<eos>``.
    """
    return greedy_decode(step_logits, batch, max_new_tokens, device, min_new_tokens)[0]


@torch.no_grad()
def greedy_decode(
    step_logits: Callable[[torch.Tensor], torch.Tensor], batch: int, max_new_tokens: int, device: torch.device,
    min_new_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`greedy_generate` that also returns each step's logits (batch, steps, vocab), as the model
    gave them (before ``<eos>`` is barred by `min_new_tokens`); finished rows keep being computed
    (on ``<pad>`` inputs), so every row of the batch has a logit row at every step."""
    ids = torch.full((batch, 1), CharTokenizer.bos_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    scores: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = step_logits(ids)[:, -1].clone()  # a copy: holds no step's whole output alive
        scores.append(logits)
        if step < min_new_tokens:
            logits = logits.clone()
            logits[:, CharTokenizer.eos_id] = -torch.inf
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, CharTokenizer.pad_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == CharTokenizer.eos_id
        if done.all():
            break
    empty = torch.zeros(batch, 0, 0, device=device)
    return ids, (torch.stack(scores, dim=1) if scores else empty)


def keep_extends(old: torch.Tensor | None, new: torch.Tensor | None, n_old: int) -> bool:
    """Whether the key mask `new` (batch, n_new) equals `old` (batch, n_old) on the first `n_old`
    keys (None: every key kept): then whatever was computed under `old` is still valid."""
    if old is None and new is None:
        return True
    if new is None:
        return bool(old.all())
    head = new[:, :n_old]
    return bool(head.all()) if old is None else head.shape == old.shape and torch.equal(head, old.to(head.device))


class DecoderCache:
    """Key/value cache of one generate call of an `EncodeDecodeCaptioner` decoder.

    ``layers[i]`` is block i's dict: its keys and values (batch, heads, positions, head_dim) and
    whatever else the family keeps (MMCA: its visual stream, which does not depend on the text),
    plus the key masks of interventions (`probe.capture.sites.key_keep`) they were computed under.
    ``n_text`` text positions (``ids``, (batch, n_text)) are held, all computed from ``image``.
    """

    def __init__(self, depth: int) -> None:
        self.layers: list[dict[str, Any]] = [{} for _ in range(depth)]
        self.n_text = 0
        self.ids: torch.Tensor | None = None
        self.image: torch.Tensor | None = None
        self.refills = 0  # times a changed key mask made the cache start over

    def reset(self) -> None:
        """Forget every position (the next call recomputes the image side and all the text)."""
        for layer in self.layers:
            layer.clear()
        self.n_text, self.ids, self.image = 0, None, None

    def start(self, image_tokens: torch.Tensor, input_ids: torch.Tensor) -> int:
        """The first text position the call (`image_tokens`, `input_ids` (batch, T)) must compute:
        0 for an empty cache, else ``n_text``. Raises unless the call extends what is held."""
        if self.n_text == 0:
            return 0
        if image_tokens is not self.image:
            raise ValueError("this decoder cache was filled for other image tokens; use a new cache per generate call")
        if input_ids.shape[1] <= self.n_text or not torch.equal(input_ids[:, : self.n_text], self.ids):
            raise ValueError(f"this decoder cache holds {self.n_text} text positions that input_ids "
                             f"{tuple(input_ids.shape)} does not extend; use a new cache per generate call")
        return self.n_text

    def hold(self, image_tokens: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Record that every position of `input_ids` is now cached."""
        self.image, self.ids, self.n_text = image_tokens, input_ids, input_ids.shape[1]


class EncodeDecodeCaptioner(nn.Module):
    """Base of our captioners: subclasses define `encode_image` and `decode` (which takes an
    optional `DecoderCache`); this gives the teacher-forced `forward` and greedy `generate`.
    ``cfg.max_len`` bounds the text length, ``cfg.depth`` is the number of decoder blocks."""

    cfg: Any
    #: top-level modules of the image side (run once per generate call, outside the cache)
    image_modules: tuple[str, ...] = ("vision", "proj")

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, image_tokens: torch.Tensor, input_ids: torch.Tensor,
               cache: DecoderCache | None = None) -> torch.Tensor:
        """(b, n_image, d), (b, T) -> logits (b, T, vocab); with `cache`, logits of the positions
        not yet cached only (b, T - cache.n_text, vocab), and the cache then holds all T."""
        raise NotImplementedError

    def check_length(self, input_ids: torch.Tensor) -> int:
        nt = input_ids.shape[1]
        if nt > self.cfg.max_len:
            raise ValueError(f"text of {nt} tokens exceeds max_len {self.cfg.max_len}")
        return nt

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W), (b, T) -> next-token logits (b, T, vocab)."""
        return self.decode(self.encode_image(pixel_values), input_ids)

    def can_cache(self) -> bool:
        """Whether generation may use a key/value cache now: not while an intervention of this
        thread needs every step to re-run the prefix (`probe.capture.uncached`: a `Patch` on a text
        hook), nor while a `Precomputed` stands in for a decoder module (it answers for whole calls)."""
        return not uncached(self) and all(p.split(".")[0] in self.image_modules for p in standing_in(self))

    def new_cache(self) -> DecoderCache:
        return DecoderCache(self.cfg.depth)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int = 32, min_new_tokens: int = 0,
                 *, use_cache: bool = True) -> torch.Tensor:
        """Greedy ids (b, 1 + generated), starting at ``<bos>``; see `generate_logits`."""
        return self.generate_logits(pixel_values, max_new_tokens, min_new_tokens, use_cache=use_cache)[0]

    @torch.no_grad()
    def generate_logits(self, pixel_values: torch.Tensor, max_new_tokens: int = 32, min_new_tokens: int = 0,
                        *, use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy ids (b, 1 + generated) and each step's logits (b, generated, vocab).

        The image is encoded once. With `use_cache` (and `can_cache`) every step after the first
        runs the decoder on the newest token only, reading earlier keys and values from a
        `DecoderCache` (cost linear in the caption length); otherwise every step re-runs the whole
        prefix. Both give the same ids and, to float rounding, the same logits.
        """
        image_tokens = self.encode_image(pixel_values)
        cache = self.new_cache() if use_cache and self.can_cache() else None
        return greedy_decode(lambda ids: self.decode(image_tokens, ids, cache), pixel_values.shape[0],
                             min(max_new_tokens, self.cfg.max_len - 1), pixel_values.device, min_new_tokens)
