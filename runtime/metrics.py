"""Step metrics on the host: global loss, overflow, straggler, clones; and where they go
(JSONL file, rich progress bar, TensorBoard). Everything here reads pinned host copies of
the device metrics (runtime/trainer.py), one step late, so logging never stalls the GPU."""
from __future__ import annotations

import json

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from echoc.errors import CapacityOverflowError, MissingDependencyError
from echoc.spec import Spec


def host_metrics(loss_sum: torch.Tensor, all_stats: torch.Tensor, names: list[str]) -> dict:
    """From host copies of DeviceMetrics: global loss, overflow, token straggler
    (max / mean received rows over the ranks, worst layer), clones per layer."""
    world = all_stats.shape[0]
    received = all_stats[:, :, 1].double()  # [world, layers]
    straggler = float((received.max(0).values / received.mean(0).clamp(min=1)).max()) if all_stats.numel() else 1.0
    dropped = all_stats[:, :, 0]
    return {"loss": float(loss_sum.reshape(-1)[0]) / world, "overflow": int(dropped.sum()),
            "overflow_by_layer_rank": dropped.T.tolist(), "token_straggler": straggler,
            "clones": int(all_stats[0, :, 3].sum()) if all_stats.numel() else 0, "layers": names}


def check_overflow(spec: Spec, metrics: dict, step: int) -> None:
    if spec.budgets.on_overflow != "error" or metrics["overflow"] == 0:
        return
    for layer, per_rank in zip(metrics["layers"], metrics["overflow_by_layer_rank"]):
        for rank, n in enumerate(per_rank):
            if n:
                raise CapacityOverflowError(
                    f"step {step}: {n} token copies from rank {rank} did not fit layer {layer}'s "
                    f"dispatch chunk ({spec.peer_chunk_rows} rows per peer); raise "
                    "budgets.received_token_capacity or set budgets.on_overflow: drop")


def check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise MissingDependencyError("--tensorboard", "pip install tensorboard") from None


class JsonlLog:
    """One JSON object per logged step (rank 0)."""

    def __init__(self, path: str, interval: int):
        self.file, self.interval = open(path, "a"), interval

    def log(self, m: dict) -> None:
        if m["step"] % self.interval == 0:
            self.file.write(json.dumps({k: v for k, v in m.items() if k != "layers"}) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardLog:
    """Scalars per step (rank 0), when asked for and installed."""

    def __init__(self, logdir: str):
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(logdir)

    def log(self, m: dict) -> None:
        for key in ("loss", "overflow", "token_straggler", "tokens_per_s", "step_ms", "clones", "rerun", "skipped"):
            self.writer.add_scalar(key, m[key], m["step"])

    def close(self) -> None:
        self.writer.close()


class ProgressLog:
    """A rich progress bar on rank 0: step, loss, tokens/s, overflow, token straggler, and how many
    steps were run again (on_overflow 'rerun') or skipped (non-finite) so far."""

    def __init__(self, total: int, done: int = 0):
        self.bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, info="")
        self.reruns = self.skipped = 0

    def log(self, m: dict) -> None:
        self.reruns += m.get("rerun", 0)
        self.skipped += m.get("skipped", 0)
        info = (f"loss {m['loss']:.4f} · {m['tokens_per_s']:,.0f} tok/s · overflow {m['overflow']} · "
                f"straggler {m['token_straggler']:.3f}")
        if "tflops_per_gpu" in m:   # model TFLOP/s per GPU; MFU against the measured bf16 peak (GPU only)
            info += f" · {m['tflops_per_gpu']:.1f} TFLOP/s/GPU"
            info += f" · MFU {m['mfu']:.1%}" if m.get("mfu") is not None else ""
        info += f" · reruns {self.reruns}" if self.reruns else ""
        info += f" · skipped {self.skipped}" if self.skipped else ""
        self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        self.bar.stop()
