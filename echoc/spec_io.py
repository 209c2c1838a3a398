"""Spec I/O: a YAML file (plus `--set` overrides) → a validated `Spec`.

Every problem comes back as one `SpecError` listing (yaml path, line, message)
triples: unreadable files and hostile YAML (echoc/yaml_loader.py), malformed overrides,
every pydantic error and every cross-field rule of `Spec`, all at once where pydantic
collects them. Paths are dotted (`model.moe.top_k`, list items by index:
`cluster.domains.0.nodes`); the line is that of the deepest key of the path present in
the file, or None with "(from --set)" in the message when an override put the value there.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
import types
from pathlib import Path
from typing import Any, Iterable, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from echoc.errors import SpecError
from echoc.spec import Spec, SpecCrossFieldError
from echoc.yaml_loader import Lines, Parts, parse_document, parse_value, read_text

FROM_SET = "(from --set)"
_OVERRIDE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


# Public API ------------------------------------------------------------------------------------

def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> Spec:
    """Read, override and validate the spec at `path`; raise SpecError listing every problem.

    `overrides` are `PATH=VALUE` strings (VALUE is read as YAML: `parallel.ep=2`,
    `echo.enabled=true`, `cluster.domains=[{nodes: [0]}]`). A relative `train.data.path`
    is resolved against the spec file's directory (from the current directory when it
    came from an override); the returned Spec holds it absolute.
    """
    path, source = Path(path), str(path)
    doc = parse_document(read_text(path, source), source)
    if not isinstance(doc.data, dict):
        raise SpecError(source, [("(top level)", doc.root_line, _not_a_mapping(doc.data))])
    set_paths = _apply_overrides(doc.data, list(overrides), source)
    spec = _validate(doc.data, source, doc.lines, set_paths)
    base = Path.cwd() if _is_set(("train", "data", "path"), set_paths) else path.resolve().parent
    return _absolute_data_path(spec, base)


def spec_from_dict(d: dict, source: str = "<dict>") -> Spec:
    """Validate a plain dict (as YAML would give) into a Spec; problems come without lines.

    A relative train.data.path is kept as given (relative to the current directory).
    """
    if not isinstance(d, dict):
        raise SpecError(source, [("(top level)", None, _not_a_mapping(d))])
    return _validate(d, source, {}, [])


def spec_hash(spec: Spec) -> str:
    """First 16 hex chars of the sha256 of the spec's canonical JSON (sorted keys, defaults filled)."""
    canon = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def json_schema() -> dict:
    """The JSON schema of a spec (for editor completion and docs)."""
    return Spec.model_json_schema()


def _not_a_mapping(data: Any) -> str:
    keys = ", ".join(Spec.model_fields)
    if data is None:
        return f"the spec is empty; expected a mapping with the sections {keys}"
    return f"expected a mapping with the sections {keys}; got {_kind(data)}"


# Overrides -------------------------------------------------------------------------------------


def _apply_overrides(data: dict, overrides: list[str], source: str) -> list[Parts]:
    """Set each `PATH=VALUE` in `data` (in place, creating sections); return the paths set."""
    problems, done = [], []
    for text in overrides:
        try:
            parts, value = _parse_override(text)
            _set_path(data, parts, value)
            done.append(parts)
        except ValueError as e:
            problems.append((text.partition("=")[0].strip() or text, None, f"{FROM_SET} {text!r}: {e}"))
    if problems:
        raise SpecError(source, problems)
    return done


def _parse_override(text: str) -> tuple[Parts, Any]:
    """'model.moe.top_k=4' → (('model', 'moe', 'top_k'), 4); ValueError if malformed."""
    path, eq, raw = text.partition("=")
    parts = tuple(path.strip().split("."))
    if not eq or not all(_OVERRIDE_PATH.fullmatch(p) for p in parts):
        raise ValueError("expected PATH=VALUE with a dotted PATH, e.g. parallel.ep=2")
    if not raw.strip():
        raise ValueError("the value is empty; write null to unset an optional field")
    return parts, parse_value(raw)


