"""Configuration YAML with line numbers: read, convert into strict structs, report every problem.

Used by the policy loader and by worker profiles (``workers/profile.py``). Three pieces:

- ``read``: YAML text → plain data (after ``yamlbounds``' size, depth and alias limits), with the
  line each value starts on kept per path; duplicate and non-string keys are problems (PyYAML
  would silently keep the last duplicate). Floats stay exact ``Decimal`` text.
- ``convert``: data → a msgspec type. When msgspec refuses, the problem is found by walking the
  data against the type's own description (``msgspec.inspect``), never by reading msgspec's
  message, so every problem of a struct is reported (not just the first) in our words, at its line.
- ``Problems``: the collected ``FILE:LINE: message`` list; ``ConfigError`` carries it.
"""

from __future__ import annotations

import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, TypeVar

import msgspec
import msgspec.inspect as mi
import yaml

from gateway.policy import yamlbounds

PathKey = tuple[str | int, ...]
T = TypeVar("T")


class ConfigError(Exception):
    """A configuration file was refused; ``problems`` holds every ``FILE:LINE: message``."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Problems:
    """Problems found in one file, each at the line of the value it is about."""

    def __init__(self, source: str, lines: dict[PathKey, int]):
        self.source = source
        self.lines = lines
        self.items: list[tuple[int, str]] = []

    def line_of(self, path: PathKey) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def add(self, path: PathKey, message: str, line: int | None = None) -> None:
        self.items.append((line if line is not None else self.line_of(path), message))

    def at(self, path: PathKey, message: str) -> None:
        """A problem about the value at ``path``, named by its dotted path (none at the top level)."""
        self.add(path, f"{dotted(path)}: {message}" if path else message)

    def render(self) -> list[str]:
        return [f"{self.source}:{line}: {msg}" for line, msg in sorted(self.items, key=lambda i: i[0])]


def dotted(path: PathKey) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "policy"


# --- read ---------------------------------------------------------------------------------------


def read(text: str, source: str, what: str = "policy") -> tuple[Any, Problems]:
    """YAML text → plain data, with the line of every value kept for ``FILE:LINE`` messages.
    Unreadable YAML, an empty document, and a document past ``yamlbounds``' size, depth or alias
    limits raise ``ConfigError`` at once — the limits before anything is composed; structural
    problems (duplicate keys, non-string keys) are collected in the returned ``Problems``."""
    lines: dict[PathKey, int] = {}
    problems = Problems(source, lines)
    try:
        yamlbounds.check_size(text, what)
        try:
            yamlbounds.check_events(yaml.parse(text, Loader=yamlbounds.FastLoader))
            node = yaml.compose(text, Loader=yamlbounds.FastLoader)
        except yaml.YAMLError as exc:
            if isinstance(exc, yaml.MarkedYAMLError) and "maximum nesting depth" in str(exc.problem):
                # libyaml's scanner, reading ahead, met its own depth limit (1000) before ours
                line = exc.problem_mark.line + 1 if exc.problem_mark else 1
                raise yamlbounds.TooBig(line, f"nested deeper than {yamlbounds.MAX_DEPTH} levels") from None
            # libyaml words its errors differently: the pure-Python reader gives the documented ones
            yamlbounds.check_events(yaml.parse(text, Loader=yaml.SafeLoader))
            node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yamlbounds.TooBig as exc:
        raise ConfigError([f"{source}:{exc.line}: {exc.message}"]) from None
    except yaml.MarkedYAMLError as exc:
        # Where a construct was opened (context) locates an unclosed one better than end of file.
        mark = exc.context_mark or exc.problem_mark
        line = mark.line + 1 if mark is not None else 1
        msg = ", ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError([f"{source}:{line}: invalid YAML: {msg}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}:1: invalid YAML: {exc}"]) from None
    if node is None:
        raise ConfigError([f"{source}:1: the {what} is empty"])
    return _to_python(node, (), lines, problems), problems


class _Constructor(yaml.constructor.SafeConstructor):
    pass


def _to_python(node: yaml.Node, path: PathKey, lines: dict[PathKey, int], problems: Problems) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node, path, problems)
            if not isinstance(key, str | int | bool) or isinstance(key, bool):
                problems.add(path, f"{dotted(path)}: keys must be strings", key_node.start_mark.line + 1)
                continue
            sub = (*path, str(key))
            if str(key) in out:
                problems.add(sub, f"{dotted(sub)}: duplicate key '{key}'", key_node.start_mark.line + 1)
                continue
            lines[sub] = key_node.start_mark.line + 1
            out[str(key)] = _to_python(value_node, sub, lines, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, (*path, i), lines, problems) for i, item in enumerate(node.value)]
    return _scalar(node, path, problems)


def _scalar(node: yaml.Node, path: PathKey, problems: Problems) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return node  # a collection used as a key: refused by the caller
    try:
        return _construct(node)
    except (yaml.YAMLError, ValueError, OverflowError) as exc:  # an unknown tag, `!!int abc`, ...
        reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else str(exc)
        problems.add(path, f"{dotted(path)}: cannot read {node.value!r}: {reason}", node.start_mark.line + 1)
        return None


def _construct(node: yaml.ScalarNode) -> Any:
    if node.tag == "tag:yaml.org,2002:float":
        # Prices are money: keep the decimal text exactly instead of going through a binary float.
        try:
            value = Decimal(str(node.value).replace("_", ""))
        except InvalidOperation:
            return str(node.value)  # .inf / .nan: refused later as "not a number"
        return value if value.is_finite() else str(node.value)
    return _Constructor().construct_object(node)


# --- convert ------------------------------------------------------------------------------------


def convert(data: Any, type_: type[T], path: PathKey, problems: Problems) -> T | None:
    """``data`` as ``type_``; None, with every problem added to ``problems``, if it is not one."""
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        if not _explain(data, mi.type_info(type_), path, problems):
            problems.at(path, str(exc))  # a rule msgspec holds that the walk below does not know
        return None


def convert_top(data: dict[str, Any], type_: type[T], problems: Problems, required: dict[str, Any]) -> T:
    """A file's top level, strictly: every problem is reported, and the fields that were right are
    kept (the others take their defaults, ``required`` ones the value given) so that the rest of the
    file is still checked."""
    top = convert(data, type_, (), problems)
    if top is not None:
        return top
    good = dict(required)
    for key, value in data.items():
        try:
            msgspec.convert({**good, key: value}, type_)
        except msgspec.ValidationError:
            continue
        good[key] = value
    return msgspec.convert(good, type_)


def _fits(value: Any, info: mi.Type) -> bool:
    try:
        msgspec.convert(value, _python_type(info))
    except msgspec.ValidationError:
        return False
    return True


def _python_type(info: mi.Type) -> Any:
    if isinstance(info, mi.StructType | mi.EnumType):
        return info.cls
    if isinstance(info, mi.UnionType):
        members = tuple(_python_type(t) for t in info.types)
        out = members[0]
        for t in members[1:]:
            out = out | t
        return out
    if isinstance(info, mi.ListType):
        return list[_python_type(info.item_type)]  # type: ignore[misc]
    if isinstance(info, mi.DictType):
        return dict[_python_type(info.key_type), _python_type(info.value_type)]  # type: ignore[misc]
    if isinstance(info, mi.LiteralType):
        return Literal[tuple(info.values)]
    return _SCALARS.get(type(info), Any)


_SCALARS: dict[type[mi.Type], Any] = {
    mi.IntType: int,
    mi.StrType: str,
    mi.BoolType: bool,
    mi.FloatType: float,
    mi.DecimalType: Decimal,
    mi.NoneType: type(None),
    mi.DateType: datetime.date,
}
_NAMES: dict[type[mi.Type], str] = {
    mi.IntType: "int",
    mi.StrType: "str",
    mi.BoolType: "bool",
    mi.FloatType: "float",
    mi.DateType: "date",
    mi.ListType: "array",
    mi.DictType: "object",
    mi.StructType: "object",
}


def _kind(value: Any) -> str:
    """What a YAML value is, in the words of the messages: str, int, number, bool, array, object, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float | Decimal):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _explain(value: Any, info: mi.Type, path: PathKey, problems: Problems) -> bool:
    """Add the problems of ``value`` as ``info``; False if none was found."""
    if isinstance(info, mi.UnionType):
        others = [t for t in info.types if not isinstance(t, mi.NoneType)]
        if value is None and len(others) < len(info.types):
            return False
        if any(_fits(value, t) for t in others):
            return False
        shaped = [t for t in others if _NAMES.get(type(t)) == _kind(value)]  # an object for a struct, …
        if len(others) == 1 or len(shaped) == 1:
            return _explain(value, (shaped or others)[0], path, problems)
        problems.at(path, f"expected {' | '.join(_NAMES.get(type(t), 'value') for t in others)}, got {_kind(value)}")
        return True
    if isinstance(info, mi.StructType):
        return _explain_struct(value, info, path, problems)
    if isinstance(info, mi.ListType):
        if not isinstance(value, list):
            problems.at(path, f"expected array, got {_kind(value)}")
            return True
        found = [_explain(v, info.item_type, (*path, i), problems) for i, v in enumerate(value)]
        return any(found)
    if isinstance(info, mi.DictType):
        if not isinstance(value, dict):
            problems.at(path, f"expected object, got {_kind(value)}")
            return True
        found = [_explain(v, info.value_type, (*path, k), problems) for k, v in value.items()]
        return any(found)
    if isinstance(info, mi.LiteralType | mi.EnumType):
        allowed = info.values if isinstance(info, mi.LiteralType) else [m.value for m in info.cls]
        if value in allowed and not isinstance(value, bool):
            return False
        problems.at(path, f"must be one of {', '.join(map(str, allowed))}, not {value!r}")
        return True
    if isinstance(info, mi.IntType) and info.ge is not None and _kind(value) in ("int", "bool"):
        if value >= info.ge and not isinstance(value, bool):
            return False
        problems.at(path, f"must be a whole number of at least {info.ge}")
        return True
    if _fits(value, info):
        return False
    if isinstance(info, mi.DecimalType):
        problems.at(path, "expected a number")
    else:
        problems.at(path, f"expected {_NAMES.get(type(info), 'a value')}, got {_kind(value)}")
    return True


def _explain_struct(value: Any, info: mi.StructType, path: PathKey, problems: Problems) -> bool:
    if not isinstance(value, dict):
        problems.at(path, f"expected object, got {_kind(value)}")
        return True
    fields = {f.encode_name: f for f in info.fields}
    found = False
    if info.forbid_unknown_fields:
        for key in value:
            if key not in fields:
                problems.add(
                    (*path, key), f"{dotted(path)}: unknown field '{key}'" if path else f"unknown field '{key}'"
                )
                found = True
    for name, field in fields.items():
        if name not in value:
            if field.required:
                problems.at(path, f"missing required field '{name}'")
                found = True
        elif _explain(value[name], field.type, (*path, name), problems):
            found = True
    return found
