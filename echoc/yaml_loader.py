"""Reading a spec's YAML safely: a file (or a `--set` value) → plain data, with the line of every key.

Refused, each naming the line where the file has one: a file over MAX_FILE_BYTES, a directory,
bytes that are not UTF-8, control characters, YAML syntax errors, several documents, explicit
tags (`!!binary`, `!!python/...`), anchors and aliases that expand past MAX_VALUES values (the
"billion laughs" bomb) or that refer to the anchor they sit in, nesting deeper than MAX_DEPTH,
integers longer than MAX_INT_CHARS characters or written as YAML 1.1 octal (`010`) or base 60
(`1:30`), and duplicate keys (both lines named). Every check runs while composing, before any
value is built, so no input can make the loader hang or fill memory.

Dates are read as strings (`2024-01-01`), and `1e-3` as a float (YAML 1.1 wants `1.0e-3`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from echoc.errors import SpecError

MAX_FILE_BYTES = 1 << 20
MAX_VALUES = 100_000
MAX_DEPTH = 32
MAX_INT_CHARS = 64
MAX_REPORTED_LINES = 10

Parts = tuple[str, ...]
Lines = dict[Parts, int]
Problem = tuple[str, Optional[int], str]

_CORE = "tag:yaml.org,2002:"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]|\r(?!\Z)")
_OCTAL = re.compile(r"[-+]?0[0-7_]+")


@dataclass(frozen=True)
class YamlDoc:
    """A parsed file: `data` (None for an empty file), `lines` (1-based line of every key path and
    list item: ('model', 'moe', 'top_k') → 16) and `root_line` (where the document starts)."""
    data: Any
    lines: Lines
    root_line: Optional[int]


class RefusedYAML(yaml.MarkedYAMLError):
    """Valid YAML that a spec may not contain; `problem` is the whole message."""

    def __init__(self, mark: yaml.Mark, problem: str):
        super().__init__(problem=problem, problem_mark=mark)


class _Loader(yaml.SafeLoader):
    """SafeLoader that measures what it composes and refuses what a spec never needs."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._nesting = 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) → (values, depth) with aliases expanded

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._measured:
                raise RefusedYAML(event.start_mark, f"the alias *{event.anchor} sits inside its own anchor "
                                                    "(a recursive structure); write the values out")
            return node
        if getattr(event, "tag", None) not in (None, "!"):
            raise RefusedYAML(event.start_mark, f"the tag {_short_tag(event.tag)} is not allowed in a spec; "
                                                "write plain values (strings, numbers, true/false, null, lists, mappings)")
        self._nesting += 1
        try:
            if self._nesting > MAX_DEPTH:
                raise RefusedYAML(event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
            node = super().compose_node(parent, index)
        finally:
            self._nesting -= 1
        self._measure(node)
        return node

    def _measure(self, node: yaml.Node) -> None:
        """Record the node's size and depth (aliases expanded, from its already measured children)."""
        kids = _children(node)
        values = 1 + sum(self._measured[id(k)][0] for k in kids)
        depth = 1 + max((self._measured[id(k)][1] for k in kids), default=0)
        if values > MAX_VALUES:
            raise RefusedYAML(node.start_mark, f"this value expands to more than {MAX_VALUES:,} values through "
                                               "anchors and aliases (&name / *name); a spec needs a few hundred")
        if depth > MAX_DEPTH:
            raise RefusedYAML(node.start_mark, f"nested deeper than {MAX_DEPTH} levels through aliases")
        if isinstance(node, yaml.ScalarNode):
            _check_number(node)
        self._measured[id(node)] = (values, depth)


_Loader.add_implicit_resolver(
    _CORE + "float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
# Dates stay strings: a spec has no date fields, and `2024-13-45` would crash the date constructor.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _CORE + "timestamp"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()}


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_number(node: yaml.ScalarNode) -> None:
    """Refuse integers too long to read quickly, YAML 1.1 octal (`010` is 8) and base 60 (`1:30` is 90)."""
    text = node.value
    if node.tag == _CORE + "int" and len(text) > MAX_INT_CHARS:
        raise RefusedYAML(node.start_mark, f"an integer of {len(text)} characters; at most {MAX_INT_CHARS} are read")
    if node.tag in (_CORE + "int", _CORE + "float") and ":" in text:
        raise RefusedYAML(node.start_mark, f"{text!r} is a base-60 number in YAML 1.1; write it in decimal "
                                           "(or quote it if it is a string)")
    if node.tag == _CORE + "int" and _OCTAL.fullmatch(text):
        raise RefusedYAML(node.start_mark, f"{text!r} is octal in YAML 1.1 (a leading 0); write it without "
                                           "the leading 0, or as 0o... if octal is meant")


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag


# Public functions --------------------------------------------------------------------------------

def read_text(path: Path, source: str) -> str:
    """The file's text; a missing, unreadable, oversized or non-UTF-8 file is a SpecError."""
    try:
        if not source.strip():
            raise SpecError("''", [("(file)", None, "the spec's path is empty; give the spec's YAML file")])
        if path.is_dir():
            raise SpecError(source, [("(file)", None, "is a directory; give the spec's YAML file")])
        if path.exists() and not path.is_file():     # a FIFO or device: reading could block or never end
            raise SpecError(source, [("(file)", None, "is not a regular file; give the spec's YAML file")])
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(source, [("(file)", None, "file not found")]) from None
    except OSError as e:
        raise SpecError(source, [("(file)", None, f"cannot read the file: {e.strerror or e}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(source, [("(file)", None, f"larger than {MAX_FILE_BYTES // 1024} KiB; a spec is a few KiB")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise SpecError(source, [("(file)", line, f"not UTF-8: byte 0x{raw[e.start]:02x} at column {column}; "
                                                  "save the spec as UTF-8")]) from None


def parse_document(text: str, source: str) -> YamlDoc:
    """Parse a whole spec file; raise SpecError with every control character or duplicate key,
    or the first YAML or refused-construct problem."""
    problems = control_characters(text)
    if problems:
        raise SpecError(source, problems)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines: Lines = {}
        duplicates = _index_lines(node, (), lines) if node is not None else []
        if duplicates:
            raise SpecError(source, duplicates)
        data = _construct(loader, node)
    except yaml.YAMLError as e:
        raise SpecError(source, [(_where(e), yaml_line(e), yaml_message(e))]) from None
    finally:
        loader.dispose()
    return YamlDoc(data, lines, node.start_mark.line + 1 if node is not None else None)


def parse_value(text: str) -> Any:
    """One `--set` value read as YAML with the same checks; ValueError with the reason."""
    bad = _CONTROL.search(text)
    if bad:
        raise ValueError(f"the value holds the control character {_codepoint(bad.group())}")
    loader = _Loader(text)
    try:
        return _construct(loader, loader.get_single_node())
    except RefusedYAML as e:
        raise ValueError(f"the value is refused: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"the value is not valid YAML ({yaml_message(e)})") from None
    finally:
        loader.dispose()


def control_characters(text: str) -> list[Problem]:
    """One problem per line holding a control character (tab and newline are fine), the first few lines."""
    problems: list[Problem] = []
    hits = ((n, m) for n, line in enumerate(text.split("\n"), 1) for m in [_CONTROL.search(line)] if m)
    for count, (n, m) in enumerate(hits):
        if count == MAX_REPORTED_LINES:
            problems.append(("(file)", n, "more lines with control characters follow; is this a YAML file?"))
            break
        problems.append(("(file)", n, f"control character {_codepoint(m.group())} at column {m.start() + 1}; "
                                      "only tab and newline may appear (write \\uXXXX inside double quotes)"))
    return problems


def yaml_line(e: yaml.YAMLError) -> Optional[int]:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return mark.line + 1 if mark is not None else None


def yaml_message(e: yaml.YAMLError) -> str:
    if isinstance(e, RefusedYAML):
        return e.problem
    if isinstance(e, yaml.MarkedYAMLError):
        return "invalid YAML: " + "; ".join(p for p in (e.context, e.problem) if p)
    return "invalid YAML: " + " ".join(str(e).split())


# Helpers ----------------------------------------------------------------------------------------

def _where(e: yaml.YAMLError) -> str:
    return "(yaml)" if isinstance(e, RefusedYAML) else "(yaml syntax)"


def _construct(loader: _Loader, node: Optional[yaml.Node]) -> Any:
    """Python data for `node`, with aliased parts copied so that an override changes one place only."""
    if node is None:
        return None
    try:
        return _unshare(loader.construct_document(node))
    except (ValueError, OverflowError) as e:
        raise RefusedYAML(node.start_mark, f"a value cannot be read: {e}") from None


def _unshare(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unshare(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshare(v) for v in value]
    return value


def _index_lines(node: yaml.Node, at: Parts, lines: Lines) -> list[Problem]:
    """Fill `lines` for every key and list item under `node`; return duplicate-key and
    non-string-key problems."""
    dups: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        for knode, vnode in node.value:
            if knode.tag == _CORE + "merge":
                continue  # `<<: *anchor`: the merged keys keep the anchor's lines
            p = at + (str(knode.value) if isinstance(knode, yaml.ScalarNode) else "?",)
            line = knode.start_mark.line + 1
            if knode.tag != _CORE + "str":        # `~: 2`, `1: x`, `[a]: x`: no field is named so
                shown = knode.value if isinstance(knode, yaml.ScalarNode) else "a " + type(knode).__name__[:-4].lower()
                dups.append((".".join(at) or "(top level)", line,
                             f"key {shown!r} ({_short_tag(knode.tag)}) is not a field name; keys are plain words"))
                continue
            if p in lines:
                dups.append((".".join(p), line, f"duplicate key (first given on line {lines[p]})"))
                continue
            lines[p] = line
            dups += _index_lines(vnode, p, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[at + (str(i),)] = item.start_mark.line + 1
            dups += _index_lines(item, at + (str(i),), lines)
    return dups


def _codepoint(char: str) -> str:
    return "CR (a carriage return not followed by a newline)" if char == "\r" else f"U+{ord(char):04X}"
