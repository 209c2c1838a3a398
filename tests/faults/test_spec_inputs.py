"""Hostile or careless spec inputs: each is refused with an error naming the YAML path, the
line and what is allowed; none hangs, eats memory or ends in a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Annotated, Iterator, Union, get_args, get_origin

import annotated_types
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from echoc.errors import SpecError
from echoc.spec import GQAConfig, Spec
from echoc.spec_io import load_spec, spec_from_dict
from support import tiny_spec_dict

ROOT = Path(__file__).resolve().parents[2]
SENTINEL = "SENTINEL_VALUE"


def spec_text(path: str | None = None, raw: str = "") -> tuple[str, int | None]:
    """The tiny spec as YAML with the value at dotted `path` written as `raw`: (text, its line)."""
    text = yaml.safe_dump(tiny_spec_dict({path: SENTINEL} if path else {}), sort_keys=False)
    if path is None:
        return text, None
    line = next(i for i, t in enumerate(text.splitlines(), 1) if SENTINEL in t)
    return text.replace(SENTINEL, raw), line


def problems(tmp_path: Path, text: str | bytes, overrides=()) -> list[tuple[str, int | None, str]]:
    p = tmp_path / "spec.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SpecError) as info:
        load_spec(p, list(overrides))
    return info.value.problems


def only(found, path: str) -> tuple[int | None, str]:
    hits = [(line, msg) for p, line, msg in found if p == path]
    assert hits, f"no problem at {path}: {found}"
    return hits[0]


def load_text(tmp_path: Path, text: str, overrides=()) -> Spec:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return load_spec(p, list(overrides))


# Every number field of the spec, found by walking its sections -----------------------------------

def _strip_optional(tp):
    if get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _constraints(tp, meta: list) -> tuple[type, list]:
    """(base type, flat constraint list) of an annotation that may be Annotated[...] (e.g. inside Optional)."""
    if get_origin(tp) is Annotated:
        tp, meta = get_args(tp)[0], meta + list(tp.__metadata__)
    flat = []
    for m in meta:
        flat += m.metadata if isinstance(m, FieldInfo) else [m]
    return tp, flat


def number_fields(model: type[BaseModel] = Spec, prefix: str = "") -> Iterator[tuple[str, type, list]]:
    """(dotted path, int or float, constraint metadata) for every number field; attention as gqa."""
    for name, field in model.model_fields.items():
        tp, meta = _constraints(_strip_optional(field.annotation), list(field.metadata))
        if name == "attention":
            tp = GQAConfig
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            yield from number_fields(tp, f"{prefix}{name}.")
        elif tp in (int, float):
            yield f"{prefix}{name}", tp, meta


INTS = [(p, m) for p, tp, m in number_fields() if tp is int]
FLOATS = [(p, m) for p, tp, m in number_fields() if tp is float]


def lower_bound(meta) -> tuple[str, float]:
    gt = [("gt", c.gt) for c in meta if isinstance(c, annotated_types.Gt)]
    return (gt + [("ge", c.ge) for c in meta if isinstance(c, annotated_types.Ge)] + [("none", 0)])[0]


def test_the_walk_finds_the_fields():
    ints, floats = {p for p, _ in INTS}, {p for p, _ in FLOATS}
    assert {"model.num_layers", "model.moe.num_experts", "budgets.seq_len", "train.seed"} <= ints
    assert {"budgets.received_token_capacity", "train.optimizer.lr", "train.collective_timeout_s",
            "model.attention.rope_theta", "cluster.inter_domain_gbps"} <= floats
    assert lower_bound(dict(INTS)["budgets.tokens_per_rank"]) == ("gt", 0)  # inside Optional


@pytest.mark.parametrize("raw", [".nan", ".inf", "-.inf", ".NaN"])
@pytest.mark.parametrize("path", [p for p, _ in FLOATS])
def test_nonfinite_float_is_refused(tmp_path, path, raw):
    text, line = spec_text(path, raw)
    got_line, msg = only(problems(tmp_path, text), path)
    assert got_line == line and "must be a finite number (not .nan or .inf)" in msg


@pytest.mark.parametrize("path", [p for p, _ in INTS + FLOATS])
def test_boolean_is_not_a_number(tmp_path, path):
    text, line = spec_text(path, "true")
    got_line, msg = only(problems(tmp_path, text), path)
    assert got_line == line and "not a boolean; got true" in msg


@pytest.mark.parametrize("raw", ["1e30", "2.5", "3.0", "'3'"])
@pytest.mark.parametrize("path", [p for p, _ in INTS])
def test_float_or_string_is_not_an_integer(tmp_path, path, raw):
    text, line = spec_text(path, raw)
    got_line, msg = only(problems(tmp_path, text), path)
    assert got_line == line and msg.startswith("expected an integer")


@pytest.mark.parametrize("path,meta", INTS + FLOATS, ids=[p for p, _ in INTS + FLOATS])
def test_zero_only_where_it_makes_sense(tmp_path, path, meta):
    """Fields with gt=0 refuse 0; the others (q_lora_rank, first_dense_layers, seed, ...) give 0 a meaning."""
    text, line = spec_text(path, "0")
    kind, bound = lower_bound(meta)
    if kind == "gt" and bound == 0:
        got_line, msg = only(problems(tmp_path, text), path)
        assert got_line == line and "must be > 0; got 0" in msg
    elif path == "budgets.received_token_capacity":
        assert "must be >= 1.0" in only(problems(tmp_path, text), path)[1]
    elif kind == "ge" and bound > 0:       # a floor above 0 (link bandwidth, collective timeout): 0 is below it
        assert f"must be >= {bound:g}" in only(problems(tmp_path, text), path)[1]
    else:
        assert kind == "ge" and bound == 0, f"{path}: decide whether 0 makes sense"
        load_text(tmp_path, text)


@pytest.mark.parametrize("path,value,bound", [
    ("model.num_layers", 1025, 1024), ("model.hidden_size", 65537, 65536), ("model.vocab_size", 10_000_001, 10_000_000),
    ("model.moe.num_experts", 8193, 8192), ("model.moe.expert_intermediate_size", 262_145, 262_144),
    ("model.attention.num_heads", 1025, 1024), ("budgets.seq_len", 2**24 + 1, 2**24),
    ("parallel.ep", 2**20 + 1, 2**20), ("train.steps", 10**9 + 1, 10**9),
    ("train.collective_timeout_s", 86_401, 86400), ("budgets.received_token_capacity", 1025, 1024),
])
def test_upper_bounds(tmp_path, path, value, bound):
    text, line = spec_text(path, str(value))
    got_line, msg = only(problems(tmp_path, text), path)
    assert got_line == line and f"must be <= {bound}; got {value}" in msg


def test_bounds_accept_ten_times_glm5():
    spec = load_spec(ROOT / "specs/glm5.yaml", ["model.num_layers=780", "model.hidden_size=61440",
                                                "model.moe.num_experts=2560", "model.vocab_size=1548800",
                                                "parallel.ep=640", "cluster.nodes=320", "budgets.seq_len=131072"])
    assert spec.model.num_layers == 780 and spec.cluster.world_size == 2560


def test_tokens_per_rank_bound(tmp_path):
    text, line = spec_text("budgets.micro_batch", str(2**10))
    text = text.replace(f"seq_len: {tiny_spec_dict()['budgets']['seq_len']}\n", f"seq_len: {2**15}\n")
    got_line, msg = only(problems(tmp_path, text), "budgets.micro_batch")
    assert got_line == line and "more than 16,777,216 tokens per rank" in msg


def test_world_bound(tmp_path):
    text = spec_text()[0]
    found = problems(tmp_path, text, ["cluster.nodes=2048", "cluster.gpus_per_node=1024"])
    assert "is more than 1,048,576 processes" in only(found, "cluster.gpus_per_node")[1]


def test_betas_finite_and_below_one(tmp_path):
    text, line = spec_text("train.optimizer.betas", "[.nan, 1.0]")
    found = problems(tmp_path, text)
    assert "finite" in only(found, "train.optimizer.betas.0")[1]
    assert only(found, "train.optimizer.betas.1") == (line, "must be < 1; got 1.0")


def test_spec_from_dict_has_the_same_rules():
    with pytest.raises(SpecError) as info:
        spec_from_dict(tiny_spec_dict({"train.optimizer.lr": float("inf"), "model.num_layers": True}))
    paths = {p: m for p, _, m in info.value.problems}
    assert "finite" in paths["train.optimizer.lr"] and "not a boolean" in paths["model.num_layers"]


# model.name is a file name ------------------------------------------------------------------------

@pytest.mark.parametrize("raw,phrase", [
    ("'.'", "starts with '.'"), ("'..'", "starts with '.'"), (".hidden", "starts with '.'"),
    ("-rf", "starts with '-'"), ("a/b", "contains '/'"), ("'..\\\\x'", "contains '\\\\'"),
    ("'" + "x" * 65 + "'", "is 65 characters long"), ('"a\\0b"', "contains '\\x00'"), ("''", "at least 1 character"),
])
def test_unsafe_model_name(tmp_path, raw, phrase):
    text, line = spec_text("model.name", raw)
    got_line, msg = only(problems(tmp_path, text), "model.name")
    assert got_line == line and phrase in msg


@pytest.mark.parametrize("name", ["glm5-mini", "a.b_c", "x" * 64, "2024-13-45"])
def test_safe_model_name(tmp_path, name):
    assert load_text(tmp_path, spec_text("model.name", name)[0]).model.name == name


@pytest.mark.parametrize("path", ["train.checkpoint.dir", "train.metrics_path", "train.data.path"])
def test_path_with_nul_is_refused(tmp_path, path):
    text, line = spec_text(path, '"run\\0s"')
    got_line, msg = only(problems(tmp_path, text), path)
    assert got_line == line and "control character U+0000" in msg


# New fields -----------------------------------------------------------------------------------------

def test_new_fields(tmp_path, make_spec):
    assert (make_spec().train.collective_timeout_s, make_spec().train.on_nonfinite) == (600.0, "stop")
    spec = load_text(tmp_path, spec_text()[0], ["train.collective_timeout_s=30", "train.on_nonfinite=skip",
                                                "budgets.on_overflow=rerun"])
    assert (spec.train.collective_timeout_s, spec.train.on_nonfinite, spec.budgets.on_overflow) == (30.0, "skip", "rerun")


@pytest.mark.parametrize("path,raw,phrase", [
    ("train.on_nonfinite", "ignore", "'ignore' is not allowed; allowed values are 'skip' or 'stop'"),
    ("budgets.on_overflow", "retry", "allowed values are 'drop', 'error' or 'rerun'"),
    ("budgets.on_overflow", "off", "false is not allowed; allowed values are 'drop', 'error' or 'rerun'; YAML reads "
                                   "unquoted on/off/yes/no as true/false"),
    ("train.collective_timeout_s", "-1", "must be >= 1; got -1"),
    ("train.collective_timeout_s", "'600'", "expected a number; got '600'"),
])
def test_new_field_bad_values(tmp_path, path, raw, phrase):
    text, line = spec_text(path, raw)
    got_line, msg = only(problems(tmp_path, text), path)
    assert got_line == line and phrase in msg


# --set gets the same checks ------------------------------------------------------------------------

@pytest.mark.parametrize("override,path,phrase", [
    ("model.num_layers=nan", "model.num_layers", "expected an integer; got 'nan'"),
    ("model.num_layers=.nan", "model.num_layers", "expected an integer; got nan"),
    ("model.num_layers=true", "model.num_layers", "not a boolean"),
    ("model.num_layers=1e30", "model.num_layers", "expected an integer; got 1e+30"),
    ("model.num_layers=5000", "model.num_layers", "must be <= 1024"),
    ("train.optimizer.lr=.inf", "train.optimizer.lr", "must be a finite number"),
    ("budgets.received_token_capacity=.nan", "budgets.received_token_capacity", "must be a finite number"),
    ("model.name=..", "model.name", "starts with '.'"),
    ("model.name=a/b", "model.name", "contains '/'"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s", "must be >= 1"),
    ("train.collective_timeout_s=0.001", "train.collective_timeout_s", "must be >= 1"),
    ("cluster.intra_node_gbps=1e-300", "cluster.intra_node_gbps", "must be >= 0.001"),
    ("model.num_layers=010", "model.num_layers", "octal"),
    ("model.name=a\x00b", "model.name", "the value holds the control character U+0000"),
])
def test_override_gets_the_same_checks(tmp_path, override, path, phrase):
    line, msg = only(problems(tmp_path, spec_text()[0], [override]), path)
    assert line is None and msg.startswith("(from --set)") and phrase in msg


# The YAML itself ----------------------------------------------------------------------------------

def billion_laughs(levels: int = 9, width: int = 10, flow: bool = False) -> str:
    items = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    items += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "{" + ", ".join(items) + "}" if flow else "\n".join(items) + "\n"


def test_alias_bomb_is_refused_quickly(tmp_path):
    start = time.perf_counter()
    [(path, line, msg)] = problems(tmp_path, billion_laughs())
    assert time.perf_counter() - start < 5
    assert path == "(yaml)" and line == 5 and "expands to more than 100,000 values" in msg  # l4: 111,111 values


def test_alias_bomb_in_override_is_refused(tmp_path):
    start = time.perf_counter()
    line, msg = only(problems(tmp_path, spec_text()[0], ["train.seed=" + billion_laughs(flow=True)]), "train.seed")
    assert time.perf_counter() - start < 5
    assert line is None and "the value is refused" in msg and "expands to more than" in msg


@pytest.mark.parametrize("text,line,phrase", [
    ("model: x\nloop: &a [1, *a]\n", 2, "sits inside its own anchor"),
    ("model: x\ndeep: " + "[" * 5000 + "]" * 5000 + "\n", 2, "nested deeper than 32 levels"),
    ("a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 40)), 32,
     "nested deeper than 32 levels through aliases"),  # a31 is a list 33 levels deep
], ids=["recursive alias", "deep nesting", "deep through aliases"])
def test_recursive_or_deep_yaml_is_refused(tmp_path, text, line, phrase):
    [(path, got_line, msg)] = problems(tmp_path, text)
    assert path == "(yaml)" and got_line == line and phrase in msg


def test_small_aliases_still_work(tmp_path):
    text, _ = spec_text("cluster.intra_node_gbps", "&bw 50\n  inter_node_gbps: *bw")
    spec = load_text(tmp_path, text)
    assert spec.cluster.intra_node_gbps == spec.cluster.inter_node_gbps == 50.0


def test_override_changes_one_place_of_an_alias(tmp_path):
    text = spec_text("cluster.nodes", "2")[0].replace("  gpus_per_node: 2\n", "  gpus_per_node: 1\n"
                                                      "  inter_domain_gbps: 10\n  domains:\n  - &d {nodes: [0]}\n  - *d\n")
    spec = load_text(tmp_path, text, ["cluster.domains.1.nodes=[1]"])
    assert [d.nodes for d in spec.cluster.domains] == [[0], [1]]


def test_duplicate_keys_name_both_lines(tmp_path):
    text, line = spec_text("train.seed", "1")
    text = text.replace("  seed: 1\n", "  seed: 1\n  # again\n  seed: 2\n")
    line, msg = only(problems(tmp_path, text), "train.seed")
    assert line == text.splitlines().index("  seed: 2") + 1
    assert msg == f"duplicate key (first given on line {text.splitlines().index('  seed: 1') + 1})"


@pytest.mark.parametrize("char,shown", [("\x00", "U+0000"), ("\x1b", "U+001B"), ("\x7f", "U+007F"),
                                        ("\x85", "U+0085"), ("\u2028", "U+2028"), ("\r", "CR")])
def test_control_character_names_the_line(tmp_path, char, shown):
    text, line = spec_text("model.name", f"ti{char}ny")
    [(path, got_line, msg)] = problems(tmp_path, text)
    assert path == "(file)" and got_line == line and shown in msg and "column" in msg


def test_control_characters_on_many_lines_are_capped(tmp_path):
    text = "".join(f"# bad \x01 {i}\n" for i in range(30)) + spec_text()[0]
    found = problems(tmp_path, text)
    assert [line for _, line, _ in found] == list(range(1, 12)) and "more lines" in found[-1][2]


def test_crlf_line_ends_are_fine(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_bytes(spec_text()[0].replace("\n", "\r\n").encode())
    assert load_spec(p).model.name == "tiny"


@pytest.mark.parametrize("data,line,phrase", [
    (spec_text()[0].encode().replace(b"model:\n", b"model:\n  # caf\xe9\n", 1), 2, "not UTF-8: byte 0xe9 at column 8"),
    (spec_text()[0].encode("utf-16"), 1, "not UTF-8: byte 0xff at column 1"),
], ids=["latin-1 byte", "utf-16"])
def test_not_utf8_names_the_line(tmp_path, data, line, phrase):
    [(path, got_line, msg)] = problems(tmp_path, data)
    assert path == "(file)" and got_line == line and phrase in msg


def test_oversized_file_is_refused(tmp_path):
    [(path, line, msg)] = problems(tmp_path, spec_text()[0] + "#" * (1 << 20) + "\n")
    assert path == "(file)" and "larger than 1024 KiB" in msg


def test_directory_is_refused(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert info.value.problems == [("(file)", None, "is a directory; give the spec's YAML file")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
def test_a_fifo_is_refused_not_read_forever(tmp_path):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    with pytest.raises(SpecError) as info:
        load_spec(fifo)
    assert info.value.problems == [("(file)", None, "is not a regular file; give the spec's YAML file")]


@pytest.mark.parametrize("root,kind", [("42\n", "int 42"), ("just words\n", "str 'just words'"), ("[1, 2]\n", "a list")])
def test_root_must_be_a_mapping(tmp_path, root, kind):
    [(path, line, msg)] = problems(tmp_path, "# header\n" + root)
    assert path == "(top level)" and line == 2 and "expected a mapping with the sections model" in msg and kind in msg


@pytest.mark.parametrize("raw,tag", [("!!binary aGVsbG8=", "!!binary"), ("!!python/name:os.system", "!!python/name:os.system"),
                                     ("!!set {a: null}", "!!set"), ("!!float abc", "!!float"), ("!custom x", "!custom")])
def test_explicit_tags_are_refused(tmp_path, raw, tag):
    text, line = spec_text("model.name", raw)
    [(path, got_line, msg)] = problems(tmp_path, text)
    assert path == "(yaml)" and got_line == line and f"the tag {tag} is not allowed" in msg


@pytest.mark.parametrize("raw,phrase", [("010", "octal"), ("1:30", "base-60"),
                                        ("9" * 5000, "an integer of 5000 characters")])
def test_number_literal_traps(tmp_path, raw, phrase):
    text, line = spec_text("model.num_layers", raw)
    [(path, got_line, msg)] = problems(tmp_path, text)
    assert path == "(yaml)" and got_line == line and phrase in msg


def test_several_documents_are_refused(tmp_path):
    [(path, line, msg)] = problems(tmp_path, spec_text()[0] + "---\nmodel: x\n")
    assert path == "(yaml syntax)" and "expected a single document" in msg


# One line, exit 2, no traceback -------------------------------------------------------------------

def test_one_problem_is_one_line(tmp_path):
    text, line = spec_text("model.num_layers", "1e30")
    with pytest.raises(SpecError) as info:
        load_text(tmp_path, text)
    assert "\n" not in str(info.value)
    assert str(SpecError("s", [("p", 3, "a\x00\nb")])) == "s: p (line 3): a\\x00\\nb"  # escaped, one line
    assert f"model.num_layers (line {line}): expected an integer; got 1e+30" in str(info.value)


@pytest.mark.slow  # four subprocesses, each importing torch
@pytest.mark.parametrize("text", [
    spec_text("model.num_layers", "1e30")[0], billion_laughs(), spec_text("model.name", "a\x00b")[0],
    spec_text("budgets.received_token_capacity", ".nan")[0]])
def test_cli_validate_prints_one_line(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "echoc", "validate", str(p)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
