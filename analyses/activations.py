"""Capture activation data sets: stream images through a model, reduce each hook's tokens to the
token groups of `probe.data.activations.GROUPS`, write one shard per chunk of images.

``probe capture --model M --hooks GLOBS --data shapes:N | FOLDER --out DIR`` calls `capture_set`.
Nothing accumulates across chunks: each chunk of `shard_size` images is read, run in batches,
reduced, written (`probe.data.activations.write_shard`, atomic) and dropped, so resident memory
does not grow with the data set. Re-running the same command on an unfinished folder skips the
chunks whose shard exists (resume; temporary files left by a killed write are removed). Under
``torchrun --nproc_per_node N`` (or ``accelerate launch``; both set ``WORLD_SIZE``/``RANK``) each rank
captures the chunks ``c % N == rank``, rank 0 merges the index; the files are those of a one-process
capture. The process group is gloo for a CPU capture (also on a host with CUDA) and nccl for a CUDA
one, where rank ``r`` runs on ``cuda:LOCAL_RANK``.

``--out`` is refused when it is, contains or lies inside the ``--data`` folder, and ``--force``
replaces only a folder that holds a probe activation data set (its ``capture.json``/``index.json``
say so), deleting only the files a capture writes: never a saved run, a ``probe data shapes``
folder or a folder of the user's.

Labels (probe-shapes only: an image folder written by ``probe data shapes``, or ``shapes:N``):
per row the targets of `probe.data.activations.TARGETS`. Image-level rows (``cls``, ``mean``) take
the attributes of the largest object (-1 when it is not unique; ``count`` is always set); object
rows their own object's; patch rows the object covering at least half of the patch (-1 for
background); text rows the object whose phrase ("a large red circle") the token belongs to (-1
outside a phrase). ``position`` is the quadrant of the object's centre (a text row's place in the
caption is the field ``text_position``). ``count`` (objects in the image, minus one) belongs to the
whole image, so every row of a labelled image has it: background patches and text outside a phrase
included.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from probe.adapter import Captioner, ModelAdapter
from probe.analyses.grounding import patch_coverage
from probe.capture import capture
from probe.data import image_paths, open_rgb
from probe.data.activations import FORMAT as SET_FORMAT
from probe.data.activations import (
    GROUPS,
    IMAGE_GROUPS,
    INDEX_FILE,
    PLAN_FILE,
    POSITIONS,
    SHARD_RE,
    TARGETS,
    TEMP_RE,
    TYPES,
    ActivationSet,
    ActivationSetError,
    done_chunks,
    holds_activation_set,
    key,
    open_activations,
    own_files,
    read_plan,
    row_key,
    write_index,
    write_plan,
    write_shard,
)
from probe.data.activations import VERSION as SET_VERSION
from probe.data.metrics import largest_object
from probe.data.shapes import COLOURS, SHAPES, SIZES, ShapeObject, ShapesSample, iter_split, rle_decode
from probe.io import MARKER, check_output
from probe.types import ProbeError, select

log = logging.getLogger(__name__)

DEFAULT_HOOKS = "*.blocks.*.resid_post"
TOKEN_HOOK = re.compile(r"^(vision|text)\.blocks\.\d+\.resid_(post|pre)$")
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- data sources
@dataclass(frozen=True)
class Item:
    """One input image: its global index and name, and its probe-shapes sample (None: no labels)."""

    index: int
    name: str
    image: Image.Image
    sample: ShapesSample | None = None


@dataclass(frozen=True)
class Source:
    """What ``--data`` names: ``shapes:N[:SPLIT]`` (probe-shapes, drawn on the fly, train split by
    default), a probe-shapes folder (``annotations.jsonl``, labelled) or a folder of images."""

    spec: str
    n: int
    labelled: bool
    kind: str
    split: str = "train"
    folder: Path | None = None
    paths: tuple[Path, ...] = ()

    def chunks(self, wanted: Sequence[int], shard_size: int) -> Iterator[tuple[int, list[Item]]]:
        """(chunk, its items) for each chunk in `wanted` (ascending), streaming: images outside the
        wanted chunks are never decoded, and nothing is kept once a chunk is yielded."""
        want = set(wanted)
        if not want:
            return
        batch: list[Item] = []
        current = -1
        for item in self._iter(lambda i: i // shard_size in want):
            c = item.index // shard_size
            if c != current and batch:
                yield current, batch
                batch = []
            current = c
            batch.append(item)
        if batch:
            yield current, batch

    def _iter(self, keep: Any) -> Iterator[Item]:
        if self.kind == "shapes":
            for s in iter_split(self.split, self.n):
                if keep(s.index):
                    yield Item(s.index, f"shapes_{self.split}_{s.index:06d}", s.image, s)
        elif self.kind == "annotated":
            assert self.folder is not None
            with open(self.folder / "annotations.jsonl") as f:
                size = int(json.loads(f.readline())["image_size"])
                for i, line in enumerate(f):
                    if i >= self.n:
                        break
                    if keep(i):
                        yield _annotated_item(self.folder, i, json.loads(line), size)
        else:
            for i, p in enumerate(self.paths):
                if keep(i):
                    yield Item(i, p.name, open_rgb(p))


def _annotated_item(folder: Path, i: int, d: dict[str, Any], size: int) -> Item:
    objs = tuple(ShapeObject(o["shape"], o["colour"], o["size"], tuple(o["box"])) for o in d["objects"])
    masks = np.stack([rle_decode(o["mask_rle"], (size, size)) for o in d["objects"]])
    image = open_rgb(folder / d["file"])
    s = ShapesSample(image, objs, masks, d["caption"], tuple(tuple(r) for r in d["relations"]), d["split"],
                     d["index"])
    return Item(i, Path(d["file"]).name, image, s)


def parse_source(spec: str) -> Source:
    """``shapes:N[:SPLIT]`` or a folder; refused in one line when it names nothing usable."""
    spec = str(spec).strip()
    if spec.startswith("shapes:"):
        parts = spec.split(":")
        try:
            n = int(parts[1])
        except (IndexError, ValueError):
            n = 0
        split = parts[2] if len(parts) > 2 else "train"
        if n < 1 or len(parts) > 3 or split not in ("train", "val", "test"):
            raise ProbeError(f"--data {spec!r}: write shapes:N or shapes:N:SPLIT (N >= 1; SPLIT train, val or test)")
        return Source(f"shapes:{n}:{split}", n, True, "shapes", split=split)
    folder = Path(spec)
    if not folder.is_dir():
        raise ProbeError(f"--data {spec!r}: no such folder; give shapes:N or a folder of images")
    if (folder / INDEX_FILE).is_file() or (folder / PLAN_FILE).is_file():
        raise ProbeError(f"--data {spec}: this is an activation data set, not images; give it to the analyses "
                         "(probe run probes --data DIR) or capture from the images")
    ann = folder / "annotations.jsonl"
    if ann.is_file():
        with open(ann) as f:
            n = sum(1 for _ in f) - 1
        return Source(str(folder.resolve()), n, True, "annotated", folder=folder)
    paths = tuple(image_paths(folder))
    return Source(str(folder.resolve()), len(paths), False, "images", folder=folder, paths=paths)


# ----------------------------------------------------------------------------- what to capture
@dataclass(frozen=True)
class Layout:
    """Hooks to capture, the token groups each one yields, and whether captions are needed."""

    hooks: list[str]
    groups: list[str]
    per_hook: dict[str, list[str]]
    text: bool


def layout(adapter: ModelAdapter, hooks: str | Sequence[str], groups: Sequence[str]) -> Layout:
    """Check hooks and groups against the model; refuse in one line before any work.

    Raises:
        ProbeError: a glob matching nothing, a hook that is not a token stream, an unknown group, or
            a group no chosen hook has (``text`` on a ViT, image groups on BLIP's text stack alone).
    """
    globs = [g.strip() for g in (hooks.split(",") if isinstance(hooks, str) else hooks) if g.strip()]
    if not globs:
        raise ProbeError("--hooks names nothing; give globs such as '*.blocks.*.resid_post'")
    try:
        specs = select(adapter.hook_specs(), globs)
    except KeyError as e:
        raise ProbeError(f"--hooks: {e.args[0]}") from None
    names = [s.name for s in specs if TOKEN_HOOK.match(s.name)]
    if not names:
        raise ProbeError(f"--hooks {','.join(globs)} matches no token stream of {adapter.name} (capture reduces "
                         "(batch, tokens, dim) block outputs: *.blocks.*.resid_post or resid_pre)")
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise ProbeError(f"--groups {','.join(unknown) or '(none)'}: choose from {', '.join(GROUPS)}")
    joint = adapter.capabilities.joint_attention
    per_hook = {}
    for h in names:
        if h.startswith("vision."):
            own = [g for g in groups if g in IMAGE_GROUPS]
        else:  # the text stack: text positions, and the image tokens where they sit in it (GIT, prefix VLM)
            own = [g for g in groups if g == "text" or (joint and g in IMAGE_GROUPS)]
        per_hook[h] = own
    for g in groups:
        if not any(g in v for v in per_hook.values()):
            if g == "text":
                why = (f"{adapter.name} has no text stack" if not isinstance(adapter, Captioner)
                       else "no chosen hook is in the text stack; add text.blocks.*.resid_post to --hooks")
            else:
                why = (f"the chosen hooks are {adapter.name}'s text stack, which holds no image tokens; add "
                       "vision.blocks.*.resid_post to --hooks")
            raise ProbeError(f"token group {g!r}: {why}")
    hooks_used = [h for h in names if per_hook[h]]
    return Layout(hooks_used, list(groups), {h: per_hook[h] for h in hooks_used},
                  text=any("text" in per_hook[h] for h in hooks_used))


# ----------------------------------------------------------------------------- labels
def _centre_patch(obj: ShapeObject, size: tuple[int, int], grid: tuple[int, int]) -> int:
    (x, y), (w, h) = obj.centre, size
    r = min(int(y / h * grid[0]), grid[0] - 1)
    c = min(int(x / w * grid[1]), grid[1] - 1)
    return r * grid[1] + c


def _object_labels(obj: ShapeObject | None, n_objects: int, size: tuple[int, int]) -> dict[str, int]:
    if obj is None:
        return {"colour": -1, "shape": -1, "size": -1, "position": -1,
                "count": n_objects - 1 if n_objects else -1}
    x, y = obj.centre
    quadrant = 2 * int(y >= size[1] / 2) + int(x >= size[0] / 2)
    return {"colour": list(COLOURS).index(obj.colour), "shape": list(SHAPES).index(obj.shape),
            "size": list(SIZES).index(obj.size), "position": quadrant, "count": n_objects - 1}


def _phrases(adapter: Captioner, new_ids: list[int]) -> list[int]:
    """Per caption step, the object (0-based, reading order) whose phrase ``a [size] colour shape``
    the token belongs to, or -1."""
    steps_obj = [-1] * len(new_ids)
    obj, inside = -1, False
    for word, steps in adapter.word_steps(new_ids):
        w = word.strip(".,;:!?").lower()
        if w == "a":
            obj, inside = obj + 1, True
        if inside:
            for s in steps:
                steps_obj[s] = obj
        if w in SHAPES:
            inside = False
    return steps_obj


# ----------------------------------------------------------------------------- one chunk
def _run_batch(adapter: ModelAdapter, lay: Layout, items: list[Item], captions: list[str] | None,
               dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    """Rows of every (hook, group) and every row field for one batch of items."""
    images = [it.image for it in items]
    if lay.text:
        assert isinstance(adapter, Captioner) and captions is not None
        batch = adapter.preprocess(images, captions)
    else:
        batch = adapter.preprocess(images)
    with torch.no_grad(), capture(adapter, lay.hooks) as cache:
        adapter.forward(batch)
    meta = adapter.input_meta(batch)
    grid = meta.grid or adapter.grid
    n_patch = grid[0] * grid[1]
    out: dict[str, list[torch.Tensor]] = {}

    def add(name: str, t: torch.Tensor) -> None:
        out.setdefault(name, []).append(t)

    b = len(items)
    # object weights (rows, b * n_patch): uniform over the patches each object's mask touches
    obj_rows: list[tuple[int, int]] = []  # (item position, object index)
    weights = []
    patch_obj = np.full((b, n_patch), -1)
    for i, it in enumerate(items):
        if it.sample is None:
            continue
        covers = np.stack([patch_coverage(m, grid) for m in it.sample.masks])  # (objects, n_patch)
        for k in range(len(covers)):
            w = np.zeros(b * n_patch)
            touched = covers[k] > 0
            w[i * n_patch : (i + 1) * n_patch][touched] = 1.0 / max(int(touched.sum()), 1)
            weights.append(w)
            obj_rows.append((i, k))
        best = covers.argmax(0)
        patch_obj[i] = np.where(covers.max(0) >= 0.5, best, -1)
    w_obj = torch.from_numpy(np.stack(weights)).float() if weights else torch.zeros(0, b * n_patch)

    # text positions: (item, position in text span, step -> object)
    text_rows: list[tuple[int, int]] = []
    tokens: list[int] = []
    text_obj: list[int] = []
    if lay.text:
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
        for i in range(b):
            n = int(mask[i].sum())
            row = ids[i, :n].tolist()
            objs = _phrases(adapter, row[1:]) if items[i].sample is not None else [-1] * (n - 1)
            for p in range(n):
                text_rows.append((i, p))
                tokens.append(row[p])
                text_obj.append(objs[p - 1] if p >= 1 else -1)

    for h in lay.hooks:
        x = cache[h].float()
        if x.dim() != 3:
            raise ProbeError(f"{h} of {adapter.name} is {tuple(x.shape)}, not (batch, tokens, dim): capture it "
                             "with probe.capture instead")
        stack = "vision" if h.startswith("vision.") else "text"
        for g in lay.per_hook[h]:
            if g == "text":
                t0 = meta.spans["text"][0]
                rows = torch.stack([x[i, t0 + p] for i, p in text_rows]) if text_rows else x.new_zeros(0, x.shape[-1])
            else:
                lo, hi = meta.spans["image"]
                if stack == "text" and hi - lo != n_patch:
                    raise ProbeError(f"{h}: {hi - lo} image tokens but a {grid} patch grid")
                patches = x[:, lo:hi]
                if g == "cls":
                    rows = x[:, meta.spans["cls"][0]]
                elif g == "mean":
                    rows = patches.mean(1)
                elif g == "patches":
                    rows = patches.reshape(b * n_patch, -1)
                else:
                    rows = w_obj @ patches.reshape(b * n_patch, -1)
            add(key(h, g), rows.to(dtype))

    # row fields, once per group
    for g in lay.groups:
        fields: dict[str, list[int]] = {"image": []}
        labels: list[dict[str, int]] = []
        types: list[int] = []
        extra: dict[str, list[int]] = {}
        if g in ("cls", "mean"):
            for it in items:
                s = it.sample
                fields["image"].append(it.index)
                if s is None:
                    labels.append(_object_labels(None, 0, (1, 1)))
                    types.append(-1)
                    continue
                j = largest_object(s.masks, s.objects)
                labels.append(_object_labels(None if j is None else s.objects[j], len(s.objects), s.image.size))
                types.append(_centre_patch(s.objects[j or 0], s.image.size, grid))
        elif g == "object":
            for i, k in obj_rows:
                s = items[i].sample
                assert s is not None
                fields["image"].append(items[i].index)
                labels.append(_object_labels(s.objects[k], len(s.objects), s.image.size))
                types.append(_centre_patch(s.objects[k], s.image.size, grid))
                extra.setdefault("object", []).append(k)
        elif g == "patches":
            for i, it in enumerate(items):
                s = it.sample
                for p in range(n_patch):
                    fields["image"].append(it.index)
                    k = int(patch_obj[i, p])
                    if s is None:
                        labels.append(_object_labels(None, 0, (1, 1)))
                    else:
                        labels.append(_object_labels(s.objects[k] if k >= 0 else None, len(s.objects), s.image.size))
                    types.append(p)
                    extra.setdefault("patch", []).append(p)
        else:
            for (i, p), tok, k in zip(text_rows, tokens, text_obj, strict=True):
                s = items[i].sample
                fields["image"].append(items[i].index)
                if s is None:
                    labels.append(_object_labels(None, 0, (1, 1)))
                else:
                    labels.append(_object_labels(s.objects[k] if k >= 0 else None, len(s.objects), s.image.size))
                types.append(tok)
                extra.setdefault("text_position", []).append(p)  # not "position": that is a target
                extra.setdefault("token", []).append(tok)
        cols = {"image": fields["image"], "type": types, **{t: [lab[t] for lab in labels] for t in TARGETS}, **extra}
        for name, v in cols.items():
            add(row_key(g, name), torch.tensor(v, dtype=torch.int64).reshape(-1))
    return out


def capture_chunk(adapter: ModelAdapter, lay: Layout, items: list[Item], *, batch_size: int = 64,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of one shard: the items' rows per (hook, group) and row fields, in item order."""
    captions = None
    if lay.text:
        assert isinstance(adapter, Captioner)
        captions = [it.sample.caption if it.sample is not None else "" for it in items]
        unlabelled = [k for k, it in enumerate(items) if it.sample is None]
        for k in range(0, len(unlabelled), batch_size):  # no caption given: the model's own greedy caption
            part = unlabelled[k : k + batch_size]
            for j, text in zip(part, adapter.caption([items[j].image for j in part])["text"], strict=True):
                captions[j] = text
    parts: dict[str, list[torch.Tensor]] = {}
    for k in range(0, len(items), batch_size):
        got = _run_batch(adapter, lay, items[k : k + batch_size], None if captions is None
                         else captions[k : k + batch_size], dtype)
        for name, ts in got.items():
            parts.setdefault(name, []).extend(ts)
    return {name: torch.cat(ts) for name, ts in parts.items()}


# ----------------------------------------------------------------------------- processes
def process_group_backend(device: str | torch.device) -> str:
    """The process-group backend for a capture on `device`: nccl for CUDA, gloo otherwise (a CPU
    capture on a host that has CUDA included: nccl cannot move CPU tensors)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str | torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` for a CUDA capture under ``torchrun`` /
    ``accelerate launch`` (``WORLD_SIZE`` > 1), else `device` unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextmanager
def distributed(device: str | torch.device = "cpu") -> Iterator[tuple[int, int]]:
    """(rank, world size): from ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1), with a
    process group (`process_group_backend` of `device`; for CUDA, ``torch.cuda.set_device`` to the
    local rank first) set up here unless one exists; else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dev = rank_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=process_group_backend(dev))
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if own:
            dist.destroy_process_group()


