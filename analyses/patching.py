"""Activation patching and causal tracing: where does a word's image evidence live, layer by layer?

A *clean* image and a *corrupted* one with the same layout differ in one object: its colour or its
shape changed (`probe.data.shapes.counterfactual`), or, following Meng et al. 2022 ("Locating and
editing factual associations in GPT", causal tracing), Gaussian noise of `noise_scale` standard
deviations of the patch embeddings added to that object's patch embeddings (the input of the first
vision block). The clean greedy caption is teacher-forced in every run, and the score is the
log-probability of the word that names the object's clean attribute (the sum over its tokens).
Clean activations are then patched into the corrupted run (`probe.capture.Patch`), one (layer,
token group) at a time, and the *recovery* is

    (patched - corrupt) / (clean - corrupt)

per pair (1: the patched activations carry everything the word needs; 0: nothing), averaged over
the pairs whose clean-corrupt gap is at least `min_gap` nats (a smaller gap makes the ratio noise).
Following Heimersheim & Nanda 2024 ("How to use and interpret activation patching"), this is
*denoising* (clean into corrupt): a high recovery says the patched positions are sufficient.

Token groups, in token coordinates of each stack's ``resid_post``:

- vision stack: ``object`` (the patches any changed pixel falls in), ``others`` (as many patches
  drawn at random, seeded, from the patches no changed pixel touches), ``cls``, ``all``;
- text stack: ``prefix`` (the caption positions before the word), ``last`` (the position whose
  output predicts the word's first token), ``word`` (the word's own positions, which predict its
  later tokens: empty for single-token words), ``all``; in families whose image tokens sit in the
  text stack (GIT, the prefix VLM) also ``object``, ``others`` and ``cls`` at the image positions.

Per-head patching: each head of the text stack's cross-attention output (``xattn.z``; the joint
attention's ``attn.z`` at the text positions where there is no cross-attention), patched alone at
every text position. All variants of a pair run as rows of batched forwards (per-row token and
head masks of `Patch`); ``loop=True`` runs one forward per variant, the reference the batched path
must equal.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from probe.adapter import Captioner
from probe.analyses.grounding import patch_coverage
from probe.analysis import Analysis, ParamError, param, to_params
from probe.capture import Intervention, Patch, Replace, capture, intervene
from probe.data import ImageSet, images_to_uint8
from probe.data.shapes import counterfactual
from probe.registry import register_analysis
from probe.runs.results import Result
from probe.types import ProbeError
from probe.viz.figures import grid, no_ticks

log = logging.getLogger(__name__)

CORRUPTIONS = ("colour", "shape", "noise")
VISION_GROUPS = ("object", "others", "cls", "all")
TEXT_GROUPS = ("prefix", "last", "word", "all")
IMAGE_GROUPS = ("object", "others", "cls")
NOISE_HOOK = "vision.blocks.0.resid_pre"


@dataclass(frozen=True)
class Pair:
    """A clean image and a corrupted one with the same layout.

    `region`: bool (H, W) at the clean image's resolution, the pixels the corruption changed (or
    the object the noise covers): it defines the ``object`` group. `word` is scored at its
    `nth` occurrence (0-based) among the words of the clean greedy caption. `noise`: corrupt by
    Gaussian noise on the region's patch embeddings instead of by `corrupt`'s pixels (then
    `corrupt` is the clean image).
    """

    clean: Image.Image
    corrupt: Image.Image
    region: np.ndarray
    word: str
    nth: int = 0
    name: str = "pair"
    noise: bool = False

    def __post_init__(self) -> None:
        if self.clean.size != self.corrupt.size:
            raise ProbeError(f"pair {self.name}: the clean image is {self.clean.size[0]}x{self.clean.size[1]} but the "
                             f"corrupted one is {self.corrupt.size[0]}x{self.corrupt.size[1]}: a patching pair shares "
                             "one layout, so give two images of the same size")
        region = np.asarray(self.region)
        if region.dtype != bool or region.shape != (self.clean.size[1], self.clean.size[0]):
            raise ProbeError(f"pair {self.name}: region must be a bool mask of the image's size "
                             f"({self.clean.size[1]}, {self.clean.size[0]}); got {region.dtype} {region.shape}")
        if not region.any():
            raise ProbeError(f"pair {self.name}: the region is empty: it must cover the changed object")
        if not isinstance(self.nth, int) or self.nth < 0:
            raise ProbeError(f"pair {self.name}: nth {self.nth!r} must be a whole number >= 0 (which occurrence)")
        if not self.word.strip(".,;:!?") or len(self.word.split()) != 1:
            raise ProbeError(f"pair {self.name}: word {self.word!r} must be one word of the caption")


def shapes_pairs(images: ImageSet, corruption: str) -> list[Pair]:
    """One pair per probe-shapes image: object ``i mod objects`` of image i changes (its colour or
    shape to the next one, or noise on its patches); the word scored is that object's clean colour
    (shape for ``shape``) at the occurrence an exact caption would name it."""
    if images.samples is None:
        raise ProbeError("patching needs probe-shapes images (their layout makes the corrupted twin): use --shapes N")
    pairs = []
    for i, (name, sample) in enumerate(zip(images.names, images.samples, strict=True)):
        k = i % len(sample.objects)
        attr = "shape" if corruption == "shape" else "colour"
        obj = sample.objects[k]
        word = getattr(obj, attr)
        nth = sum(getattr(o, attr) == word for o in sample.objects[:k])
        if corruption == "noise":
            pairs.append(Pair(sample.image, sample.image, sample.masks[k], word, nth, name, noise=True))
            continue
        twin = counterfactual(sample, k, attr)
        region = sample.masks[k] | twin.masks[k] | np.any(np.asarray(sample.image) != np.asarray(twin.image), -1)
        pairs.append(Pair(sample.image, twin.image, region, word, nth, name))
    return pairs


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Where the groups of one pair sit: positions per (stack, group) in that stack's tokens."""

    vision: dict[str, list[int]]
    text: dict[str, list[int]]
    steps: list[int]  # caption steps whose log-probs make the word


