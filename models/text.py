"""Character-level text for our own captioners: a tokenizer, a training loop, greedy decoding."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    """Greedy decoding from ``<bos>``: `step_logits(ids (batch, t)) -> (batch, t, vocab)`; ``<eos>``
    is not chosen before `min_new_tokens` steps.

    Returns (batch, 1 + generated) ids; finished rows are padded with ``<pad>`` after ``<eos>``.
    """
    ids = torch.full((batch, 1), CharTokenizer.bos_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = step_logits(ids)[:, -1]
        if step < min_new_tokens:
            logits[:, CharTokenizer.eos_id] = -torch.inf
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, CharTokenizer.pad_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == CharTokenizer.eos_id
        if done.all():
            break
    return ids


class EncodeDecodeCaptioner(nn.Module):
    """Base of our captioners: subclasses define `encode_image` and `decode`; this gives the
    teacher-forced `forward` and greedy `generate`. ``cfg.max_len`` bounds the text length."""

    cfg: Any

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, image_tokens: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_length(self, input_ids: torch.Tensor) -> int:
        nt = input_ids.shape[1]
        if nt > self.cfg.max_len:
            raise ValueError(f"text of {nt} tokens exceeds max_len {self.cfg.max_len}")
        return nt

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W), (b, T) -> next-token logits (b, T, vocab)."""
        return self.decode(self.encode_image(pixel_values), input_ids)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int = 32, min_new_tokens: int = 0) -> torch.Tensor:
        """Greedy ids (b, 1 + generated), starting at ``<bos>``; the image is encoded once."""
        image_tokens = self.encode_image(pixel_values)
        return greedy_generate(lambda ids: self.decode(image_tokens, ids), pixel_values.shape[0],
                               min(max_new_tokens, self.cfg.max_len - 1), pixel_values.device, min_new_tokens)
