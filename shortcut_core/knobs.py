"""A knob of the recipe, declared once beside its config field: default, range, tooltip, the node that shows
it and what a resumed checkpoint may do with it.

`knob(default, tooltip, low, high, step, ...)` is a dataclass field whose metadata holds a `Knob`. Whatever
needs a knob reads it from there: ShortcutConfig.validate() its range, the host the nodes' widgets and the
widget-to-config mapping (host/widgets.py), the headless command its arguments (from the nodes' widgets), the
checkpoint its resume rules (checkpoint.py). Nothing here knows ComfyUI: `shown_on` names a node by role.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

# Which node shows a knob (None: the engine's alone).
TRAIN = "train"        # Train Shortcut
OPTIONS = "options"    # Shortcut Training Options

# What resuming a checkpoint made with another value does.
LAYOUT = "layout"      # the value shapes the LoRA itself: refused
WARN = "warn"          # the run will differ from an uninterrupted one: warned
FREE = "free"          # the length of the run or its outputs: silently taken

# How a value is typed in (derived from the default unless given).
TEXT_LIST = "text list"  # a tuple of names, typed as comma-separated text; empty text is None


@dataclass(frozen=True)
class Knob:
    """One setting's declaration. A pair field (guidance_range, adam_betas) is shown as two widgets: `widgets`
    names them, and tooltip, low, high and step may then be pairs too (one for each)."""
    tooltip: str | tuple[str, ...]
    low: Any = None                  # smallest value allowed (inclusive)
    high: Any = None                 # largest value allowed (inclusive); None: no upper bound ...
    step: Any = None                 # the widget's increment
    cap: Any = None                  # ... and then the widget's largest value
    shown_on: str | None = None      # TRAIN, OPTIONS or None
    slot: int = 0                    # the widget's place on its node: saved workflows keep widget order
    auto: Any = None                 # a widget value meaning "the connected model family's", not a value of its own
    widgets: tuple[str, ...] = ()    # widget names for a pair field; else the field's own name
    resume: str = WARN
    kind: str | None = None          # TEXT_LIST; None: from the default's type
    choices: tuple[str, ...] = ()    # a value from a list
    widget: dict = field(default_factory=dict)  # further widget options (e.g. seed's control_after_generate)

    def part(self, value: Any, index: int) -> Any:
        """The pair member `index` of a per-widget value, or the value itself when it is shared."""
        return value[index] if isinstance(value, tuple) else value


def knob(default: Any, tooltip: str | tuple[str, ...], low: Any = None, high: Any = None, step: Any = None,
         **declared: Any) -> Any:
    """A dataclass field declaring a knob (see Knob)."""
    return field(default=default, metadata={"knob": Knob(tooltip, low, high, step, **declared)})


@dataclass(frozen=True)
class Widget:
    """One widget a knob shows: its name, its field, the part of a pair it is (None: the whole value), its
    default, range and tooltip."""
    name: str
    field: str
    part: int | None
    default: Any
    low: Any
    high: Any
    step: Any
    tooltip: str
    slot: int
    type: type               # bool, int, float or str: what the widget holds
    knob: Knob


def knobs_of(cls) -> Iterator[tuple[dataclasses.Field, Knob]]:
    """(field, knob) of every declared knob of a dataclass, in field order."""
    for f in dataclasses.fields(cls):
        if "knob" in f.metadata:
            yield f, f.metadata["knob"]


def widgets_of(cls, shown_on: str) -> list[Widget]:
    """The widgets of the knobs a node shows, in slot order, with the default a new node gets (a knob's
    `auto` where it has one: the model family's value)."""
    placed: list[Widget] = []
    for f, k in knobs_of(cls):
        if k.shown_on != shown_on:
            continue
        for i, name in enumerate(k.widgets or (f.name,)):
            part = i if k.widgets else None
            pick = (lambda v: k.part(v, i)) if part is not None else (lambda v: v)
            default = k.auto if k.auto is not None else pick(f.default)
            if k.kind == TEXT_LIST and default is None:
                default = ""
            low = pick(k.low)
            if k.auto is not None and low is not None:
                low = min(low, k.auto)  # the widget takes "auto" too
            high = pick(k.high) if k.high is not None else pick(k.cap)
            placed.append(Widget(name, f.name, part, default, low, high, pick(k.step), pick(k.tooltip),
                                 k.slot + i, str if k.kind == TEXT_LIST else type(pick(f.default)), k))
    return sorted(placed, key=lambda w: w.slot)


def field_value(widget_values: dict[str, Any], f: dataclasses.Field, k: Knob) -> Any:
    """A field's value from its widgets' values (a pair from its two widgets, a name list from its text)."""
    if k.widgets:
        return tuple(widget_values[name] for name in k.widgets)
    value = widget_values[f.name]
    if k.kind == TEXT_LIST:
        return tuple(name.strip() for name in value.split(",") if name.strip()) or None
    return value


def resume_fields(cls, rule: str) -> tuple[str, ...]:
    """The fields a resumed checkpoint treats by `rule` (LAYOUT, WARN or FREE)."""
    return tuple(f.name for f, k in knobs_of(cls) if k.resume == rule)