def _word_steps(adapter: Captioner, new_ids: Sequence[int], word: str, nth: int) -> list[int] | None:
    seen = 0
    for w, steps in adapter.word_steps(new_ids):
        if w.strip(".,;:!?").lower() == word.strip(".,;:!?").lower():
            if seen == nth:
                return steps or None
            seen += 1
    return None


def _layout(adapter: Captioner, region: np.ndarray, steps: list[int], n_text: int,
            rng: np.random.Generator) -> Layout:
    cover = patch_coverage(region, adapter.grid) > 0
    obj = [1 + int(p) for p in np.flatnonzero(cover)]
    free = np.flatnonzero(~cover)
    others = [1 + int(p) for p in np.sort(rng.choice(free, size=min(len(obj), len(free)), replace=False))]
    n_img = adapter.n_image_tokens
    vision = {"object": obj, "others": others, "cls": [0], "all": list(range(n_img))}
    t0 = adapter.text_offset()
    text = {"prefix": [t0 + p for p in range(steps[0])], "last": [t0 + steps[0]],
            "word": [t0 + s for s in steps[1:]], "all": list(range(t0 + n_text))}
    if adapter.capabilities.joint_attention:
        text.update({"object": obj, "others": others, "cls": [0]})
    return Layout(vision, text, steps)


# ----------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One patched run: each of `hooks` patched at `group`'s positions in its stream (and only
    `head`, if set). Several hooks where one layer's state is split: MMCA's decoder carries a
    visual stream (``vresid_post``) next to the text one (``resid_post``), and ``all`` is both."""

    stack: str
    layer: int
    group: str
    hooks: tuple[str, ...]
    head: int | None = None


def stack_layers(adapter: Captioner) -> dict[str, list[int]]:
    """Layers with a ``resid_post`` hook per stack (``vision``, ``text``)."""
    out: dict[str, list[int]] = {"vision": [], "text": []}
    for s in adapter.hook_specs():
        for stack in out:
            if s.name.startswith(f"{stack}.blocks.") and s.name.endswith(".resid_post"):
                out[stack].append(s.layer)
    return out


def head_hooks(adapter: Captioner) -> dict[int, str]:
    """Per text layer, the per-head hook patched head by head: ``xattn.z`` where the family has a
    cross-attention, else the joint attention's ``attn.z``."""
    names = {s.name for s in adapter.hook_specs()}
    out = {}
    for i in stack_layers(adapter)["text"]:
        for cand in (f"text.blocks.{i}.xattn.z", f"text.blocks.{i}.attn.z"):
            if cand in names:
                out[i] = cand
                break
    return out


