"""The scenario axes: one table, from which everything that knows an axis is derived.

Each :class:`Axis` says its name, type and default (the scenario schema,
:mod:`harness.scenario`), which workflows use it, whether it is part of the load key and how
its values are spelled in a cell id (:mod:`harness.matrix`), in a report row
(:mod:`reports.table`) and in the conformance matrix (:mod:`reports.conformance`). The table's
order is the order of the matrix product (the last axis varies fastest), of the parts of a cell
id and of the words of a label.

Adding an axis is one :class:`Axis` in :data:`AXES` (and the backends that honour it, which
read it as ``cell.NAME``): the schema accepts it, cells carry it, ids and labels spell it.
This module is plain Python (no pydantic): the schema builds its validators from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal

from harness.vocabulary import (
    CONTROLNET_WORKFLOWS,
    SAMPLERS,
    Attention,
    Compile,
    ControlMode,
    Device,
    DType,
    Offload,
    Prediction,
    Source,
    Workflow,
)

#: Spellings of a value.
Spell = Callable[[Any], str]


def _plain(value: Any) -> str:
    return str(value)


def _id_plain(value: Any) -> str:
    return str(value).replace("/", "_").replace(":", "_")


def _g(value: Any) -> str:
    """``7.5`` -> ``7.5``; ``2.0`` -> ``2``; not a number -> as is."""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def _prefixed(prefix: str, spell: Spell = _plain) -> Spell:
    return lambda value: f"{prefix}{spell(value)}"


def _suffixed(suffix: str, spell: Spell = _plain) -> Spell:
    return lambda value: f"{spell(value)}{suffix}"


def _flag(true: str, false: str) -> Spell:
    return lambda value: true if value else false


def extra_name(ref: str) -> str:
    """``zoo:style`` -> ``style``; a file path -> its stem."""
    ref = ref.strip()
    return ref[4:] if ref.startswith("zoo:") else PurePath(ref).stem


def lora_label(value: str) -> str:
    """Files with weights, LoRAs or ControlNets: ``zoo:style@0.5+zoo:detail@1`` ->
    ``style@0.5+detail@1``; ``zoo:canny@0.5+zoo:depth`` -> ``canny@0.5+depth``."""
    parts = []
    for part in value.split("+"):
        ref, _, weight = part.strip().rpartition("@")
        parts.append(f"{extra_name(ref)}@{weight}" if ref else extra_name(part))
    return "+".join(parts)


def embedding_label(value: str) -> str:
    """``zoo:sbstyle+/x/tok.pt`` -> ``sbstyle+tok``."""
    return "+".join(extra_name(part) for part in value.split("+"))


# --- validators (plain functions; the schema wraps them) ----------------------------------


def parse_resolution(value: Any) -> Any:
    """``512`` -> ``(512, 512)``; ``"768x512"`` -> ``(768, 512)`` (width x height)."""
    if isinstance(value, bool):
        raise ValueError(f"expected an int or 'WIDTHxHEIGHT', got {value!r}")
    if isinstance(value, int):
        width = height = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", value):
        width, height = (int(part) for part in re.split(r"[xX]", value))
    elif isinstance(value, list | tuple) and len(value) == 2:
        width, height = (int(part) for part in value)
    else:
        raise ValueError(f"expected an int or 'WIDTHxHEIGHT', got {value!r}")
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise ValueError(f"width and height must be positive multiples of 8, got {value!r}")
    return (width, height)


def check_sampler(value: Any) -> Any:
    if value not in SAMPLERS:
        raise ValueError(f"unknown sampler {value!r}; expected one of {', '.join(SAMPLERS)}")
    return value


_EXTRA_REF = r"(?:zoo:[A-Za-z0-9_.-]+|[^@+]+)"


def check_lora(value: Any) -> Any:
    """``none`` or ``REF@STRENGTH[+REF@STRENGTH...]``, REF = ``zoo:NAME`` or a file path."""
    if not isinstance(value, str):
        raise ValueError(f"expected 'none' or 'FILE@STRENGTH[+FILE@STRENGTH...]', got {value!r}")
    if value == "none":
        return value
    for part in value.split("+"):
        if not re.fullmatch(_EXTRA_REF + r"@-?\d+(?:\.\d+)?", part.strip()):
            raise ValueError(
                f"expected 'none' or 'FILE@STRENGTH[+FILE@STRENGTH...]' "
                f"(e.g. zoo:style@0.8), got {value!r}"
            )
    return value


def check_embedding(value: Any) -> Any:
    """``none`` or ``REF[+REF...]``; the trigger word is the file's stem (A1111's rule)."""
    if not isinstance(value, str):
        raise ValueError(f"expected 'none' or 'FILE[+FILE...]', got {value!r}")
    if value != "none" and not all(re.fullmatch(_EXTRA_REF, p.strip()) for p in value.split("+")):
        raise ValueError(
            f"expected 'none' or 'FILE[+FILE...]' (e.g. zoo:tiny-token), got {value!r}"
        )
    return value


def check_controlnet(value: Any) -> Any:
    """``auto`` (the zoo's ControlNet of the model's family) or ``REF[@SCALE][+REF[@SCALE]...]``,
    REF = ``zoo:NAME``, a single file or a diffusers folder; SCALE defaults to
    ``control_scale``."""
    expected = "'auto' or 'NET[@SCALE][+NET[@SCALE]...]' (e.g. zoo:canny@0.8+zoo:depth@0.5)"
    if not isinstance(value, str):
        raise ValueError(f"expected {expected}, got {value!r}")
    if value == "auto":
        return value
    for part in value.split("+"):
        if not re.fullmatch(_EXTRA_REF + r"(?:@\d+(?:\.\d+)?)?", part.strip()):
            raise ValueError(f"expected {expected}, got {value!r}")
    return value


#: The value of ``stage_steps`` / ``stage_guidance`` that leaves every stage at ``steps`` /
#: ``guidance``.
SAME_FOR_EVERY_STAGE = "same"
_STAGE_VALUE = re.compile(r"\s*([a-z][a-z0-9_]*)\s*=\s*(\d+(?:\.\d+)?)\s*")


def parse_stage_values(value: str) -> dict[str, float]:
    """``stage_2=50,stage_3=75`` -> ``{"stage_2": 50.0, "stage_3": 75.0}``; ``same`` -> ``{}``.

    Raises ``ValueError`` naming the expected form. Whether the names are the model's
    stages is the backend's to check (it knows the model)."""
    if not isinstance(value, str):
        raise ValueError(f"expected '{SAME_FOR_EVERY_STAGE}' or 'STAGE=VALUE[,STAGE=VALUE...]', "
                         f"got {value!r}")
    if value.strip() == SAME_FOR_EVERY_STAGE:
        return {}
    found: dict[str, float] = {}
    for part in value.split(","):
        match = _STAGE_VALUE.fullmatch(part)
        if match is None:
            raise ValueError(
                f"expected '{SAME_FOR_EVERY_STAGE}' or 'STAGE=VALUE[,STAGE=VALUE...]' "
                f"(e.g. prior=25 or stage_2=50,stage_3=75), got {value!r}"
            )
        found[match.group(1)] = float(match.group(2))
    return found


