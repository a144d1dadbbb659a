"""One pipeline for every run: resolve the model, check it, load it, run, render, save.

``execute(RunSpec(...))`` is what ``probe run``, the bench scripts and scripts call; nothing else
re-implements it. Everything that can be refused is refused before any weights load: an unknown
analysis or model, parameters out of range, a model whose capabilities the analysis cannot use.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from probe import registry
from probe.analysis import Analysis, Bench, to_params
from probe.data import ImageSet
from probe.runs.results import Result
from probe.runs.store import Run, RunStore
from probe.types import ProbeError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SHAPES = 16
MAX_SHAPES = 10_000  # a run keeps its images in memory and in its arrays: larger sets are activation data sets


@dataclass(frozen=True)
class RunSpec:
    """What to run.

    Attributes:
        analysis: registered analysis name.
        model: registered model name; None: the analysis's default (the registry's default model
            for its task). For analyses over many models: ``all`` or ``a,b,c``.
        weights: ``auto | pretrained | demo | random | meta | hub id | folder``.
        images: image files or folders; empty: `shapes` probe-shapes test images if given, else
            the analysis's default (the bundled samples, or 16 probe-shapes test images).
        shapes: run on this many probe-shapes test images (with masks and ground truth).
        device: ``cpu``, ``cuda`` or ``auto``; dtype: ``float32``, ``float16`` or ``bfloat16``.
        params: the analysis's parameters by name (validated against its `Params`).
        store: run store folder (None: ``$PROBE_STORE`` or ``./probe-runs``); save: write the run.
    """

    analysis: str
    model: str | None = None
    weights: str = "auto"
    images: Sequence[str | Path] = ()
    shapes: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    params: Mapping[str, Any] | Any = field(default_factory=dict)
    store: str | Path | None = None
    save: bool = True


@dataclass(frozen=True)
class Outcome:
    """A finished run: its result, figures, manifest, summary lines and the saved `Run` (or None)."""

    result: Result
    figures: dict[str, Figure]
    manifest: dict[str, Any]
    lines: list[str]
    run: Run | None
    adapters: list[Any]


@dataclass(frozen=True)
class Plan:
    analysis: Analysis
    params: Any
    models: list[str]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ProbeError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ProbeError(f"--device {name!r}: use cpu, cuda or auto")
    return torch.device(name)


def _integer(value: Any, flag: str, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProbeError(f"{flag} {value!r}: use a whole number from {lo} to {hi}")


def plan(spec: RunSpec) -> Plan:
    """Everything that can be checked without loading weights: the run's fields, the analysis and
    its parameters, the model names, their capabilities and the hooks of their architecture."""
    analysis = registry.analysis(spec.analysis)
    if not isinstance(spec.params, Mapping) and not dataclasses.is_dataclass(spec.params):
        raise ProbeError(f"params must be a dict of {analysis.name}'s parameters, not {type(spec.params).__name__}")
    params = to_params(analysis.Params, spec.params)
    if spec.dtype not in DTYPES:
        raise ProbeError(f"--dtype {spec.dtype!r}: use {', '.join(DTYPES)}")
    _integer(spec.seed, "--seed", 0, 2**63 - 1)
    if spec.shapes is not None:
        _integer(spec.shapes, "--shapes", 1, MAX_SHAPES)
        if spec.images:
            raise ProbeError("give --images or --shapes, not both")
    if not analysis.reads_images and (spec.images or spec.shapes):
        raise ProbeError(f"{analysis.name} reads no images; drop --images/--shapes")
    if not isinstance(spec.weights, str) or not spec.weights:
        raise ProbeError("--weights is empty: use auto, pretrained, demo, random, meta, a hub id or a folder")
    if spec.weights == "meta" and analysis.reads_images:
        raise ProbeError(f"--weights meta builds the architecture without weights, which cannot run images; "
                         f"{analysis.name} needs real weights (auto, demo, random, ...)")
    if spec.store is not None and (str(spec.store) == "" or Path(spec.store).is_file()):
        raise ProbeError(f"--out {str(spec.store)!r}: give a folder for the run store")
    if spec.model is not None and (not isinstance(spec.model, str) or not spec.model.strip()):
        raise ProbeError(f"--model {spec.model!r}: give a registered model name (see `probe models`)")
    if not analysis.loads_model:
        if spec.model is not None:
            raise ProbeError(f"{analysis.name} builds its own modules and loads no model; drop --model")
        if spec.weights not in ("auto", "random"):
            raise ProbeError(f"{analysis.name} builds its own modules with random weights; drop --weights")
        names: list[str] = []
    elif analysis.many_models:
        if spec.model in (None, "all"):
            names = [n for n, e in registry.models(analysis.task).items() if not analysis.check(n, e.capabilities)]
        else:
            names = [m.strip() for m in spec.model.split(",") if m.strip()]
        if not names:
            raise ProbeError(f"--model {spec.model!r} names no model; give all or a comma-separated list")
    else:
        names = [spec.model or registry.default_model(analysis.task or analysis.default_task)]
    if analysis.needs_masks and spec.images:
        raise ProbeError(f"{analysis.name} {analysis.needs_masks_because}, which only probe-shapes images carry: "
                         "drop --images and give --shapes N")
    for name in names:
        why = analysis.check(name, registry.model_entry(name).capabilities)
        if why:
            raise ProbeError(why)
        if analysis.requires or analysis.checks_architecture:  # on the architecture alone: no weights are read
            why = analysis.check_architecture(registry.load_model(name, weights="meta"), params)
            if why:
                raise ProbeError(why)
    return Plan(analysis, params, names)


def inputs_for(analysis: Analysis, spec: RunSpec) -> ImageSet | None:
    """The images of a run (see `RunSpec.images`)."""
    if not analysis.reads_images:
        return None
    if spec.images:
        return ImageSet.from_paths(spec.images)
    if spec.shapes is not None or analysis.default_images == "shapes":
        return ImageSet.shapes(spec.shapes or DEFAULT_SHAPES)
    return ImageSet.bundled()


def execute(spec: RunSpec) -> Outcome:
    """Run `spec` end to end and save it (unless ``spec.save`` is False); see the module docstring."""
    if isinstance(spec.weights, os.PathLike):  # a folder given as a Path
        spec = dataclasses.replace(spec, weights=os.fspath(spec.weights))
    p = plan(spec)
    analysis, params = p.analysis, p.params
    device, dtype = resolve_device(spec.device), DTYPES[spec.dtype]
    inputs = inputs_for(analysis, spec)
    torch.manual_seed(spec.seed)
    weights = analysis.weights_for(params, spec.weights)
    t0 = time.perf_counter()
    adapters = [registry.load_model(n, weights=weights, seed=spec.seed, device=device, dtype=dtype) for n in p.models]
    t_load = time.perf_counter() - t0
    for a in adapters:
        w = a.weights
        log.info("model %s, weights: %s %s (sha256 %s)", a.name, w.source, w.ref, (w.sha256 or "")[:12])
        if w.source == "random":
            log.warning("%s has RANDOM weights: results show the architecture, not learned behaviour", a.name)
        why = analysis.check_hooks(a.name, a.hook_specs())  # a checkpoint folder may differ from the family's
        if why:
            raise ProbeError(why)
    if not analysis.loads_model:
        subject: Any = Bench(device, dtype, spec.seed)
    else:
        subject = adapters if analysis.many_models else adapters[0]
    params = analysis.resolve(subject, params)
    p = dataclasses.replace(p, params=params)
    t1 = time.perf_counter()
    result = analysis.run(subject, inputs, params)
    _check_finite(result, spec)
    t_run = time.perf_counter() - t1
    t2 = time.perf_counter()
    figures = analysis.render(result)
    t_render = time.perf_counter() - t2
    manifest = _manifest(spec, p, adapters, inputs, weights, device,
                         {"load": t_load, "run": t_run, "render": t_render})
    run = RunStore(spec.store).save(manifest, result, figures) if spec.save else None
    return Outcome(result, figures, manifest, analysis.summary_lines(result), run, adapters)


def _check_finite(result: Result, spec: RunSpec) -> None:
    """Refuse to save NaN or infinite values (outside the arrays a result marks as NaN-padded)."""
    for name, t in result.arrays.items():
        if t.is_floating_point() and name not in result.nan_padded and not bool(torch.isfinite(t).all()):
            hint = " (float16 overflows in some attention kinds: use --dtype bfloat16 or float32)" \
                if spec.dtype == "float16" else " (the weights may hold NaN: check the checkpoint)"
            raise ProbeError(f"the run produced non-finite values in {name}; nothing was saved{hint}")


def _manifest(spec: RunSpec, p: Plan, adapters: list[Any], inputs: ImageSet | None, weights: str,
              device: torch.device, timings: dict[str, float]) -> dict[str, Any]:
    if not adapters:  # a study that builds its own modules (`Analysis.loads_model`)
        bench = Bench(device, DTYPES[spec.dtype], spec.seed)
        return {"analysis": p.analysis.name, "model": bench.describe(), "weights": {"source": "random"},
                "weights_requested": spec.weights, "weights_loaded": "random", "attn_implementation": None,
                "dtype": spec.dtype, "device": str(device), "seed": spec.seed, "images": [],
                "parameters": asdict(p.params), "timings_s": {k: round(v, 4) for k, v in timings.items()}}
    one = adapters[0]
    model = one.describe() if len(adapters) == 1 else {"name": "+".join(p.models),
                                                       "models": [a.describe() for a in adapters]}
    return {
        "analysis": p.analysis.name,
        "model": model,
        "weights": one.weights.to_dict() if len(adapters) == 1 else {a.name: a.weights.to_dict() for a in adapters},
        "weights_requested": spec.weights,
        "weights_loaded": weights,
        "attn_implementation": one.attn_implementation,
        "dtype": spec.dtype,
        "device": str(device),
        "seed": spec.seed,
        "images": inputs.sources if inputs is not None else [],
        "parameters": asdict(p.params),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }
