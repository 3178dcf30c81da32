"""Model parameters declared as data: :class:`ModelParameter`, the shorthand
``name: value`` read as a declaration, and :func:`resolve_parameters`, the values of one run.

A model spec declares every parameter its code reads::

    parameters:
      batch_size: {type: int, default: 16, minimum: 1, description: cells per forward pass}
      emb_mode: {type: str, default: auto, choices: [auto, cls, cell], description: ...}

``name: value`` is shorthand for ``{type: <the value's type>, default: value}``. The
host resolves the values of a run before anything else happens: the declared defaults,
overridden by what the run sets, each checked against its declaration; a name the spec
does not declare is refused with the closest declared name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from czb.core.errors import SpecError, UnknownNameError
from czb.specs.names import shown

ParameterType = Literal["int", "float", "str", "bool"]
#: What a parameter name may be: it becomes a JSON key and a ``--param NAME=VALUE`` name.
PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _type_of(value: Any) -> ParameterType | None:
    """The declared type a shorthand value stands for (``None``: no parameter type)."""
    for kind, python in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(value, python):
            return kind  # type: ignore[return-value]
    return None


def convert(value: Any, kind: ParameterType, *, text: bool = False) -> Any:
    """``value`` as a parameter of type ``kind``, or :class:`ValueError` saying why not.

    Numbers are never bools, an ``int`` accepts a whole float (YAML's ``1e3``), a ``float``
    any finite number. With ``text``, a string is also parsed (a ``--param`` value).
    """
    if text and isinstance(value, str) and kind != "str":
        word = value.strip()
        if kind == "bool" and word.lower() in _TRUE + _FALSE:
            return word.lower() in _TRUE
        try:
            value = int(word) if kind == "int" else float(word) if kind == "float" else value
        except ValueError:
            pass
    ok = {
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool)
        or isinstance(value, float) and value.is_integer(),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
    }[kind]
    if not ok:
        given = repr(value) if isinstance(value, (bool, int, float)) else f"a {type(value).__name__}"
        wanted = {"float": "a finite float", "int": "an int"}.get(kind, f"a {kind}")
        msg = f"must be {wanted}, got {given}"
        raise ValueError(msg)
    return int(value) if kind == "int" else float(value) if kind == "float" else value


class ModelParameter(BaseModel):
    """One declared parameter of a model: its type, default and allowed values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ParameterType
    description: str = ""
    #: The only values allowed (of the parameter's type); ``None``: any.
    choices: list[Any] | None = None
    #: Bounds of ``int`` and ``float`` parameters, inclusive.
    minimum: int | float | None = None
    maximum: int | float | None = None
    #: The value a run gets unless it sets one (checked like any value; declared last, so
    #: that its check sees the fields above).
    default: Any

    @field_validator("choices")
    @classmethod
    def _choices_of_the_type(cls, value: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        kind = info.data.get("type")
        if value is None or kind is None:
            return value
        if not value:
            msg = "choices must list at least one value"
            raise ValueError(msg)
        try:
            return [convert(v, kind) for v in value]
        except ValueError as e:
            msg = f"each choice {e}"
            raise ValueError(msg) from None

    @field_validator("minimum", "maximum")
    @classmethod
    def _bounds_of_numbers(cls, value: float | None, info: ValidationInfo) -> float | None:
        kind = info.data.get("type")
        if value is not None and kind in ("str", "bool"):
            msg = f"applies to int and float parameters, not {kind}"
            raise ValueError(msg)
        if value is not None and not math.isfinite(value):
            msg = "must be a finite number"
            raise ValueError(msg)
        low = info.data.get("minimum")
        if info.field_name == "maximum" and value is not None and low is not None and low > value:
            msg = f"{value:g} is below minimum {low:g}"
            raise ValueError(msg)
        return value

    @field_validator("default")
    @classmethod
    def _valid_default(cls, value: Any, info: ValidationInfo) -> Any:
        if "type" not in info.data:
            return value  # the type itself is refused
        return _checked(value, info.data, text=False)

    @model_validator(mode="after")
    def _choices_within_bounds(self) -> ModelParameter:
        for choice in self.choices or ():
            try:
                _checked(choice, {**self.__dict__, "choices": None}, text=False)
            except ValueError as e:
                msg = f"choice {e}"
                raise ValueError(msg) from None
        return self

    def check(self, value: Any, *, text: bool = False) -> Any:
        """``value`` converted to this parameter's type, or :class:`ValueError` saying why not."""
        return _checked(value, self.__dict__, text=text)


def _checked(value: Any, declared: Mapping[str, Any], *, text: bool) -> Any:
    """``value`` as a parameter with the ``declared`` type, choices and bounds allow it."""
    value = convert(value, declared["type"], text=text)
    choices, low, high = declared.get("choices"), declared.get("minimum"), declared.get("maximum")
    if choices is not None and value not in choices:
        allowed = ", ".join(map(shown, choices[:10])) + (", ..." if len(choices) > 10 else "")
        msg = f"must be one of {allowed}, got {shown(value)}"
        raise ValueError(msg)
    if low is not None and value < low:
        msg = f"must be at least {low:g}, got {value!r}"
        raise ValueError(msg)
    if high is not None and value > high:
        msg = f"must be at most {high:g}, got {value!r}"
        raise ValueError(msg)
    return value


def declarations(value: Any) -> Any:
    """A spec's ``parameters`` with the shorthand ``name: value`` read as a declaration
    (before validation: what is not a mapping is left for pydantic to refuse)."""
    if not isinstance(value, Mapping):
        return value
    out: dict[Any, Any] = {}
    for name, given in value.items():
        if not isinstance(name, str) or not PARAMETER_NAME.fullmatch(name):
            msg = (f"parameter name {shown(name)} must start with a letter or _ and hold only letters, "
                   "digits and _ (at most 64)")
            raise ValueError(msg)
        if isinstance(given, (Mapping, ModelParameter)):
            out[name] = given
            continue
        kind = _type_of(given)
        if kind is None:
            msg = (f"parameter {name}: the shorthand `{name}: value` takes an int, float, str or bool; "
                   f"declare it as {{type: ..., default: ...}}")
            raise ValueError(msg)
        out[name] = {"type": kind, "default": given}
    return out


class DeclaresParameters(Protocol):
    """What :func:`resolve_parameters` reads of a model spec."""

    name: str
    parameters: Mapping[str, ModelParameter]


def resolve_parameters(spec: DeclaresParameters, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every declared parameter of ``spec`` with its value for one run.

    Parameters
    ----------
    spec
        A model spec (its ``name`` and declared ``parameters``).
    overrides
        Values the run sets (``RunOptions``: ``--batch-size``, ``--param NAME=VALUE``);
        strings are parsed as the declared type.

    Raises
    ------
    UnknownNameError
        An override names no declared parameter (the message names the closest ones).
    SpecError
        An override is not of its parameter's type, or outside its choices or bounds.
    """
    overrides = dict(overrides or {})
    for name in overrides:
        if name not in spec.parameters:
            raise UnknownNameError("parameter", name, spec.parameters, owner=f"model {spec.name!r}")
    values: dict[str, Any] = {}
    for name, declared in spec.parameters.items():
        if name not in overrides:
            values[name] = declared.default
            continue
        try:
            values[name] = declared.check(overrides[name], text=True)
        except ValueError as e:
            msg = f"model {spec.name!r}: parameter {name} {e}"
            raise SpecError(msg) from None
    return values