def check_stage_values(value: Any) -> Any:
    parse_stage_values(value)
    return value


def _stage_label(what: str) -> Spell:
    """``prior=25,decoder=50`` -> ``steps prior 25 decoder 50``."""
    return lambda value: f"{what} {value.replace(',', ' ').replace('=', ' ')}"


def _stage_id(prefix: str) -> Spell:
    """``stage_2=50,stage_3=75`` -> ``steps-stage_2_50-stage_3_75``."""
    return lambda value: prefix + "-".join(
        part.strip().replace("=", "_") for part in str(value).split(",")
    )


_NOT_SET: Any = object()


@dataclass(frozen=True)
class Axis:
    """One scenario axis (see the module docstring)."""

    name: str
    #: The schema's type (a Python type or a ``Literal``) and the default value.
    type: Any
    default: Any
    #: Bounds for the schema (pydantic ``Field`` keywords: ``ge``, ``le``, ``min_length``, …).
    bounds: Mapping[str, Any] = field(default_factory=dict)
    #: A validator run before the type check (raises ``ValueError`` with the expected form).
    check: Callable[[Any], Any] | None = None
    #: Part of the load key: cells that differ in it need another loaded model.
    load: bool = False
    #: The workflows that use it (None: every workflow); for the others its value is an
    #: unused default, which ids and labels leave out.
    workflows: frozenset[str] | None = None
    #: The value that means "not used" (``lora: none``): no part in a cell id, no word in a
    #: brief row label or a conformance label.
    quiet: Any = _NOT_SET
    #: Its part of a cell id (``b2``, ``cfg7.5``, ``eager``).
    id: Spell = _id_plain
    #: Its words in a report row and the conformance matrix (``30 steps``, ``cfg 7.5``).
    label: Spell = _plain
    #: The conformance matrix tells workflow variants apart by it (the others go in
    #: parentheses).
    feature: bool = False
    #: The record fields that hold it (``resolution`` is ``width`` and ``height``).
    fields: tuple[str, ...] = ()

    @property
    def record_fields(self) -> tuple[str, ...]:
        return self.fields or (self.name,)

    def value_of(self, record: Mapping[str, Any]) -> Any:
        """The axis's value in a cell's record (a tuple for several fields)."""
        if len(self.record_fields) == 1:
            return record.get(self.name)
        return tuple(record.get(name) for name in self.record_fields)

    def used_by(self, workflow: Any) -> bool:
        return self.workflows is None or workflow in self.workflows

    @property
    def has_quiet(self) -> bool:
        return self.quiet is not _NOT_SET

    def is_quiet(self, value: Any) -> bool:
        return self.has_quiet and value == self.quiet