def _agree(world: int, error: str | None) -> str | None:
    """Every rank's error (the first one), so that all ranks stop together instead of waiting."""
    if world <= 1:
        return error
    import torch.distributed as dist

    got: list[Any] = [None] * world
    dist.all_gather_object(got, error)
    return next((e for e in got if e), None)


def check_out(out: str | Path, source: Source, force: bool = False) -> None:
    """Refuse `out` before any work (what `capture_set` would refuse before it knows the plan).

    Raises:
        ProbeError: `out` is, contains or lies inside the ``--data`` folder; is a file or a link; or
            is a non-empty folder that holds no probe activation data set (refused even with
            `force`), or a complete one without `force`.
    """
    out = Path(out)
    if source.folder is not None:
        o, d = out.resolve(), source.folder.resolve()
        if o == d or d in o.parents or o in d.parents:
            where = "is" if o == d else "lies inside" if d in o.parents else "contains"
            raise ProbeError(f"--out {out} {where} the --data folder {source.folder}; write the activations to "
                             "a folder of their own")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        check_output(out, force)  # its one-line refusal of links and files
    if not out.is_dir() or not any(p.name != MARKER for p in out.iterdir()):
        return
    if not holds_activation_set(out):
        raise ProbeError(f"--out {out} is not empty and holds no probe activation data set (no capture.json or "
                         "index.json of one), so it is never replaced, not even with --force; choose another folder")
    if (out / INDEX_FILE).is_file() and not force:
        raise ProbeError(f"--out {out} holds a complete activation data set; pass --force to replace it or choose "
                         "another folder")


