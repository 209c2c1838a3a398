"""Start the workers with torchrun's own API (torch.distributed.run), elastic restarts included."""
from __future__ import annotations

import os
import sys

from echoc.errors import EchocError


def worker_env_defaults(env: dict, nproc: int) -> None:
    """The workers' environment, where the user has not set it (torchrun passes it on)."""
    # restarted workers must not reuse the previous attempt's store addresses (pytorch#135712)
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # set it ourselves: torchrun otherwise sets 1 and prints a banner saying so
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # expandable segments: the allocator's headroom the plan counts on (memory_model.ALLOCATOR_HEADROOM)
    # was measured with them; without, a glm5-mini-shaped run did not fit in 1.10× its predicted peak
    if "PYTORCH_CUDA_ALLOC_CONF" not in env and "PYTORCH_ALLOC_CONF" not in env:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def launch(worker_argv: list[str], nproc: int, nnodes: str = "1", rdzv_endpoint: str | None = None,
           max_restarts: int = 0, rdzv_timeout_s: float = 600.0) -> None:
    """Run `python -m echoc <worker_argv>` on nproc processes per node under torchrun.

    A multi-node rendezvous that is not complete within rdzv_timeout_s is an error naming the
    endpoint (torchrun's join_timeout)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    if nnodes != "1" and not rdzv_endpoint:
        raise EchocError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node); "
                         "without it the nodes would wait for each other forever")
    worker_env_defaults(os.environ, nproc)
    args = ["--nproc-per-node", str(nproc), "--nnodes", nnodes, "--max-restarts", str(max_restarts)]
    if rdzv_endpoint:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                 "--rdzv-conf", f"join_timeout={max(1, round(rdzv_timeout_s))}"]
    elif nnodes == "1":
        args += ["--standalone"]
    args += ["-m", "echoc"] + worker_argv
    try:
        torchrun.main(args)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        raise EchocError(f"training failed on {len(e.failures)} rank(s) (exit codes {sorted(codes)}); "
                         "the ranks' messages are printed above") from None
    except RendezvousError as e:
        raise EchocError(f"the rendezvous at {rdzv_endpoint} for --nnodes {nnodes} did not complete within "
                         f"{rdzv_timeout_s:g} s (train.collective_timeout_s) ({type(e).__name__}); start "
                         "`echoc run` on every node with the same --rdzv-endpoint, reachable from all") from None
    except SystemExit as e:  # torchrun's argument errors
        if e.code:
            sys.exit(e.code)
