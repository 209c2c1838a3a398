"""Field types of the spec: strict numbers with sane bounds, safe names, path strings.

An integer field takes only an integer: not `true`, not `2.5`, not `1e30` (a float).
A float field takes an integer or a float, never a boolean or a string; NaN and ±inf are
refused by every section (`allow_inf_nan=False` in spec._Section).

The upper bounds are generous for real models up to ten times GLM-5 (78 layers, hidden
6144, 256 experts, vocab 154,880, 256 GPUs); they exist so that a typo cannot make compile
loop for hours or plan absurd buffers. docs/spec.md lists them.
"""
from __future__ import annotations

import re
from typing import Annotated, Optional

from pydantic import AfterValidator, Field, Strict

MAX_LAYERS = 1024
MAX_HIDDEN = 65_536
MAX_FFN = 262_144
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_LORA_RANK = 65_536
MAX_EXPERTS = 8192
MAX_SHARED_EXPERTS = 64
MAX_VOCAB = 10_000_000
MAX_TOKENS_PER_RANK = 2**24
MAX_WORLD = 2**20
MAX_GPUS_PER_NODE = 1024
MAX_ROW_ALIGNMENT = 4096
MAX_CAPACITY = 1024.0
MAX_STEPS = 10**9
MAX_SEED = 2**32 - 1
MAX_TIMEOUT_S = 86_400.0
MAX_NAME_CHARS = 64
MAX_PATH_CHARS = 4096


def int_in(lo: int, hi: int):
    """An integer field in [lo, hi]; booleans and floats are refused."""
    low = {"gt": 0} if lo == 1 else {"ge": lo}  # a positive field reads "must be > 0"
    return Annotated[int, Strict(), Field(le=hi, **low)]


Flag = Annotated[bool, Strict()]
"""A yes/no field: true or false only (not 1, 'on', 't' or 'yes' as strings)."""


def float_in(gt: Optional[float] = None, ge: Optional[float] = None,
             le: Optional[float] = None, lt: Optional[float] = None):
    """A finite float field with the given bounds; integers are accepted, booleans and strings are not."""
    return Annotated[float, Strict(), Field(gt=gt, ge=ge, le=le, lt=lt)]


_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _safe_name(name: str) -> str:
    """`name` if it is safe as one path component (build/<name>/); ValueError saying why not."""
    rule = (f"it names the build directory build/<name>/: use 1-{MAX_NAME_CHARS} letters, digits, "
            "'_', '-' or '.', not starting with '.' or '-'")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"{_short(name)} is {len(name)} characters long; {rule}")
    if not _NAME_CHARS.fullmatch(name):
        bad = next(c for c in name if not _NAME_CHARS.fullmatch(c))
        raise ValueError(f"{_short(name)} contains {bad!r}, not allowed in a file name; {rule}")
    if name[0] in ".-":
        raise ValueError(f"{_short(name)} starts with {name[0]!r}; {rule}")
    return name


def _no_control(text: str) -> str:
    """`text` if it holds no control character (a path with NUL cannot be opened)."""
    m = _CONTROL.search(text)
    if m:
        raise ValueError(f"{_short(text)} contains the control character U+{ord(m.group()):04X}; "
                         "a path may not contain control characters")
    return text


def _short(text: str, limit: int = 40) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 4] + "...'"


SafeName = Annotated[str, Strict(), Field(min_length=1), AfterValidator(_safe_name)]
PathText = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_PATH_CHARS), AfterValidator(_no_control)]