def _set_path(data: dict, parts: Parts, value: Any) -> None:
    """data[p0][p1]...[pn] = value, creating missing (or null) sections; ValueError on a scalar."""
    node: Any = data
    for i, key in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ValueError(f"{'.'.join(parts[:i])} has {len(node)} item(s); no index {key}")
            key = int(key)
        elif not isinstance(node, dict):
            raise ValueError(f"{'.'.join(parts[:i])} is {_kind(node)}, not a section")
        elif not last and node.get(key) is None:
            if parts[i + 1].isdigit():
                raise ValueError(f"{'.'.join(parts[:i + 1])} is not set; give the whole list, "
                                 f"e.g. {'.'.join(parts[:i + 1])}=[...]")
            node[key] = {}
        if last:
            node[key] = value
        else:
            node = node[key]


def _is_set(parts: Parts, set_paths: list[Parts]) -> bool:
    """True when an override set `parts` or a section containing it."""
    return any(parts[:len(s)] == s for s in set_paths)


# Validation and error conversion ---------------------------------------------------------------

def _validate(data: dict, source: str, lines: Lines, set_paths: list[Parts]) -> Spec:
    """Spec.model_validate(data), every error turned into one SpecError."""
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        problems = [_locate(parts, msg, lines, set_paths) for parts, msg in _problems(exc)]
        raise SpecError(source, problems) from None


def _locate(parts: Parts, msg: str, lines: Lines, set_paths: list[Parts]) -> tuple[str, int | None, str]:
    """(dotted path, line of its deepest key in the file, message), or no line if from --set.

    From --set: an override set `parts` or a section above it, or created the first key of
    `parts` that the file lacks (e.g. `--set echo.enabled=true` when the file has no echo).
    """
    path = ".".join(parts) or "(top level)"
    n = next((n for n in range(len(parts), 0, -1) if parts[:n] in lines), 0)
    created = n < len(parts) and any(s[:n + 1] == parts[:n + 1] for s in set_paths)
    if created or _is_set(parts, set_paths):
        return path, None, f"{FROM_SET} {msg}"
    return path, lines.get(parts[:n]), msg


def _problems(exc: ValidationError) -> list[tuple[Parts, str]]:
    """Every pydantic error as (path parts, message); SpecCrossFieldErrors expand to their pairs."""
    out = []
    for err in exc.errors():
        parts = _clean_loc(err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, SpecCrossFieldError):
            out += [(parts + tuple(p.split(".")), m) for p, m in cause.errors]
        else:
            out.append(_describe(err, parts))
    return out


def _describe(err: dict, parts: Parts) -> tuple[Parts, str]:
    """One pydantic error → (path parts, message saying what was given and what is allowed)."""
    kind, ctx, given = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "missing":
        return parts, "required"
    if kind == "extra_forbidden":
        return parts, _unknown_key(parts[-1], _allowed_keys(err["loc"][:-1]))
    if kind == "literal_error":
        hint = ("; YAML reads unquoted on/off/yes/no as true/false: quote a word meant as text"
                if isinstance(given, bool) else "")
        return parts, f"{_show(given)} is not allowed; allowed values are {ctx['expected']}{hint}"
    if kind == "union_tag_invalid":
        return parts + ("kind",), f"{ctx['tag']!r} is not allowed; allowed values are {ctx['expected_tags']}"
    if kind == "union_tag_not_found":
        return parts + ("kind",), f"required; allowed values are {_tags(err['loc'])}"
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        return parts, f"must be {op} {_number(ctx[key])}; got {_show(given)}"
    if kind == "finite_number":
        return parts, f"must be a finite number (not .nan or .inf); got {_show(given)}"
    if kind in ("int_type", "float_type") and isinstance(given, (bool, float)):
        return parts, _not_a_number(kind, given)
    if kind in _EXPECTED:
        return parts, f"expected {_EXPECTED[kind]}; got {_show(given)}"
    if kind == "too_short":
        return parts, f"must have at least {ctx['min_length']} item(s); got {_show(given)}"
    if kind == "string_too_short":
        return parts, f"must have at least {ctx['min_length']} character(s); got {_show(given)}"
    if kind == "string_too_long":
        return parts, f"must have at most {ctx['max_length']} characters; got {len(given)}"
    if kind == "string_pattern_mismatch":
        return parts, f"{_show(given)} must match the pattern {ctx['pattern']}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return parts, str(ctx["error"])
    return parts, f"{err['msg']}; got {_show(given)}"