_IMG2IMG_LIKE = frozenset({"img2img", "inpaint", "outpaint", "controlnet_img2img",
                           "controlnet_inpaint"})
_INPAINT_LIKE = frozenset({"inpaint", "controlnet_inpaint"})
_CONTROLNET = frozenset(CONTROLNET_WORKFLOWS)

#: Every axis, in matrix / id / label order.
AXES: tuple[Axis, ...] = (
    Axis("backend", str, "diffusers", {"min_length": 1}, load=True),
    Axis("model", str, "tiny", {"min_length": 1}, load=True, feature=True),
    Axis("workflow", Workflow, "txt2img"),
    Axis("offload", Offload, "none", load=True, quiet="none",
         id=lambda v: "nooffload" if v == "none" else str(v)),
    Axis("source", Source, "hub", load=True, quiet="hub", label=_prefixed("with ")),
    Axis("prediction", Prediction, "auto", load=True, quiet="auto", id=_prefixed("pred-"),
         label=_suffixed("-prediction")),
    Axis("device", Device, "auto", load=True),
    Axis("dtype", DType, "fp32", load=True),
    Axis("compile", Compile, "none", load=True,
         id=lambda v: "eager" if v == "none" else f"compile-{v}",
         label=lambda v: "eager" if v == "none" else f"compile {v}"),
    Axis("fullgraph", bool, False, load=True, id=_flag("fullgraph", "graphbreaks"),
         label=_flag("fullgraph", "graph breaks")),
    Axis("attention", Attention, "sdp", load=True, label=_suffixed(" attention")),
    Axis("channels_last", bool, False, load=True, id=_flag("channels-last", "contiguous"),
         label=_flag("channels-last", "contiguous")),
    Axis("sampler", str, "euler", check=check_sampler, feature=True, label=_prefixed("sampler ")),
    Axis("resolution", tuple[int, int], (512, 512), check=parse_resolution,
         id=lambda v: f"{v[0]}x{v[1]}", label=lambda v: f"{v[0]}x{v[1]}",
         fields=("width", "height")),
    Axis("steps", int, 20, {"ge": 1, "le": 1000}, id=_prefixed("s"),
         label=_suffixed(" steps")),
    # multi-stage models (Kandinsky 2.2, DeepFloyd IF): a stage's own steps / guidance
    Axis("stage_steps", str, SAME_FOR_EVERY_STAGE, check=check_stage_values,
         quiet=SAME_FOR_EVERY_STAGE, id=_stage_id("steps-"), label=_stage_label("steps")),
    Axis("stage_guidance", str, SAME_FOR_EVERY_STAGE, check=check_stage_values,
         quiet=SAME_FOR_EVERY_STAGE, id=_stage_id("cfg-"), label=_stage_label("cfg")),
    Axis("x4_upscaler", bool, False, load=True, feature=True, quiet=False,
         id=_flag("x4", "no-x4"), label=_flag("with the x4 upscaler", "without the x4 upscaler")),
    Axis("guidance", float, 7.5, {"ge": 0}, id=_prefixed("cfg", _g), label=_prefixed("cfg ", _g)),
    Axis("seed", int, 0, {"ge": 0}, id=_prefixed("seed"), label=_prefixed("seed ")),
    Axis("batch", int, 1, {"ge": 1, "le": 256}, id=_prefixed("b"), label=_prefixed("batch ")),
    # workflow parameters
    Axis("strength", float, 0.75, {"ge": 0, "le": 1}, feature=True,
         workflows=_IMG2IMG_LIKE | {"hires"}, id=_prefixed("str", _g),
         label=_prefixed("strength ", _g)),
    Axis("init_image", str, "generated", {"min_length": 1}, feature=True,
         workflows=_IMG2IMG_LIKE, id=lambda v: f"init-{PurePath(v).stem}",
         label=_prefixed("init image ")),
    Axis("mask", str, "center", {"min_length": 1}, feature=True, workflows=_INPAINT_LIKE,
         id=lambda v: f"mask-{PurePath(v).stem}", label=_prefixed("mask ")),
    Axis("outpaint_px", int, 32, {"ge": 8, "le": 1024, "multiple_of": 8}, feature=True,
         workflows=frozenset({"outpaint"}), id=_prefixed("pad"),
         label=lambda v: f"outpaint {v} px"),
    Axis("hires_scale", float, 2.0, {"gt": 1, "le": 4}, feature=True,
         workflows=frozenset({"hires"}), id=_prefixed("x", _g), label=_prefixed("hires ×", _g)),
    Axis("hires_upscaler", Literal["latent", "image"], "latent", feature=True,
         workflows=frozenset({"hires"}), label=_suffixed(" upscaler")),
    # features
    Axis("lora", str, "none", check=check_lora, feature=True, quiet="none",
         id=lambda v: "lora-" + str(v).replace("zoo:", ""),
         label=lambda v: "no LoRA" if v == "none" else f"LoRA {lora_label(str(v))}"),
    Axis("embedding", str, "none", check=check_embedding, feature=True, quiet="none",
         id=lambda v: "embedding-" + str(v).replace("zoo:", ""),
         label=lambda v: "no embedding" if v == "none" else f"embedding {embedding_label(str(v))}"),
    # ControlNet (the controlnet workflows)
    Axis("controlnet", str, "auto", check=check_controlnet, feature=True, quiet="auto",
         workflows=_CONTROLNET, id=lambda v: "cn-" + _id_plain(str(v).replace("zoo:", "")),
         label=lambda v: f"ControlNet {lora_label(str(v))}"),
    Axis("control_image", str, "generated", {"min_length": 1}, feature=True,
         workflows=_CONTROLNET, id=lambda v: f"hint-{PurePath(v).stem}",
         label=_prefixed("control image ")),
    Axis("control_scale", float, 1.0, {"ge": 0, "le": 10}, feature=True, workflows=_CONTROLNET,
         id=_prefixed("cs", _g), label=_prefixed("control scale ", _g)),
    Axis("control_mode", ControlMode, "balanced", feature=True, workflows=_CONTROLNET,
         quiet="balanced", id=_prefixed("mode-"), label=_prefixed("control mode ")),
    Axis("control_start", float, 0.0, {"ge": 0, "le": 1}, feature=True, workflows=_CONTROLNET,
         quiet=0.0, id=_prefixed("from", _g), label=_prefixed("control from ", _g)),
    Axis("control_end", float, 1.0, {"ge": 0, "le": 1}, feature=True, workflows=_CONTROLNET,
         quiet=1.0, id=_prefixed("to", _g), label=_prefixed("control to ", _g)),
)


def by_name() -> dict[str, Axis]:
    """Axis name -> :class:`Axis` (read :data:`AXES` at call time: tests may extend it)."""
    return {axis.name: axis for axis in AXES}


def load_axes() -> tuple[str, ...]:
    """The axes of the load key."""
    return tuple(axis.name for axis in AXES if axis.load)


def record_fields() -> tuple[str, ...]:
    """Every axis's record fields, in table order (``resolution`` as width, height)."""
    return tuple(name for axis in AXES for name in axis.record_fields)


def shown_in_id(axis: Axis, combo: Mapping[str, Any]) -> bool:
    """Whether a cell id spells ``axis`` (a workflow parameter of its workflow; not quiet
    ``none`` features)."""
    value = combo[axis.name]
    if not axis.used_by(combo.get("workflow")):
        return False
    return not (axis.feature and axis.is_quiet(value))
