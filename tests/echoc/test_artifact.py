"""The build directory (echoc/artifact.py): written once, verified on load, its plan executed."""
import hashlib
import json

import pytest

from echoc.artifact import BuildError, arena_layout_from_json, load_build, write_build
from echoc.compile import compile_build
from passes.buffer_plan import arena_layout, plan_to_json


@pytest.fixture
def built(tmp_path, make_spec):
    spec = make_spec({"echo.enabled": True, "echo.spare_slots_per_rank": 2})
    build = compile_build(spec)
    return build, write_build(build, tmp_path / "b")


def test_a_written_build_loads_with_the_same_graph_and_plan(built):
    build, out = built
    loaded = load_build(out)
    assert loaded.program.gm.code == build.program.gm.code
    assert loaded.program.arena_layout == build.program.arena_layout
    assert loaded.spec == build.spec


def test_plan_json_round_trips_to_the_runtime_layout(built):
    build, _ = built
    plan = build.memory_plan
    assert arena_layout_from_json(json.loads(json.dumps(plan_to_json(plan)))) == arena_layout(plan)


@pytest.mark.parametrize("name,edit", [
    ("plan.json", lambda t: t.replace('"offset": 0', '"offset": 256', 1)),
    ("graph.py", lambda t: t[: len(t) // 2]),
    ("spec.json", lambda t: t.replace('"steps": 30', '"steps": 31')),
    ("graph.txt", lambda t: t + "\n"),
])
def test_an_edited_or_truncated_build_file_is_refused(built, name, edit):
    _, out = built
    path = out / name
    text = path.read_text()
    assert edit(text) != text, "the edit changed nothing: the test would prove nothing"
    path.write_text(edit(text))
    with pytest.raises(BuildError, match=name.replace(".", r"\.")):
        load_build(out)


def test_a_build_missing_its_summary_is_refused(built):
    _, out = built
    (out / "summary.json").unlink()
    with pytest.raises(BuildError, match="summary.json"):
        load_build(out)


def test_spec_json_of_another_build_is_refused(built, tmp_path, make_spec):
    _, out = built
    other = write_build(compile_build(make_spec({"parallel.ep": 1})), tmp_path / "other")
    (out / "spec.json").write_text((other / "spec.json").read_text())
    with pytest.raises(BuildError, match="spec.json"):
        load_build(out)


def test_output_path_that_is_a_file_is_a_clear_error(built, tmp_path):
    build, _ = built
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BuildError, match="a file is in the way"):
        write_build(build, blocker)


@pytest.mark.parametrize("text,why", [("[", "is not JSON"), ("[1]", "holds a list")])
def test_a_spec_json_that_matches_its_hash_but_is_no_spec_is_refused(built, text, why):
    """Someone edited spec.json and the hash beside it: still one clear error."""
    _, out = built
    (out / "spec.json").write_text(text)
    summary = json.loads((out / "summary.json").read_text())
    summary["files"]["spec.json"] = hashlib.sha256(text.encode()).hexdigest()
    (out / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(BuildError, match=why):
        load_build(out)