def _has_visual_stream(adapter: Captioner) -> bool:
    return any(s.name.endswith(".vresid_post") for s in adapter.hook_specs())


def groups_of(adapter: Captioner, stack: str) -> tuple[str, ...]:
    """Token groups of a stack: image groups in the text stack where image tokens sit in it (GIT,
    the prefix VLM) or beside it (MMCA's visual stream)."""
    if stack == "vision":
        return VISION_GROUPS
    if adapter.capabilities.joint_attention or _has_visual_stream(adapter):
        return (*IMAGE_GROUPS, *TEXT_GROUPS)
    return TEXT_GROUPS


def _csv(spec: str, what: str) -> list[str] | None:
    if spec.strip() == "all":
        return None
    items = [x.strip() for x in spec.split(",")]
    if not spec.strip() or not all(items):
        raise ParamError(f"--{what} {spec!r}: give a comma-separated list without empty items, or all")
    if len(set(items)) != len(items):
        raise ParamError(f"--{what} {spec!r} names an item twice")
    return items


def plan(adapter: Captioner, params: PatchingParams,
         check_layers: bool = True) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """The layers and groups to patch per stack, checked against what the family has (layers only
    with `check_layers`: a model built from its published config may have other depths than the
    checkpoint that runs)."""
    stacks = ["vision", "text"] if params.stack == "both" else [params.stack]
    have = stack_layers(adapter)
    layers: dict[str, list[int]] = {}
    groups: dict[str, list[str]] = {}
    want_layers = _csv(params.layers, "layers")
    want_groups = _csv(params.groups, "groups")
    for st in stacks:
        if not have[st]:
            raise ParamError(f"--stack {st}: {adapter.name} has no {st} blocks with resid_post hooks")
        if want_layers is None or not check_layers:
            layers[st] = have[st]
        else:
            try:
                picked = [int(x) for x in want_layers]
            except ValueError:
                raise ParamError(f"--layers {params.layers!r}: give layer numbers, e.g. 0,2, or all") from None
            bad = [x for x in picked if x not in have[st]]
            if bad:
                where = " and ".join(f"{s} layers {have[s][0]}-{have[s][-1]}" for s in stacks)
                hint = " (or give --stack to patch one stack)" if len(stacks) > 1 else ""
                raise ParamError(f"--layers {','.join(map(str, bad))}: {adapter.name} has {where}{hint}")
            layers[st] = picked
        own = groups_of(adapter, st)
        if want_groups is None:
            groups[st] = list(own)
        else:
            known = set(VISION_GROUPS) | set(TEXT_GROUPS)
            unknown = [g for g in want_groups if g not in known]
            if unknown:
                raise ParamError(f"--groups {','.join(unknown)}: unknown; groups are {', '.join(sorted(known))}")
            groups[st] = [g for g in want_groups if g in own]
    if want_groups is not None:
        lacking = [g for g in want_groups if not any(g in groups[st] for st in stacks)]
        if lacking:
            where = "; ".join(f"{st}: {', '.join(groups_of(adapter, st))}" for st in stacks)
            raise ParamError(f"--groups {','.join(lacking)}: {adapter.name} has no such token group in the patched "
                             f"stacks ({where})")
    return layers, groups


def _hooks(adapter: Captioner, stack: str, layer: int, group: str) -> tuple[str, ...]:
    resid = f"{stack}.blocks.{layer}.resid_post"
    if stack == "text" and _has_visual_stream(adapter):
        vis = f"text.blocks.{layer}.vresid_post"
        return {"all": (resid, vis), **dict.fromkeys(IMAGE_GROUPS, (vis,))}.get(group, (resid,))
    return (resid,)


def variants(adapter: Captioner, layers: dict[str, list[int]], groups: dict[str, list[str]],
             heads: bool) -> list[Variant]:
    out = [Variant(st, i, g, _hooks(adapter, st, i, g)) for st in layers for i in layers[st] for g in groups[st]]
    if heads and "text" in layers:
        hh = head_hooks(adapter)
        specs = {s.name: s for s in adapter.hook_specs()}
        out += [Variant("heads", i, f"head {h}", (hh[i],), h) for i in layers["text"]
                if i in hh and specs[hh[i]].calls == 1 for h in range(specs[hh[i]].n_heads or 0)]
    return out


