"""The analysis contract: one base class, a parameters dataclass, a capability check, run, render.

An analysis declares what it needs (a task such as ``caption``, hook globs, images or not) and its
parameters as a frozen dataclass whose fields carry their help text and bounds (`param`). The CLI
flags are generated from that dataclass and validated at the edge (`validate`), so every analysis
gets the same checks; the pipeline (`probe.pipeline.execute`) checks the model's capabilities
before any weights load, then calls `run` and `render`. Register with
`probe.registry.register_analysis`; ``analyses/attention.py`` is the shortest example.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, ClassVar

from matplotlib.figure import Figure

from probe.data import ImageSet
from probe.runs.results import Result
from probe.types import Capabilities, HookSpec, ProbeError, select


class ParamError(ProbeError, ValueError):
    """A parameter out of its declared range; the message names the flag."""


def param(default: Any, help: str, *, choices: Sequence[Any] | None = None, min: float | None = None,
          max: float | None = None) -> Any:
    """A parameter field: its default, help text, allowed choices and inclusive bounds."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[type, bool]:
    """(the field's scalar type, whether None is allowed) from its annotation."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    return tp, optional


def _fields(params_cls: type) -> list[tuple[dataclasses.Field, type, bool]]:
    hints = typing.get_type_hints(params_cls)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(params_cls)]


def validate(params: Any) -> Any:
    """Check every field against its declared type, choices and bounds; return `params`.

    Raises:
        ParamError: naming the CLI flag, the value and what is allowed.
    """
    for f, tp, optional in _fields(type(params)):
        v = getattr(params, f.name)
        if v is None:
            if optional:
                continue
            raise ParamError(f"{flag(f.name)} is required")
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if isinstance(v, float) and v != v:
            raise ParamError(f"{flag(f.name)} is NaN: give a number")
        if tp in (int, float, str, bool) and (not isinstance(v, tp) or (tp is int and isinstance(v, bool))):
            raise ParamError(f"{flag(f.name)} must be {tp.__name__}, got {v!r}")
        m = f.metadata
        if m.get("choices") is not None and v not in m["choices"]:
            raise ParamError(f"{flag(f.name)} {v!r}: choose one of {', '.join(map(str, m['choices']))}")
        if m.get("min") is not None and v < m["min"]:
            raise ParamError(f"{flag(f.name)} {v!r}: must be >= {m['min']}")
        if m.get("max") is not None and v > m["max"]:
            raise ParamError(f"{flag(f.name)} {v!r}: must be <= {m['max']}")
    return params


def add_arguments(parser: argparse.ArgumentParser, params_cls: type) -> None:
    """One CLI flag per field: ``--name VALUE``; a bool defaulting to False is ``--name``, one
    defaulting to True is ``--no-name``."""
    for f, tp, _ in _fields(params_cls):
        h = f.metadata.get("help", "")
        if tp is bool:
            if f.default:
                parser.add_argument(flag("no_" + f.name), dest=f.name, action="store_false", help=h)
            else:
                parser.add_argument(flag(f.name), dest=f.name, action="store_true", help=h)
            continue
        choices = f.metadata.get("choices")
        default = f"(default {f.default})" if f.default is not None else ""
        parser.add_argument(flag(f.name), dest=f.name, type=tp, default=f.default, choices=choices,
                            help=f"{h} {default}".strip())


def params_from_args(args: argparse.Namespace, params_cls: type) -> Any:
    return validate(params_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(params_cls)}))


def to_params(params_cls: type, values: dict[str, Any] | Any) -> Any:
    """A validated `params_cls` from a dict (unknown keys are an error naming the known ones)."""
    if isinstance(values, params_cls):
        return validate(values)
    known = {f.name for f in dataclasses.fields(params_cls)}
    unknown = set(values) - known
    if unknown:
        raise ParamError(f"unknown parameters {sorted(unknown)}; this analysis takes {sorted(known) or 'none'}")
    return validate(params_cls(**values))


@dataclasses.dataclass(frozen=True)
class Bench:
    """What an analysis that loads no model (``loads_model = False``) runs on."""

    device: Any
    dtype: Any
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        return {"name": "none", "note": "the analysis builds its own modules", "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch.")}


class Analysis(abc.ABC):
    """Base of every analysis. Subclasses set the class attributes and implement `run`.

    Attributes:
        name, summary: registry name (``probe run NAME``) and one line of help.
        Params: a frozen dataclass of the parameters (fields made with `param`).
        task: the model task needed (``caption``, ``classify``) or None; the pipeline's default
            model is the registry's default for it.
        requires: hook globs the model must offer (checked after it loads).
        reads_images: whether `run` takes images (False: it gets ``inputs=None``).
        many_models: whether `run` takes a list of adapters (``--model all`` or ``a,b``).
        loads_model: False for a study that builds its own modules (the efficiency study): no
            model loads, ``--model``/``--weights`` are refused and `run` gets a `Bench` (the
            run's device, dtype and seed) instead of an adapter.
        default_images: ``bundled`` (the sample images) or ``shapes`` (probe-shapes test images
            with masks and ground truth) when the user gives none.
        default_task: without ``--model``, the registry's default model for this task runs (the
            analysis's `task` when it has one).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type]
    task: ClassVar[str | None] = None
    requires: ClassVar[tuple[str, ...]] = ()
    reads_images: ClassVar[bool] = True
    #: True when `run` scores against probe-shapes object masks (user images are refused)
    needs_masks: ClassVar[bool] = False
    #: what the masks are for, in the refusal of user images ("<name> <this>, which only probe-shapes ...")
    needs_masks_because: ClassVar[str] = "scores maps against exact object masks"
    #: True when `check_architecture` needs the meta-built model even without `requires`
    checks_architecture: ClassVar[bool] = False
    many_models: ClassVar[bool] = False
    loads_model: ClassVar[bool] = True
    default_images: ClassVar[str] = "bundled"
    default_task: ClassVar[str] = "classify"

    def check(self, model: str, capabilities: Capabilities) -> str | None:
        """Why this analysis cannot run on `model`, or None. Runs before any weights load."""
        if self.task is not None and self.task not in capabilities.tasks:
            return (f"{self.name} needs a model that can {self.task}; {model} ({capabilities.family}) "
                    f"does: {', '.join(capabilities.tasks) or 'nothing'}")
        return None

    def check_architecture(self, adapter: Any, params: Any) -> str | None:
        """Why this analysis with `params` cannot run on `adapter`'s architecture, or None. The
        pipeline calls it on the model built on the meta device, before any weights load."""
        return self.check_hooks(adapter.name, adapter.hook_specs())

    def check_hooks(self, model: str, specs: Sequence[HookSpec]) -> str | None:
        """Why the loaded model's hooks do not serve this analysis, or None."""
        for glob in self.requires:
            try:
                select(specs, glob)
            except KeyError:
                return f"{self.name} needs hooks {glob!r}, which {model} does not offer"
        return None

    def resolve(self, adapter: Any, params: Any) -> Any:
        """`params` with every default that depends on the model filled in (e.g. the model's
        caption length for ``max_new_tokens=None``), so that the manifest records what ran."""
        return params

    def weights_for(self, params: Any, weights: str) -> str:
        """The weights to load given the parameters (e.g. ``meta`` for published-size counting)."""
        return weights

    @abc.abstractmethod
    def run(self, adapter: Any, inputs: Any, params: Any) -> Result:
        """Run on a loaded adapter (a list of them when `many_models`) and a `probe.data.ImageSet`
        (None when not `reads_images`)."""

    def __call__(self, adapter: Any, images: Any = None, names: Sequence[str] | None = None,
                 **params: Any) -> Result:
        """The Python shortcut: `run` on PIL images (or an `ImageSet`) with parameters as keywords,
        e.g. ``Flow()(adapter, images, max_new_tokens=5)``; no store, no manifest."""
        for a in adapter if self.many_models else [adapter]:
            why = self.check(a.name, a.capabilities) or self.check_hooks(a.name, a.hook_specs())
            if self.reads_images and a.weights.source == "meta":
                why = f"{a.name} was loaded with weights meta (no weights): {self.name} needs real weights"
            if why:
                raise ProbeError(why)
        if self.reads_images and not images:
            raise ProbeError(f"{self.name} needs images: give a list of PIL images or an ImageSet")
        if images is not None and not isinstance(images, ImageSet):
            images = ImageSet.from_images([images] if hasattr(images, "mode") else images, names)
        return self.run(adapter, images, self.resolve(adapter, to_params(self.Params, params)))

    def render(self, result: Any) -> dict[str, Figure]:
        """Figures of a result, by name (pure: no pyplot, nothing saved)."""
        return {}

    def summary_lines(self, result: Any) -> list[str]:
        """A few lines the CLI prints after the run."""
        return []
