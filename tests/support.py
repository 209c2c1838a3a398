"""What tests share: the one spec factory (`tiny_spec_dict`: specs/tiny.yaml with dotted-path
overrides; `oracle_spec_dict`, its smaller preset for multi-process tests) and the torchrun
launcher. Fixtures over these live in conftest.py."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

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


def oracle_spec_dict(ep=2, dp=1, capacity=2.0, backend="torch", top_k=2, experts=8, seq_len=16, mb=2,
                     shared=1, attention=None, on_overflow="drop", echo=None) -> dict:
    """The oracle's smaller model (H 32, vocab 64, 16-token sequences, lr 1e-2, seed 3) for
    multi-process tests, as a spec dict (workers receive it as JSON)."""
    return tiny_spec_dict({
        "model.name": "oracle", "model.vocab_size": 64, "model.hidden_size": 32,
        "model.dense_intermediate_size": 48,
        "model.attention": attention or {"kind": "gqa", "num_heads": 4, "num_kv_heads": 2, "head_dim": 8},
        "model.moe.num_experts": experts, "model.moe.top_k": top_k, "model.moe.expert_intermediate_size": 16,
        "model.moe.shared_experts": shared,
        "model.moe.router": {"score_fn": "sigmoid", "routed_scaling_factor": 2.0, "bias_update_rate": 0.01},
        "cluster.gpus_per_node": ep * dp, "parallel.ep": ep, "parallel.dp": dp,
        "budgets.seq_len": seq_len, "budgets.micro_batch": mb, "budgets.received_token_capacity": capacity,
        "budgets.on_overflow": on_overflow, "budgets.row_alignment": 1,
        "backends.dispatch": backend, "backends.cuda_graph": "none", "echo": echo or {"enabled": False},
        "train.steps": 3, "train.seed": 3, "train.optimizer": {"lr": 1e-2}, "train.log_interval": 1,
    })


def run_torchrun(script: Path, cfg: dict, nproc: int, workdir: Path, *torchrun_args: str,
                 timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Launch `script CFG_JSON` on nproc local processes (gloo on CPU) and require exit 0
    (unless `check` is False: fault tests look at the failure themselves)."""
    path = workdir / f"cfg{len(list(workdir.glob('cfg*.json')))}.json"
    path.write_text(json.dumps(cfg))
    # a restarted rank must not read the previous attempt's store addresses (pytorch#135712)
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *torchrun_args, str(script), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


ORACLE_TOL = 1e-5   # fp32 on CPU: loss and every gradient equal to the reference up to rounding


def run_json_worker(script: Path, cfg: dict, workdir: Path) -> dict | list:
    """Run a worker script on ep × dp processes of cfg["spec"]; it writes its JSON result to cfg["out"]."""
    out = workdir / "out.json"
    spec = cfg["spec"]
    run_torchrun(script, dict(cfg, out=str(out)), spec["parallel"]["ep"] * spec["parallel"]["dp"], workdir)
    return json.loads(out.read_text())


def assert_oracle_matches(result: dict, tol: float = ORACLE_TOL) -> None:
    """Every step's loss and worst gradient (and every rank's worst gradient) within tol of the reference."""
    for s in result["steps"]:
        assert s["loss_rel_err"] <= tol, s
        name, err = s["worst_grad"]
        assert err <= tol, f"step {s['step']}: gradient of {name} off by {err:.2e}"
    assert max(result["worst_grad_by_rank"]) <= tol