# ----------------------------------------------------------------------------- running
def _positions(v: Variant, hook: str, lay: Layout, adapter: Captioner) -> list[int]:
    """Positions `v` patches in `hook`'s tokens."""
    if v.stack == "vision" or hook.endswith(".vresid_post"):  # the visual stream is indexed as the vision tokens
        return lay.vision[v.group]
    if v.stack == "text":
        return lay.text[v.group]
    return [p for p in lay.text["all"] if p >= adapter.text_offset()]  # heads: every text position


def _live(v: Variant, lay: Layout, adapter: Captioner) -> bool:
    return any(_positions(v, h, lay, adapter) for h in v.hooks)


def _word_logprob(adapter: Captioner, px: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  steps: list[int]) -> torch.Tensor:
    """(rows,) the word's log-probability (sum over its steps) for each row of a batch."""
    return adapter.token_logprobs(px, ids, mask)[:, steps].sum(-1)


@torch.no_grad()
def _patched(adapter: Captioner, rows: Sequence[Variant], lay: Layout, clean: dict[str, torch.Tensor],
             px: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, base: list[Intervention],
             loop: bool) -> torch.Tensor:
    """The word's log-prob under each variant of `rows`: one batched forward (per-row masks), or
    one forward per variant when `loop`."""
    if loop:
        out = []
        for v in rows:
            ivs = [Patch(h, clean[h], tokens=_positions(v, h, lay, adapter),
                         heads=None if v.head is None else [v.head]) for h in v.hooks]
            with intervene(adapter, [*base, *ivs]):
                out.append(_word_logprob(adapter, px, ids, mask, lay.steps))
        return torch.cat(out)
    b = len(rows)
    ivs: list[Intervention] = list(base)
    for hook in dict.fromkeys(h for v in rows for h in v.hooks):
        n_tok = clean[hook].shape[1]
        tokens = torch.zeros(b, n_tok, dtype=torch.bool)
        head_rows = [r for r, v in enumerate(rows) if hook in v.hooks and v.head is not None]
        heads = None
        if head_rows:
            n_heads = next(s.n_heads for s in adapter.hook_specs() if s.name == hook)
            heads = torch.zeros(b, n_heads, dtype=torch.bool)
        for r, v in enumerate(rows):
            if hook not in v.hooks:
                continue
            tokens[r, _positions(v, hook, lay, adapter)] = True
            if heads is not None:
                if v.head is None:
                    heads[r] = True
                else:
                    heads[r, v.head] = True
        ivs.append(Patch(hook, clean[hook], tokens=tokens, heads=heads))
    with intervene(adapter, ivs):
        return _word_logprob(adapter, px.expand(b, -1, -1, -1), ids.expand(b, -1), mask.expand(b, -1), lay.steps)


def _noise(adapter: Captioner, px: torch.Tensor, lay: Layout, sigma: float, scale: float,
           seed: int) -> list[Intervention]:
    """Meng et al.'s corruption: N(0, (scale * sigma)^2) added to the object's patch embeddings."""
    with torch.no_grad(), capture(adapter, NOISE_HOOK) as cache:
        adapter.forward({"pixel_values": px})
    emb = cache[NOISE_HOOK]
    g = torch.Generator().manual_seed(seed)
    noise = torch.zeros(emb.shape[1:], dtype=torch.float32)
    noise[lay.vision["object"]] = torch.randn(len(lay.vision["object"]), emb.shape[-1], generator=g) * scale * sigma
    return [Replace(NOISE_HOOK, lambda x: x + noise.to(x.device, x.dtype))]


def _embedding_std(adapter: Captioner, pixel_values: torch.Tensor) -> float:
    """Standard deviation of the patch embeddings (input of the first vision block, CLS excluded)."""
    with torch.no_grad(), capture(adapter, NOISE_HOOK) as cache:
        adapter.forward({"pixel_values": pixel_values})
    return float(cache[NOISE_HOOK][:, 1:].float().std())


