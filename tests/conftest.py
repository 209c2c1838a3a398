"""Fixtures over tests/support.py: `make_spec`, `oracle_spec`, `torchrun`."""
from __future__ import annotations

import pytest

from support import build_spec, oracle_spec_dict, run_torchrun, tiny_spec_dict  # noqa: F401 (re-exported)


@pytest.fixture
def make_spec():
    """make_spec({"parallel.ep": 4, "budgets.received_token_capacity": 1.0}) → Spec."""
    return build_spec


@pytest.fixture(scope="session")
def oracle_spec():
    """oracle_spec(ep=4, echo={...}) → spec dict (see oracle_spec_dict)."""
    return oracle_spec_dict


@pytest.fixture(scope="session")
def torchrun():
    """torchrun(script, cfg, nproc, workdir, *torchrun_args) → CompletedProcess (exit 0 asserted)."""
    return run_torchrun
