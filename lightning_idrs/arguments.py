"""One rule per kind of argument, shared by the command line and the Python API.

The kinds below are types: jsonargparse checks every typed option (``n0: PositiveInt``) with them
when a command line or YAML file is parsed, and :func:`check` applies the same rule to a value given
in Python. The rule, decided once for the whole package:

* an **integer** is a whole number: ``2``, ``np.int64(2)`` and ``2.0`` are 2 (``--certify.n 1e5``
  is 100000 on the command line); ``2.5``, ``True`` and ``None`` are not integers;
* a **real** is a finite number (NaN and infinities are refused) and never a bool;
* strings are parsed on the command line / in YAML only; :func:`check` refuses them in Python.

Errors name the argument and the rule: ``n0 must be an integer >= 1, got 0``. A command reports
any :class:`UsageError` as one ``error: ...`` line and exit code 2 (see ``lightning_idrs.commands``).
"""
from __future__ import annotations

import math
import numbers

from jsonargparse.typing import register_type

__all__ = [
    "FiniteFloat",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "RadiusList",
    "Seed",
    "UsageError",
    "check",
    "one_line",
]


class UsageError(ValueError):
    """Bad input from the user (an argument, a file, the environment): one ``error:`` line, exit 2."""


def one_line(error) -> str:
    """A (possibly multi-line) message as one line: lines joined by '; ' (by ' ' after a colon)."""
    text = ""
    for line in filter(None, (line.strip() for line in str(error).splitlines())):
        text = line if not text else text + (" " if text.endswith(":") else "; ") + line
    return text


def _shown(value) -> str:
    """A value as the user typed it: command-line strings without quotes, Python values by repr."""
    return value if isinstance(value, str) else repr(value)


def _number(value, rule: str, integer: bool):
    """``value`` as a Python int / float, or ValueError('must be RULE, got VALUE')."""
    problem = ValueError(f"must be {rule}, got {_shown(value)}")
    if isinstance(value, str):  # only the command line and YAML hand us strings
        try:
            value = float(value) if integer and any(c in value for c in ".eE") else (int if integer else float)(value)
        except ValueError:
            raise problem from None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # NumPy / torch scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise problem
    if not math.isfinite(value):
        raise problem
    if integer:
        if not float(value).is_integer():
            raise problem
        return int(value)
    return float(value)


# Why not jsonargparse.typing's PositiveInt / OpenUnitInterval / ...: they refuse ``--certify.n 1e5`` (an
# integer written as a float, which researchers type), and their messages ("invalid literal for int()")
# do not state the rule; these kinds accept whole numbers in any spelling, and each error says
# "NAME must be RULE, got VALUE", the same on the command line, in YAML and in Python (check()).
class _Kind:
    """Mixin of the kinds: ``Kind(value)`` checks ``value`` against ``rule`` and ``accepts``."""

    rule = ""

    @staticmethod
    def accepts(value) -> bool:
        return True

    def __new__(cls, value):
        number = _number(value, cls.rule, issubclass(cls, int))
        if not cls.accepts(number):
            raise ValueError(f"must be {cls.rule}, got {_shown(value)}")
        return super().__new__(cls, number)

    def __repr__(self):
        return repr(int(self) if isinstance(self, int) else float(self))


class PositiveInt(_Kind, int):
    """An integer >= 1."""

    rule = "an integer >= 1"
    accepts = staticmethod(lambda v: v >= 1)


class NonNegativeInt(_Kind, int):
    """An integer >= 0."""

    rule = "an integer >= 0"
    accepts = staticmethod(lambda v: v >= 0)


class Seed(_Kind, int):
    """A seed of certification's noise: an integer in [0, 2^32), one 32-bit word of the noise's key
    (:mod:`lightning_idrs.philox`)."""

    rule = "an integer from 0 to 4294967295 (2^32 - 1)"
    accepts = staticmethod(lambda v: 0 <= v < 2**32)


class FiniteFloat(_Kind, float):
    """A finite real number."""

    rule = "a finite number"


class PositiveFloat(_Kind, float):
    """A finite real number > 0."""

    rule = "a finite number > 0"
    accepts = staticmethod(lambda v: v > 0)


class NonNegativeFloat(_Kind, float):
    """A finite real number >= 0."""

    rule = "a finite number >= 0"
    accepts = staticmethod(lambda v: v >= 0)


class OpenUnitInterval(_Kind, float):
    """A real number in (0, 1), e.g. a failure probability alpha."""

    rule = "a number in (0, 1)"
    accepts = staticmethod(lambda v: 0 < v < 1)


def _register(kind) -> None:
    """Let jsonargparse check options of ``kind``; parsed values are plain ints / floats (YAML-able)."""
    plain = int if issubclass(kind, int) else float
    register_type(kind, serializer=plain, deserializer=lambda value: plain(kind(value)))


for _kind in (PositiveInt, NonNegativeInt, Seed, FiniteFloat, PositiveFloat, NonNegativeFloat, OpenUnitInterval):
    _register(_kind)
del _kind


class RadiusList(list):
    """A non-empty list of radii >= 0: ``0.25,0.5`` or ``[0.25, 0.5]`` on the command line, a list in YAML."""

    rule = "a list of radii >= 0 such as 0.25,0.5,0.75,1.0"

    @classmethod
    def parse(cls, value) -> "RadiusList":
        shown = value if isinstance(value, str) else repr(value)
        if isinstance(value, str):
            value = [part.strip() for part in value.strip().strip("[]").split(",") if part.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"must be {cls.rule}, got {shown}")
        try:
            return cls(NonNegativeFloat(v) for v in value)
        except ValueError:
            raise ValueError(f"must be {cls.rule}, got {shown}") from None


register_type(RadiusList, serializer=lambda value: [float(v) for v in value], deserializer=RadiusList.parse)


def check(kind: type, value, name: str):
    """``value`` as a plain int / float if it is of ``kind`` (a class above), else ValueError naming ``name``."""
    if isinstance(value, str):
        raise ValueError(f"{name} must be {kind.rule}, got the string {value!r}")
    try:
        checked = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind.rule}, got {value!r}") from None
    return int(checked) if isinstance(checked, int) else float(checked)
