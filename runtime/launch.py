"""Start the workers with torchrun's own API (torch.distributed.run), elastic restarts included."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

from echoc.errors import EchocError, StoppedBySignal


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


RDZV_GRACE_S = 45           # above torchrun's last_call_timeout (30 s), which an elastic --nnodes MIN:MAX waits


def _children() -> list[int]:
    """This process's child processes (Linux /proc; elsewhere nothing is known: [-1])."""
    me, kids = os.getpid(), []
    if not os.path.isdir("/proc"):
        return [-1]
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                    kids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def _no_workers_watch(endpoint: str, seconds: float) -> threading.Event:
    """torchrun's c10d rendezvous can wait forever on an endpoint where something else listens
    (its store handshake has no timeout): if no worker has existed after `seconds`, say so and
    exit. Set the returned event to stop watching (torchrun returned)."""
    done = threading.Event()

    def watch():
        deadline = time.monotonic() + seconds
        while not done.wait(1.0):
            if _children():
                return           # the rendezvous completed: workers run
            if time.monotonic() > deadline:
                print(f"error: the rendezvous at {endpoint} started no worker within {seconds:g} s "
                      "(train.collective_timeout_s + a grace): is another program listening on that port? Start "
                      "`echoc run` on every node with the same --rdzv-endpoint, on a free port",
                      file=sys.stderr, flush=True)
                os._exit(2)
    threading.Thread(target=watch, daemon=True).start()
    return done


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
    watching = threading.Event()
    if rdzv_endpoint:
        t = max(1, round(rdzv_timeout_s))
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                 "--rdzv-conf", f"join_timeout={t},read_timeout={max(60, t)}"]
        watching = _no_workers_watch(rdzv_endpoint, t + RDZV_GRACE_S)
    elif nnodes == "1":
        args += ["--standalone"]
    args += ["-m", "echoc"] + worker_argv
    from torch.distributed.elastic.multiprocessing.api import SignalException
    try:
        torchrun.main(args)
    except ChildFailedError as e:
        raise failed(e) from None
    except SignalException as e:   # this launcher got SIGTERM / SIGINT: torchrun stopped the workers
        raise StoppedBySignal(f"stopped by {signal.Signals(e.sigval).name}; the workers were asked to stop (with "
                              "train.checkpoint.dir they saved a checkpoint first: continue with --resume)",
                              int(e.sigval)) from None
    except RendezvousError as e:
        raise EchocError(f"the rendezvous at {rdzv_endpoint} for --nnodes {nnodes} did not complete within "
                         f"{rdzv_timeout_s:g} s (train.collective_timeout_s) ({type(e).__name__}); start "
                         "`echoc run` on every node with the same --rdzv-endpoint, reachable from all") from None
    except SystemExit as e:  # torchrun's argument errors
        if e.code:
            sys.exit(e.code)
    finally:
        watching.set()


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def failed(e) -> EchocError:
    """The launcher's line for torchrun's ChildFailedError: which rank failed first and how (the
    others are usually stopped by torchrun with SIGTERM after it). A stop on SIGTERM / SIGINT is
    no failure: the workers exit 0 and leave a note (echoc/run.py `stopped`)."""
    codes = {rank: f.exitcode for rank, f in e.failures.items()}
    rank, first = e.get_first_failure()
    others = len(codes) - 1
    return EchocError(f"training failed: rank {rank} {_how(first.exitcode)} first"
                      + (f", and {others} other rank(s) stopped with it" if others else "")
                      + "; the ranks' messages are printed above")
