"""Pipelines as text: parse, validate options, and print back.

Grammar (whitespace is ignored)::

    pipeline := step ("," step)*
    step     := NAME | NAME "(" option ("," option)* ")" | "fixpoint(" pipeline ")"
    option   := KEY "=" VALUE          VALUE: 12, 0.3, true, false, word, "quoted text", [v, v]

``fixpoint(a,b)`` repeats its passes until none of them changes the graph (at most
``FixedPoint.max_iterations`` rounds). ``format_pipeline(parse_pipeline(text))`` gives back an
equivalent canonical text; reports store that text.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from optimizer.errors import OptionError, PipelineError
from optimizer.pass_base import Pass, format_pass
from optimizer.registry import get_pass_class, is_pass_name

PRESETS: dict[str, str] = {
    "none": "",
    "cleanup": "cleanup",
    "default": (
        "fixpoint(cleanup,fold-shapes,fold-constants,layout-nchw,simplify-layout-ops,remove-noop-arithmetic,"
        "fuse-conv-bn,fuse-affine,fuse-matmul-add,fuse-gemm-transpose,fuse-pad,fuse-layernorm,fuse-gelu,cse)"
    ),
}
#: What each precision flag appends (``--int8``, ``--fp8``, ``--fp16`` ...); upgrade-opset first: per-channel INT8
#: weights need opset 13, FP8 Q/DQ opset 19 (a no-op on newer models).
PRECISION_STEPS = {
    # smooth-quant is lossless and acts only where a LayerNorm or a MatMul feeds MatMuls (transformers):
    # it raised INT8's output SQNR on every zoo transformer (held-out: +1.0 to +7.3 dB)
    "int8": "upgrade-opset(min=13),smooth-quant,quantize-int8",
    # smooth-quant before FP8 too: on the outlier-channel zoo transformers it raised FP8's cosine
    # (hf_gpt2 0.9979 -> 0.9985, hf_vit 0.9974 -> 0.9978, hf_whisper_enc 0.9960 -> 0.9968); only where
    # an activation has outlier channels: smoothing flat ones cost FP8 1.0 dB SQNR on transformer_mha
    # and 0.7 dB on hf_vit (held-out; INT8 gains there, see the pass's docstring)
    "fp8": "upgrade-opset(min=19),smooth-quant(min_outlier_ratio=4.0),quantize-fp8",
    "int4": "upgrade-opset(min=21),quantize-int4",
    "fp16": "convert-fp16",
    # Conv and pooling take bfloat16 from opset 22 (MatMul/Gemm from 13): upgrade so CNNs convert too
    "bf16": "upgrade-opset(min=22),convert-bf16",
}
#: What ``optimize inspect`` dry-runs after the default pipeline for each precision flag: the same
#: passes, with ranges that need no evaluation (minmax on synthetic samples, no bias correction).
DRY_RUN_STEPS = {"int8": ("upgrade-opset(min=13)", "quantize-int8(method=minmax,bias_correction=off)"),
                 "fp8": ("upgrade-opset(min=19)", "quantize-fp8(method=minmax)"),
                 "int4": ("upgrade-opset(min=21)", "quantize-int4(method=rtn,bias_correction=false)"),
                 "fp16": ("convert-fp16",), "bf16": ("upgrade-opset(min=22)", "convert-bf16")}
PRESETS["fp16"] = PRESETS["default"] + "," + PRECISION_STEPS["fp16"]
PRESETS["int8"] = PRESETS["default"] + ",upgrade-opset,smooth-quant,quantize-int8"
PRESETS["best"] = PRESETS["default"] + ",upgrade-opset,smooth-quant,quantize-int8,convert-fp16"
for _flag in ("fp8", "int4", "bf16"):
    PRESETS[_flag] = PRESETS["default"] + "," + PRECISION_STEPS[_flag]
#: ``best`` for GPUs with FP8 tensor cores (Ada, Hopper, Blackwell): FP8 where TensorRT has FP8
#: kernels, FP16 for what stays float.
PRESETS["best-fp8"] = PRESETS["fp8"] + "," + PRECISION_STEPS["fp16"]


@dataclass
class FixedPoint:
    """Run ``steps`` repeatedly until no pass in them reports a change."""

    steps: list[Pass | FixedPoint] = field(default_factory=list)
    max_iterations: int = 10


Step = Union[Pass, FixedPoint]



def _split_top(text: str, where: str) -> list[str]:
    """Split on commas outside parentheses, brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced ')' in {where}: {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if quote or depth:
        raise PipelineError(f"unclosed {'quote' if quote else 'parenthesis'} in {where}: {text!r}")
    parts.append(text[start:].strip())
    return parts


def parse_pipeline(text: str) -> list[Step]:
    """Parse pipeline text (or a preset name) into pass instances."""
    text = (text or "").strip()
    if text in PRESETS:
        text = PRESETS[text]
    if not text:
        return []
    steps: list[Step] = []
    for part in _split_top(text, "pipeline"):
        if not part:
            raise PipelineError(f"empty step in pipeline {text!r} (two commas in a row?)")
        step = _parse_step(part)
        steps.extend(step) if isinstance(step, list) else steps.append(step)
    return steps


def _parse_step(part: str) -> Step | list[Step]:
    match = re.fullmatch(r"([A-Za-z][A-Za-z0-9_\-]*)\s*(?:\((.*)\))?", part, flags=re.S)
    if not match:
        raise PipelineError(f"cannot parse pipeline step {part!r}; expected name or name(key=value, ...)")
    name, args = match.group(1), match.group(2)
    if args is None and name in PRESETS and not is_pass_name(name) and PRESETS[name] != name:
        return parse_pipeline(PRESETS[name])  # a preset used as a step expands in place
    if name == "fixpoint":
        inner = parse_pipeline(args or "")
        if not inner:
            raise PipelineError("fixpoint(...) needs at least one pass")
        return FixedPoint(inner)
    cls = get_pass_class(name)
    options: dict[str, Any] = {}
    if args and args.strip():
        for item in _split_top(args, f"options of '{name}'"):
            key, sep, value = item.partition("=")
            if not sep:
                raise PipelineError(f"option {item!r} of pass '{name}' must be written key=value")
            options[key.strip()] = value.strip()
    return make_pass(cls, options, from_text=True)


def make_pass(cls: type[Pass], options: dict[str, Any], *, from_text: bool = False) -> Pass:
    """Instantiate ``cls`` with validated (and, from text, type-converted) options."""
    fields = {f.name: f for f in cls.option_fields()}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, raw in options.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            known = ", ".join(fields) or "none"
            hint = f"; did you mean '{close[0]}'?" if close else f"; its options: {known}"
            raise OptionError(f"pass '{cls.name}' has no option '{key}'{hint}")
        kwargs[key] = _convert(raw, hints.get(key, str), cls.name, key) if from_text else raw
    try:
        return cls(**kwargs)
    except OptionError:
        raise
    except (TypeError, ValueError) as exc:  # a plugin's own check, or an argument of the wrong kind
        raise OptionError(f"bad options for pass '{cls.name}': {exc}") from None


def _convert(raw: str, kind: Any, pass_name: str, key: str) -> Any:
    where = f"option '{key}' of pass '{pass_name}'"
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is Union:
        non_none = [a for a in args if a is not type(None)]
        if raw in ("none", "None", "null") and type(None) in args:
            return None
        for candidate in non_none:
            try:
                return _convert(raw, candidate, pass_name, key)
            except PipelineError:  # an option of another type, or a list that does not parse
                continue
        raise OptionError(f"{where}: cannot read {raw!r} as {kind}")
    value = _unquote(raw)
    if origin is Literal:
        if value not in args:
            raise OptionError(f"{where} must be one of {', '.join(map(str, args))}; got {raw!r}")
        return value
    if origin in (list, tuple):
        if not (raw.startswith("[") and raw.endswith("]")):
            raise OptionError(f"{where} expects a list like [a, b]; got {raw!r}")
        inner = raw[1:-1].strip()
        items = _split_top(inner, where) if inner else []
        item_type = args[0] if args else str
        values = [_convert(i, item_type, pass_name, key) for i in items]
        return tuple(values) if origin is tuple else values
    try:
        if kind is bool:
            lowered = value.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
    except ValueError:
        raise OptionError(f"{where} expects {kind.__name__}; got {raw!r}") from None
    return value


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1]
    return raw


def format_pipeline(steps: list[Step]) -> str:
    """Canonical text of a pipeline; parses back to an equal pipeline."""
    out = []
    for step in steps:
        if isinstance(step, FixedPoint):
            out.append("fixpoint(" + format_pipeline(step.steps) + ")")
        else:
            out.append(format_pass(step))
    return ",".join(out)


def coerce_pipeline(pipeline: str | Step | list[Step | str] | None) -> list[Step]:
    """Accept text, a preset name, a pass, or a list mixing passes and text."""
    if pipeline is None:
        return []
    if isinstance(pipeline, str):
        return parse_pipeline(pipeline)
    if isinstance(pipeline, (Pass, FixedPoint)):
        return [pipeline]
    steps: list[Step] = []
    for item in pipeline:
        steps.extend(coerce_pipeline(item))
    return steps


def iter_passes(steps: list[Step]):
    """Every pass in a pipeline, groups flattened."""
    for step in steps:
        if isinstance(step, FixedPoint):
            yield from iter_passes(step.steps)
        else:
            yield step


__all__ = [
    "PRESETS",
    "FixedPoint",
    "Step",
    "coerce_pipeline",
    "format_pass",
    "format_pipeline",
    "iter_passes",
    "make_pass",
    "parse_pipeline",
]