@dataclass(frozen=True)
class PairScores:
    clean: float
    corrupt: float
    patched: np.ndarray  # (variants,)
    caption: str
    skipped: str = ""


def trace_pair(adapter: Captioner, pair: Pair, vs: Sequence[Variant], *, sigma: float | None = None,
               noise_scale: float = 3.0, seed: int = 0, batch_size: int = 64, loop: bool = False,
               max_new_tokens: int | None = None) -> PairScores:
    """Clean, corrupted and patched log-probabilities of `pair`'s word under each variant of `vs`."""
    px = adapter.preprocess([pair.clean, pair.corrupt])["pixel_values"]
    clean_px, corrupt_px = px[:1], px[1:]
    caps = adapter.caption_pixels(clean_px, max_new_tokens)
    steps = _word_steps(adapter, caps["ids"][0].tolist(), pair.word, pair.nth)
    if steps is None:
        return PairScores(np.nan, np.nan, np.full(len(vs), np.nan), caps["text"][0],
                          skipped=f"the clean caption {caps['text'][0]!r} does not name {pair.word!r} "
                                  f"(occurrence {pair.nth})")
    ids, mask = adapter.teacher_ids(caps["ids"], caps["tokens"])
    lay = _layout(adapter, pair.region, steps, ids.shape[1], np.random.default_rng(seed))
    base: list[Intervention] = []
    if pair.noise:
        base = _noise(adapter, clean_px, lay, sigma if sigma is not None else _embedding_std(adapter, clean_px),
                      noise_scale, seed)
    hooks = sorted({h for v in vs for h in v.hooks})
    with torch.no_grad(), capture(adapter, hooks) as cache:
        clean = float(_word_logprob(adapter, clean_px, ids, mask, steps))
    sources = {h: cache[h] for h in hooks}
    with torch.no_grad(), intervene(adapter, base):
        corrupt = float(_word_logprob(adapter, corrupt_px, ids, mask, steps))
    live = [v for v in vs if _live(v, lay, adapter)]  # e.g. no `word` positions for a one-token word
    patched = [_patched(adapter, live[k : k + batch_size], lay, sources, corrupt_px, ids, mask, base, loop)
               for k in range(0, len(live), batch_size)]
    values = iter(torch.cat(patched).float().cpu().tolist() if patched else [])
    out = np.array([next(values) if _live(v, lay, adapter) else np.nan for v in vs])
    return PairScores(clean, corrupt, out, caps["text"][0])


# ----------------------------------------------------------------------------- the analysis
@dataclass(frozen=True)
class PatchingParams:
    corruption: str = param("colour", "what differs between clean and corrupted: one object's colour, its shape, "
                            "or Gaussian noise on its patch embeddings (Meng et al.)", choices=CORRUPTIONS)
    stack: str = param("both", "which stacks to patch", choices=("vision", "text", "both"))
    layers: str = param("all", "layers to patch, e.g. 0,2 (all: every layer of each patched stack)")
    groups: str = param("all", "token groups to patch: object, others, cls, prefix, last, word, all")
    heads: bool = param(True, "also patch each head of the text stack's (cross-)attention output alone, at every "
                        "text position (--no-heads: skip)")
    noise_scale: float = param(3.0, "noise corruption: standard deviations of the patch embeddings", min=0.0)
    min_gap: float = param(0.5, "pairs whose clean - corrupt log-prob gap is below this many nats are not "
                           "averaged (their recovery ratio is noise)", min=0.0)
    max_new_tokens: int | None = param(None, "length of the clean caption (default: the model's)", min=1)
    batch_size: int = param(64, "patched variants per forward", min=1)
    loop: bool = param(False, "one forward per variant (the reference the batched path equals)")
    draw_seed: int = param(0, "seed of the noise and of the 'others' patches (pair k uses draw_seed + k)", min=0)


