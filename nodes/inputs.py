"""Node inputs checked against the node's own INPUT_TYPES before any work starts (host/checks.py says why)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from ..host.checks import check_inputs


def checked_inputs(method: Callable) -> Callable:
    """Decorate a node's FUNCTION: its arguments are checked against the class's INPUT_TYPES first."""
    signature = inspect.signature(method)
    keywords = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(method)
    def run(self, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        values = dict(bound.arguments)
        values.update(values.pop(keywords, None) or {})  # widgets taken as **values
        check_inputs(type(self).INPUT_TYPES(), values)
        return method(self, *args, **kwargs)

    return run
