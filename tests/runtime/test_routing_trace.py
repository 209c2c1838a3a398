"""runtime/routing_trace.py: what --record-routing writes reads back; bad files are one TraceError."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from echoc.errors import EchocError
from runtime.routing_trace import TraceError, load_trace, save_trace


def counts(shape=(5, 2, 4, 8), seed=0) -> torch.Tensor:
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))


def test_save_then_load_round_trips_and_leaves_no_temporary(tmp_path):
    c = counts()
    save_trace(c.to(torch.int32), tmp_path / "routing.pt")
    back = load_trace(tmp_path / "routing.pt")
    assert back.dtype == torch.int64 and torch.equal(back, c)
    assert [p.name for p in tmp_path.iterdir()] == ["routing.pt"]


def test_a_three_dimensional_trace_is_one_layer(tmp_path):
    c = counts((3, 4, 8))
    torch.save({"counts": c}, tmp_path / "t.pt")
    assert torch.equal(load_trace(tmp_path / "t.pt"), c.unsqueeze(1))


def test_npz_with_whole_floats_reads_as_integers(tmp_path):
    c = counts()
    np.savez(tmp_path / "t.npz", counts=c.numpy().astype("float64"))
    assert torch.equal(load_trace(tmp_path / "t.npz"), c)


def _write(tmp_path: Path, name: str, payload) -> Path:
    path = tmp_path / name
    if callable(payload):
        payload(path)
    elif isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    return path


def _truncated(path: Path) -> None:
    torch.save({"counts": counts()}, path)
    path.write_bytes(path.read_bytes()[:100])


BAD = {
    "garbage.pt": (b"\x00not a trace", "cannot read"),
    "empty.pt": (b"", "cannot read"),
    "truncated.pt": (_truncated, "cannot read"),
    "list.pt": ([1, 2, 3], "no key 'counts'"),
    "nokey.pt": ({"routing": counts()}, "no key 'counts'"),
    "notensor.pt": ({"counts": "many"}, "not a tensor"),
    "twod.pt": ({"counts": torch.zeros(4, 8, dtype=torch.int64)}, "shape"),
    "nosteps.pt": ({"counts": torch.zeros(0, 1, 4, 8, dtype=torch.int64)}, "at least one step"),
    "nolayers.pt": ({"counts": torch.zeros(3, 0, 1, 1, dtype=torch.int64)}, "one MoE layer"),
    "negative.pt": ({"counts": -counts()}, ">= 0"),
    "nan.pt": ({"counts": torch.full((2, 1, 4, 8), float("nan"))}, "whole numbers"),
    "fraction.pt": ({"counts": torch.full((2, 1, 4, 8), 1.5)}, "whole numbers"),
    "bool.pt": ({"counts": torch.ones(2, 1, 4, 8, dtype=torch.bool)}, "dtype"),
    "garbage.npz": (b"PK\x03\x04 broken zip", "cannot read"),
    "nokey.npz": (lambda p: np.savez(p, routing=np.zeros((2, 1, 4, 8))), "no array 'counts'"),
    "strings.npz": (lambda p: np.savez(p, counts=np.array(["a", "b"])), "dtype"),
    "hello.pt": (b"hello", "cannot read"),                  # torch.load's unpickler raises KeyError on it
    "sparse.pt": ({"counts": counts().to_sparse()}, "dense CPU tensor"),
    "meta.pt": ({"counts": torch.empty(2, 1, 4, 8, device="meta")}, "cannot read|dense CPU tensor"),
    "float8.pt": ({"counts": torch.ones(2, 1, 4, 8).to(torch.float8_e4m3fn)}, "dtype"),
    "huge.npz": (lambda p: np.savez(p, counts=np.full((2, 1, 4, 8), 2**63 + 5, dtype=np.uint64)), "< 2\\*\\*63"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_trace_file_is_one_clear_error(tmp_path, name):
    payload, message = BAD[name]
    path = _write(tmp_path, name, payload)
    with pytest.raises(TraceError, match=message) as e:
        load_trace(path)
    assert isinstance(e.value, EchocError) and str(path) in str(e.value)


def test_a_missing_path_or_a_directory_is_named(tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "absent.pt")
    with pytest.raises(TraceError, match="is a directory"):
        load_trace(tmp_path)
    with pytest.raises(TraceError, match="is not a regular file"):
        load_trace(Path("/dev/null"))