@dataclass(frozen=True)
class PatchingResult(Result):
    """Recovery per (layer, token group) and per head; see `probe.analyses.patching`.

    Fields: model, corruption, image_names (one per pair), pairs (per pair: name, word, nth,
    caption, clean, corrupt, gap, used, skipped), variants (stack, layer, group, hook, head),
    grids (array name -> {title, rows, cols, value}: the labelled 2-D arrays the app draws).
    Arrays: ``recovery.vision`` / ``recovery.text`` (layers, groups) and ``recovery.heads``
    (layers, heads): mean recovery over the used pairs (NaN where nothing was patched);
    ``pairs.recovery`` (pairs, variants); ``logprob.clean``, ``logprob.corrupt`` (pairs);
    ``input.clean``, ``input.corrupt`` (pairs, H, W, 3) uint8; ``region`` (pairs, H, W) bool.
    """

    kind: ClassVar[str] = "patching"
    schema_version: ClassVar[int] = 1
    nan_padded: ClassVar[tuple[str, ...]] = ("recovery.vision", "recovery.text", "recovery.heads", "pairs.recovery",
                                             "logprob.clean", "logprob.corrupt")
    model: str = ""
    corruption: str = ""
    image_names: list[str] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    variants: list[dict[str, Any]] = field(default_factory=list)
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)


def recovery(patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray) -> np.ndarray:
    """(patched - corrupt) / (clean - corrupt), broadcast over trailing variant axes: patched
    (pairs, variants), clean and corrupt (pairs,)."""
    gap = (clean - corrupt)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (patched - corrupt[:, None]) / gap


def _grid(vs: list[Variant], values: np.ndarray, stack: str) -> tuple[np.ndarray, list[str], list[str]]:
    mine = [(k, v) for k, v in enumerate(vs) if v.stack == stack]
    rows = list(dict.fromkeys(v.layer for _, v in mine))
    cols = list(dict.fromkeys(v.group for _, v in mine))
    out = np.full((len(rows), len(cols)), np.nan)
    for k, v in mine:
        out[rows.index(v.layer), cols.index(v.group)] = values[k]
    return out, [f"layer {r}" for r in rows], cols


class Patching(Analysis):
    name = "patching"
    summary = "activation patching / causal tracing: where a colour or shape word's image evidence is restored"
    Params = PatchingParams
    task = "caption"
    requires = ("vision.blocks.*.resid_post",)
    needs_masks = True
    needs_masks_because = "builds each corrupted twin from the image's annotated layout and object masks"
    checks_architecture = True
    default_images = "shapes"
    default_task = "caption"

    def check_architecture(self, adapter: Any, params: PatchingParams) -> str | None:
        why = self.check_hooks(adapter.name, adapter.hook_specs())
        if why:
            return why
        try:
            plan(adapter, params, check_layers=False)  # the checkpoint that runs may be deeper: layers after loading
        except ParamError as e:
            return str(e)
        return None

    def resolve(self, adapter: Any, params: PatchingParams) -> PatchingParams:
        plan(adapter, params)  # names the problem before any work
        return params

    def run(self, adapter: Captioner, inputs: ImageSet, params: PatchingParams) -> PatchingResult:
        return trace(adapter, shapes_pairs(inputs, params.corruption), params)

    def render(self, result: PatchingResult) -> dict[str, Figure]:
        return render_patching(result)

    def summary_lines(self, result: PatchingResult) -> list[str]:
        used = sum(p["used"] for p in result.pairs)
        lines = [f"{result.model}, {result.corruption} corruption: {used} of {len(result.pairs)} pairs used"]
        why = Counter(p["skipped"] for p in result.pairs if not p["used"])
        lines += [f"  {n} not used: {reason}" for reason, n in why.most_common(3)]
        for name, g in result.grids.items():
            arr = result.arrays[name].numpy().copy()
            if "all" in g["cols"]:  # every position is the trivial best; say which part is
                arr[:, g["cols"].index("all")] = np.nan
            if not np.isfinite(arr).any():
                continue
            r, c = np.unravel_index(np.nanargmax(arr), arr.shape)
            lines.append(f"  {g['title']}: best {g['rows'][r]} / {g['cols'][c]} recovers {arr[r, c]:.2f}")
        return lines