def _prepare(out: Path, plan: dict[str, Any], source: Source, force: bool) -> str:
    """Make `out` ready for `plan` (rank 0 only). Returns ``new``, ``resume`` or raises."""
    check_out(out, source, force)
    existing = read_plan(out) if out.is_dir() else None
    if existing is not None and not (out / INDEX_FILE).is_file() and not force:
        if existing != plan:
            diff = sorted(k for k in set(existing) | set(plan) if existing.get(k) != plan.get(k))
            raise ProbeError(f"--out {out} holds an unfinished capture of a different plan ({', '.join(diff)} "
                             "differ); pass --force to start over or choose another folder")
        stale = [p for p in out.iterdir() if TEMP_RE.fullmatch(p.name)]
        for p in stale:  # left by a process killed mid-write (atomic writes clean up only on exceptions)
            p.unlink(missing_ok=True)
        if stale:
            log.info("removed %d temporary files of an interrupted write from %s", len(stale), out)
        return "resume"
    if out.is_dir():
        for p in own_files(out):  # --force on an activation set: start over, deleting only our files
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by probe; `--force` may replace this folder\n")
    write_plan(out, plan)
    return "new"


def make_plan(adapter: ModelAdapter, source: Source, lay: Layout, *, shard_size: int, batch_size: int,
              dtype: str) -> dict[str, Any]:
    """Everything that fixes the shards' content (a resumed capture must match it exactly)."""
    w = adapter.weights
    return {"format": SET_FORMAT, "version": SET_VERSION, "model": adapter.name,
            "weights": {"source": w.source, "ref": w.ref, "sha256": w.sha256} if w else None,
            "hooks": lay.hooks, "groups": lay.groups, "data": source.spec, "n_images": source.n,
            "labelled": source.labelled, "shard_size": shard_size, "batch_size": batch_size, "dtype": dtype,
            "grid": list(adapter.grid), "targets": {k: list(v) for k, v in TARGETS.items()}, "types": TYPES,
            "positions": list(POSITIONS)}


