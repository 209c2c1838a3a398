"""Shared fixtures. `make_spec` is the one spec factory of the test suite: the tiny model of
specs/tiny.yaml (fp32, CPU, 2 ranks, synthetic data) with dotted-path overrides."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from echoc.spec import Spec
from echoc.spec_io import spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
_TINY = yaml.safe_load((ROOT / "specs" / "tiny.yaml").read_text())


def tiny_spec_dict(overrides: dict | None = None) -> dict:
    """specs/tiny.yaml as a dict, with synthetic data and no metrics file, then `overrides`
    applied: {"parallel.ep": 4, "echo.enabled": True, ...} (dotted paths, created as needed)."""
    d = copy.deepcopy(_TINY)
    d["train"]["data"] = {"kind": "synthetic"}
    for path, value in (overrides or {}).items():
        node = d
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return d


def build_spec(overrides: dict | None = None) -> Spec:
    """A validated Spec (see tiny_spec_dict). World size follows ep × dp unless overridden."""
    o = dict(overrides or {})
    ep, dp = o.get("parallel.ep", _TINY["parallel"]["ep"]), o.get("parallel.dp", _TINY["parallel"]["dp"])
    o.setdefault("cluster.gpus_per_node", ep * dp // o.get("cluster.nodes", 1))
    return spec_from_dict(tiny_spec_dict(o), source="tests/conftest.py")


@pytest.fixture
def make_spec():
    """make_spec({"parallel.ep": 4, "budgets.received_token_capacity": 1.0}) → Spec."""
    return build_spec
