"""Batches: every rank derives the same global batch from (seed, step) and takes its rows.

Global batch of step s: [world × micro_batch, seq_len + 1] token ids; rank r owns
rows r·mb … r·mb+mb-1. The single-process reference consumes the whole global
batch, so distributed and reference runs see identical data.
"""
from __future__ import annotations

from pathlib import Path

import torch

from echoc.errors import EchocError


class DataError(EchocError):
    """The training data cannot be used; the message names the file and what is wrong."""


def check_text_file(path: str | Path, seq_len: int) -> int:
    """Size in bytes of a text data file that can feed one sequence: it exists, is a regular file,
    is readable and holds at least seq_len + 2 bytes (seq_len + 1 tokens, and a choice of start)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"train.data.path {p}: no such file")
    if not p.is_file():
        kind = "a directory" if p.is_dir() else "not a regular file (a device, FIFO or socket)"
        raise DataError(f"train.data.path {p} is {kind}; give a text file")
    try:
        with open(p, "rb") as f:
            f.read(1)
        size = p.stat().st_size
    except OSError as e:
        raise DataError(f"train.data.path {p} cannot be read ({e.strerror or type(e).__name__})") from None
    if size < seq_len + 2:
        raise DataError(f"train.data.path {p} holds {size} bytes; one sequence of budgets.seq_len = {seq_len} "
                        f"needs at least {seq_len + 2}")
    return size


class TokenSource:
    """Synthetic tokens (uniform over the vocabulary) or a text file read as bytes."""

    def __init__(self, kind: str, vocab_size: int, seq_len: int, seed: int, path: str | None = None):
        self.kind, self.vocab, self.seq_len, self.seed = kind, vocab_size, seq_len, seed
        self.data = None
        if kind == "text":
            check_text_file(path, seq_len)
            raw = Path(path).read_bytes()
            self.data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)

    def global_batch(self, step: int, rows: int) -> torch.Tensor:
        """[rows, seq_len + 1] int64, a pure function of (seed, step)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if self.data is None:
            return torch.randint(0, self.vocab, (rows, self.seq_len + 1), generator=g)
        starts = torch.randint(0, self.data.numel() - self.seq_len - 1, (rows,), generator=g)
        idx = starts.unsqueeze(1) + torch.arange(self.seq_len + 1)
        return self.data[idx]


def local_rows(batch: torch.Tensor, rank: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (tokens [mb, S], labels [mb, S]) from a global batch."""
    mine = batch[rank * micro_batch:(rank + 1) * micro_batch]
    return mine[:, :-1].contiguous(), mine[:, 1:].contiguous()