def trace(adapter: Captioner, pairs: Sequence[Pair], params: PatchingParams | None = None,
          **kwargs: Any) -> PatchingResult:
    """Patching on your own pairs (`Pair`: two images of one size, the changed region, the word),
    with the analysis's parameters as keywords (``stack="text", heads=False`` ...); pairs with
    ``noise=True`` are corrupted by noise on the region's patch embeddings. The probe-shapes route
    (`probe run patching`) builds its pairs with `shapes_pairs` and calls this."""
    if not isinstance(adapter, Captioner):
        raise ProbeError(f"patching scores a caption word: {getattr(adapter, 'name', adapter)!r} is not a captioner")
    params = to_params(PatchingParams, {**dataclasses.asdict(params), **kwargs} if params else kwargs)
    if not pairs:
        raise ProbeError("patching needs at least one pair")
    if (params.corruption == "noise") != all(p.noise for p in pairs):
        raise ProbeError("corruption='noise' goes with pairs made with noise=True (and only with them): say which "
                         "corruption your pairs carry (colour, shape) or build them with noise=True")
    layers, groups = plan(adapter, params)
    vs = variants(adapter, layers, groups, params.heads)
    specs = {s.name: s for s in adapter.hook_specs()}
    repeated = [h for i, h in head_hooks(adapter).items() if i in layers.get("text", []) and specs[h].calls != 1]
    if params.heads and repeated:
        log.info("%s: no per-head patching of %s: that module runs %d times per forward (one call per stream), so "
                 "one source cannot patch it", adapter.name, ", ".join(repeated), specs[repeated[0]].calls)
    sigma = None
    if any(p.noise for p in pairs):
        sigma = _embedding_std(adapter, adapter.preprocess([p.clean for p in pairs])["pixel_values"])
    return patch_pairs(adapter, pairs, vs, params, sigma=sigma)


def patch_pairs(adapter: Captioner, pairs: Sequence[Pair], vs: Sequence[Variant], params: PatchingParams, *,
                sigma: float | None = None) -> PatchingResult:
    """Trace every pair under every variant of `vs` and aggregate."""
    if not pairs:
        raise ProbeError("patching needs at least one pair")
    if not vs:
        raise ProbeError("nothing to patch: the chosen stacks, layers and groups leave no variant")
    if any(p.noise for p in pairs) and NOISE_HOOK not in {s.name for s in adapter.hook_specs()}:
        raise ProbeError(f"noise corruption needs the hook {NOISE_HOOK}, which {adapter.name} does not offer")
    scores = []
    for k, p in enumerate(tqdm(pairs, desc=f"patching {adapter.name}", unit="pair")):
        scores.append(trace_pair(adapter, p, list(vs), sigma=sigma, noise_scale=params.noise_scale,
                                 seed=params.draw_seed + k, batch_size=params.batch_size, loop=params.loop,
                                 max_new_tokens=params.max_new_tokens))
    clean = np.array([s.clean for s in scores])
    corrupt = np.array([s.corrupt for s in scores])
    patched = np.stack([s.patched for s in scores])
    rec = recovery(patched, clean, corrupt)
    used = np.isfinite(clean) & (clean - corrupt >= params.min_gap)
    if not used.any():
        reasons = sorted({s.skipped or f"clean - corrupt gap {s.clean - s.corrupt:.3f} < --min-gap {params.min_gap}"
                          for s in scores})
        raise ProbeError(f"no pair could be scored ({len(pairs)} tried): {'; '.join(reasons)[:400]}")
    if not np.isfinite(patched[used]).any():
        raise ProbeError("nothing was patched: the chosen groups hold no position in any pair (e.g. 'word' is empty "
                         "for one-token words); choose other --groups")
    finite = np.isfinite(rec[used])
    with np.errstate(invalid="ignore"):  # a variant with no positions in any pair stays NaN
        mean = np.where(finite, rec[used], 0).sum(0) / finite.sum(0)
    arrays: dict[str, torch.Tensor] = {}
    grids: dict[str, dict[str, Any]] = {}
    titles = {"vision": "vision stack: recovery per layer and token group",
              "text": "text stack: recovery per layer and token group",
              "heads": "per-head patching of the text stack's (cross-)attention output"}
    vlist = list(vs)
    for stack in ("vision", "text", "heads"):
        if not any(v.stack == stack for v in vlist):
            continue
        values, rows, cols = _grid(vlist, mean, stack)
        arrays[f"recovery.{stack}"] = torch.from_numpy(values).float()
        grids[f"recovery.{stack}"] = {"title": titles[stack], "rows": rows, "cols": cols,
                                      "value": "(patched - corrupt) / (clean - corrupt)"}
    arrays["pairs.recovery"] = torch.from_numpy(rec).float()
    arrays["logprob.clean"] = torch.from_numpy(clean).float()
    arrays["logprob.corrupt"] = torch.from_numpy(corrupt).float()
    size = (pairs[0].clean.size[1], pairs[0].clean.size[0])
    arrays["input.clean"] = images_to_uint8([p.clean for p in pairs], size)
    arrays["input.corrupt"] = images_to_uint8([p.corrupt for p in pairs], size)
    if len({p.region.shape for p in pairs}) == 1:
        arrays["region"] = torch.from_numpy(np.stack([p.region for p in pairs]))
    rows = []
    for p, s, u in zip(pairs, scores, used, strict=True):
        skipped = s.skipped or ("" if u else f"clean - corrupt gap {s.clean - s.corrupt:.3f} < --min-gap "
                                             f"{params.min_gap}")
        rows.append({"name": p.name, "word": p.word, "nth": p.nth, "caption": s.caption, "clean": s.clean,
                     "corrupt": s.corrupt, "gap": s.clean - s.corrupt, "used": bool(u), "skipped": skipped})
    return PatchingResult(
        arrays=arrays, model=adapter.name, corruption="noise" if all(p.noise for p in pairs) else params.corruption,
        image_names=[p.name for p in pairs], pairs=rows,
        variants=[{"stack": v.stack, "layer": v.layer, "group": v.group, "hooks": list(v.hooks), "head": v.head}
                  for v in vlist], grids=grids,
    )


