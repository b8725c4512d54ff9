"""Node inputs checked against the node's own INPUT_TYPES before any work starts.

ComfyUI checks widget values when a prompt is queued, but not values that arrive through links
(an INT from another node) or from scripts calling the node: every number, flag and text is
checked here once more, and the error names the input and its allowed range.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable


def _problem(name: str, value: Any, kind: Any, options: dict) -> str | None:
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name}: expected a whole number, got {value!r}"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"{name}: expected a finite number, got {value!r}"
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{name}: expected true or false, got {value!r}"
        return None
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{name}: expected text, got {value!r}"
    else:
        return None  # choices (files: the node says which folder), MODEL, LATENT, ...: the node checks them
    lo, hi = options.get("min"), options.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return f"{name}: {value!r} is out of range; use a value from {lo} to {hi}"
    return None


def check_inputs(input_types: dict, values: dict[str, Any]) -> None:
    for section in ("required", "optional"):
        for name, (kind, *rest) in input_types.get(section, {}).items():
            if name not in values or (section == "optional" and values[name] is None):
                continue
            problem = _problem(name, values[name], kind, rest[0] if rest else {})
            if problem:
                raise ValueError(problem + ".")


def checked_inputs(method: Callable) -> Callable:
    """Decorate a node's FUNCTION: its arguments are checked against the class's INPUT_TYPES first."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def run(self, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        check_inputs(type(self).INPUT_TYPES(), dict(bound.arguments))
        return method(self, *args, **kwargs)

    return run
