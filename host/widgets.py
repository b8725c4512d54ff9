"""The knobs as ComfyUI widgets. Each knob is declared once, beside its field (ShortcutConfig's in the engine,
RunSettings' in host/run.py): here those declarations become the widgets of the node they name, in their slots,
and the widgets' values become the run's ShortcutConfig, with "auto" values settled for the model's family."""

from __future__ import annotations

from typing import Any, Mapping

from ..shortcut_core.config import SCHEDULE_KNOBS, ShortcutConfig
from ..shortcut_core.knobs import Widget, field_value, knobs_of, widgets_of
from .files import lora_names
from .run import LORA_FILE, NO_RESUME, RunSettings


def node_widgets(shown_on: str) -> list[Widget]:
    """Every knob widget a node shows (TRAIN or OPTIONS), in slot order."""
    return sorted([*widgets_of(ShortcutConfig, shown_on), *widgets_of(RunSettings, shown_on)], key=lambda w: w.slot)


def widget_spec(widget: Widget) -> tuple:
    """A widget as a node's INPUT_TYPES entry."""
    options: dict[str, Any] = {"tooltip": widget.tooltip}
    if widget.knob.kind == LORA_FILE:
        return [NO_RESUME] + lora_names(), options
    if widget.knob.choices:
        return list(widget.knob.choices), {"default": widget.default, **options}
    kind = {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}[widget.type]
    spec: dict[str, Any] = {"default": widget.default}
    if kind in ("INT", "FLOAT"):
        spec.update(min=widget.low, max=widget.high)
    if kind == "FLOAT":
        spec.update(step=widget.step if widget.step is not None else 0.01, round=False)
    return kind, {**spec, **widget.knob.widget, **options}


def knob_inputs(shown_on: str) -> dict[str, tuple]:
    """The INPUT_TYPES entries of a node's knob widgets, in slot order."""
    return {w.name: widget_spec(w) for w in node_widgets(shown_on)}


def settled_config(values: Mapping[str, Any], family_schedule: Mapping[str, float], extra: dict) -> ShortcutConfig:
    """The run's ShortcutConfig from every knob widget's value (Train Shortcut's and the options'). A knob at its
    "auto" value takes the family's (family_schedule). A workflow saved by 0.4.0, before "auto" existed, holds
    the paper's Flux values in all of them, which then meant the family's: it still gets the family's."""
    saved_by_0_4 = all(values[name] == getattr(ShortcutConfig, name) for name in SCHEDULE_KNOBS)
    fields = {}
    for f, k in knobs_of(ShortcutConfig):
        if k.shown_on is None:
            continue
        value = field_value(values, f, k)
        from_family = f.name in SCHEDULE_KNOBS and (saved_by_0_4 or value == k.auto)
        fields[f.name] = family_schedule[f.name] if from_family else value
    return ShortcutConfig(**fields, extra=extra)


def run_settings(values: Mapping[str, Any]) -> RunSettings:
    """The RunSettings from their widgets' values."""
    return RunSettings(**{f.name: field_value(values, f, k) for f, k in knobs_of(RunSettings)})