def render_patching(result: PatchingResult) -> dict[str, Figure]:
    """Heat maps (layer x group, layer x head) and restoration curves per group along the layers."""
    figs: dict[str, Figure] = {}
    names = [n for n in ("recovery.vision", "recovery.text", "recovery.heads") if n in result.grids]
    if names:
        fig, axes = grid(1, len(names), (5.2 * len(names), 3.8))
        fig.set_layout_engine("constrained")
        for ax, n in zip(np.asarray(axes).ravel(), names, strict=True):
            g, arr = result.grids[n], result.arrays[n].numpy()
            im = ax.imshow(arr, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
            ax.set_xticks(range(len(g["cols"])), g["cols"], rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(g["rows"])), g["rows"], fontsize=8)
            for (r, c), v in np.ndenumerate(arr):
                if np.isfinite(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
            ax.set_title(n.split(".")[1], fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"{result.model}: recovery of the clean word, {result.corruption} corruption", fontsize=10)
        figs["recovery"] = fig
    curves = [n for n in ("recovery.vision", "recovery.text") if n in result.grids]
    if curves:
        fig, axes = grid(1, len(curves), (5.2 * len(curves), 3.4))
        fig.set_layout_engine("constrained")
        for ax, n in zip(np.asarray(axes).ravel(), curves, strict=True):
            g, arr = result.grids[n], result.arrays[n].numpy()
            for c, col in enumerate(g["cols"]):
                ax.plot(range(len(g["rows"])), arr[:, c], marker="o", label=col)
            ax.set_xticks(range(len(g["rows"])), g["rows"], fontsize=8)
            ax.set_ylim(-0.2, 1.2)
            ax.axhline(0, color="grey", lw=0.5)
            ax.axhline(1, color="grey", lw=0.5)
            ax.set_title(f"{n.split('.')[1]}: restoration per layer", fontsize=9)
            ax.legend(fontsize=7)
        figs["restoration"] = fig
    if "input.clean" in result.arrays:
        k = min(4, len(result.image_names))
        fig, axes = grid(2, k, (2.0 * k, 4.2))
        axes = np.asarray(axes).reshape(2, k)
        for j in range(k):
            axes[0, j].imshow(result.arrays["input.clean"][j].numpy())
            axes[1, j].imshow(result.arrays["input.corrupt"][j].numpy())
            p = result.pairs[j]
            axes[0, j].set_title(f"clean: {p['word']}", fontsize=8)
            axes[1, j].set_title("corrupt" + ("" if p["used"] else " (not used)"), fontsize=8)
        no_ticks(axes)
        figs["pairs"] = fig
    return figs


register_analysis(Patching)