def capture_set(adapter: ModelAdapter, data: str | Source, out: str | Path, *, hooks: str | Sequence[str] = DEFAULT_HOOKS,
                groups: Sequence[str] | None = None, shard_size: int = 256, batch_size: int = 64,
                dtype: str = "float32", force: bool = False, progress: bool = True) -> ActivationSet | None:
    """Capture `data` through `adapter` into the data set folder `out` (see the module docstring).

    Args:
        data: ``shapes:N[:SPLIT]`` or a folder (see `Source`). hooks: globs over canonical names
            (token streams only). groups: token groups (`probe.data.activations.GROUPS`); groups the
            model lacks are refused (None: `default_groups`). shard_size: images per shard. dtype: of the stored activations.
        force: replace a data set in `out` (never any other folder, see `check_out`).

    Returns:
        The data set (`open_activations`, ``captured`` set: the images captured by all ranks of
        this call) on rank 0; None on other ranks.
    Raises:
        ProbeError: refused before any work (see `layout`, `parse_source`, `check_out`), or an
            unfinished `out` with another plan.
    """
    source = data if isinstance(data, Source) else parse_source(data)
    groups = default_groups(adapter) if groups is None else list(dict.fromkeys(groups))
    lay = layout(adapter, hooks, groups)
    if dtype not in STORE_DTYPES:
        raise ProbeError(f"--dtype {dtype!r}: use {', '.join(STORE_DTYPES)}")
    if shard_size < 1 or batch_size < 1:
        raise ProbeError(f"--shard-size {shard_size} / --batch-size {batch_size}: give positive numbers")
    out = Path(out)
    plan = make_plan(adapter, source, lay, shard_size=shard_size, batch_size=batch_size, dtype=dtype)
    n_chunks = -(-source.n // shard_size)
    device = rank_device(adapter.device)
    if device != adapter.device:
        adapter.to(device)  # under torchrun each rank on its own GPU
    with distributed(device) as (rank, world):
        error = None
        if rank == 0:
            try:
                state = _prepare(out, plan, source, force)
                if state == "resume":
                    log.info("resuming the capture in %s: %d of %d shards are done", out, len(done_chunks(out)),
                             n_chunks)
            except ProbeError as e:
                error = str(e)
        error = _agree(world, error)
        if error:
            raise ProbeError(error)
        done = set(done_chunks(out))
        mine = [c for c in range(n_chunks) if c % world == rank and c not in done]
        new_images = sum(min(shard_size, source.n - c * shard_size) for c in range(n_chunks) if c not in done)
        error = None
        try:
            bar = tqdm(total=sum(min(shard_size, source.n - c * shard_size) for c in mine), unit="img",
                       desc=f"capture {adapter.name}" + (f" (rank 0 of {world})" if world > 1 else ""),
                       disable=not progress or rank != 0)
            with bar:
                for c, items in source.chunks(mine, shard_size):
                    tensors = capture_chunk(adapter, lay, items, batch_size=batch_size, dtype=STORE_DTYPES[dtype])
                    # nothing rank-specific goes in: the files equal those of a one-process capture
                    write_shard(out, c, tensors, {"images": [items[0].index, items[-1].index + 1],
                                                  "names": [it.name for it in items]})
                    bar.update(len(items))
        except Exception as e:
            if world <= 1 and not isinstance(e, OSError | ProbeError):
                raise  # a bug: its traceback matters more than the hint
            error = f"rank {rank}: {e}" if world > 1 else str(e)
        error = _agree(world, error)
        if error:
            raise ProbeError(f"{error}; the complete shards are kept: run the same command again to resume")
        if rank == 0:
            write_index(out, plan, n_chunks)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    if rank != 0:
        return None
    ds = open_activations(out)
    ds.captured = new_images
    return ds


def default_groups(adapter: ModelAdapter) -> list[str]:
    """``cls, mean, object``, and ``text`` for captioners."""
    return ["cls", "mean", "object", *(["text"] if isinstance(adapter, Captioner) else [])]


def shard_files(folder: str | Path) -> list[str]:
    """Names of the shard files in `folder`, sorted."""
    return sorted(p.name for p in Path(folder).iterdir() if SHARD_RE.fullmatch(p.name))


__all__ = ["DEFAULT_HOOKS", "ActivationSetError", "Item", "Layout", "Source", "capture_chunk", "capture_set",
           "check_out", "default_groups", "distributed", "layout", "make_plan", "parse_source", "process_group_backend",
           "rank_device", "shard_files"]
