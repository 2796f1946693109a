"""Declarative constraints on plugin parameters, checked before any work starts.

A plugin declares, next to its ``defaults``, a ``constraints`` mapping from parameter name to a
:class:`Param`::

    defaults = {"steps": 40, "route": "both", "step_size": 0.5}
    constraints = {"steps": Param("int", lo=1), "route": Param("str", choices=("both", "mu", "sigma")),
                   "step_size": Param("float", lo=0, lo_open=True)}

:func:`robbench.config.merge_params` checks every given value (each value of a swept list) and stops
the run with exit status 2 naming the key, the value and what is allowed. Parameters without a
constraint are only type-checked against their default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

KINDS = ("int", "float", "bool", "str", "any")


@dataclass(frozen=True)
class Param:
    """What one parameter accepts.

    kind: "int" (whole numbers, not bool), "float" (any finite number), "bool", "str" or "any";
    lo / hi: bounds, inclusive unless ``lo_open`` / ``hi_open``; choices: the allowed values;
    nullable: None is also allowed.
    """

    kind: str = "any"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[Any, ...] = ()
    nullable: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Param kind {self.kind!r}; allowed: {', '.join(KINDS)}")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.choices:
            return any(value == c and type(value) is type(c) for c in self.choices)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind == "int" and not (number and float(value).is_integer()):
            return False
        if self.kind == "float" and not (number and math.isfinite(value)):
            return False
        if self.kind == "bool" and not isinstance(value, bool):
            return False
        if self.kind == "str" and not isinstance(value, str):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return False
        return True

    def describe(self) -> str:
        """What is allowed, in words: e.g. "an integer >= 1", "one of 'mu', 'sigma'", "null or a number > 0"."""
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
                    "any": "any value"}[self.kind]
            bounds = []
            if self.lo is not None:
                bounds.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
            if self.hi is not None:
                bounds.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
            if bounds:
                text = text.replace("a finite number", "a number") + " " + " and ".join(bounds)
        return f"null or {text}" if self.nullable else text


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check(owner: str, key: str, value: Any, spec: Param) -> str | None:
    """None when ``value`` is allowed, else the message for ``owner.key``."""
    if spec.accepts(value):
        return None
    return f"bad value for {owner}.{key}: {value!r}; allowed: {spec.describe()}"