_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"),
           "less_than": ("<", "lt"), "less_than_equal": ("<=", "le")}
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "a whole number",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
    "tuple_type": "a list", "too_long": "fewer items",
    "model_type": "a section (a mapping of keys)", "model_attributes_type": "a section (a mapping of keys)",
    "dict_type": "a section (a mapping of keys)",
}


def _not_a_number(kind: str, given: bool | float) -> str:
    """A boolean where a number belongs, or a float where an integer belongs: never converted."""
    want = "an integer" if kind == "int_type" else "a number"
    if isinstance(given, bool):
        return f"expected {want}, not a boolean; got {_show(given)}"
    return f"expected an integer; got {_show(given)} (a float: write a whole number without '.' or 'e')"


def _unknown_key(key: str, allowed: list[str]) -> str:
    hint = difflib.get_close_matches(key, allowed, n=1)
    near = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown key{near}; allowed keys here are: {', '.join(allowed)}"


# Walking the Spec's types along a pydantic loc -------------------------------------------------

def _clean_loc(loc: tuple) -> Parts:
    """A pydantic loc as YAML path parts: discriminated-union tags (e.g. 'gqa') dropped."""
    return _walk(loc)[0]


def _type_at(loc: tuple) -> Any:
    """The annotation the Spec has at pydantic loc `loc` (None where it cannot tell)."""
    return _walk(loc)[1]


def _walk(loc: tuple) -> tuple[Parts, Any]:
    """Follow `loc` through Spec's annotations: (YAML path parts, annotation reached)."""
    parts: list[str] = []
    tp: Any = Spec
    for item in loc:
        members = _models_of(tp)
        tagged = [m for m in members if "kind" in m.model_fields and m.model_fields["kind"].default == item]
        if len(members) > 1 and tagged:
            tp = tagged[0]  # a union tag in the loc, not a YAML key
            continue
        parts.append(str(item))
        tp = _child_type(tp, item)
    return tuple(parts), tp


def _child_type(tp: Any, item: Any) -> Any:
    """The type of field/index `item` inside `tp`."""
    models = _models_of(tp)
    if len(models) == 1 and isinstance(item, str):
        field = models[0].model_fields.get(item)
        return field.annotation if field else None
    args = [a for a in get_args(_strip_optional(tp)) if a is not Ellipsis]
    return args[0] if args and isinstance(item, int) else None


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _models_of(tp: Any) -> list[type[BaseModel]]:
    """The pydantic models `tp` may be: [M] for M or Optional[M], all members of a union."""
    tp = _strip_optional(tp)
    cands = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    return [c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)]


def _allowed_keys(section_loc: tuple) -> list[str]:
    models = _models_of(_type_at(section_loc))
    return list(dict.fromkeys(k for m in models for k in m.model_fields))


def _tags(loc: tuple) -> str:
    return ", ".join(repr(m.model_fields["kind"].default) for m in _models_of(_type_at(loc)))


# Small helpers ---------------------------------------------------------------------------------

def _kind(v: Any) -> str:
    """'a mapping', 'a list [1, 2]', 'int 64', "str 'x'": a value's kind for messages."""
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return f"a list {_show(v)}"
    return f"{type(v).__name__} {_show(v)}"


def _show(v: Any, limit: int = 60) -> str:
    """`v` for a message, null and booleans spelled as in YAML."""
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _number(bound: float) -> float:
    """A bound as the user would write it: 0 rather than 0.0, 1e-06 kept."""
    return int(bound) if isinstance(bound, float) and bound.is_integer() else bound


def _absolute_data_path(spec: Spec, base: Path) -> Spec:
    """`spec` with train.data.path made absolute against `base` (unchanged if unset or absolute)."""
    data = spec.train.data
    if not data.path or Path(data.path).is_absolute():
        return spec
    new_data = data.model_copy(update={"path": str((base / data.path).resolve())})
    return spec.model_copy(update={"train": spec.train.model_copy(update={"data": new_data})})
