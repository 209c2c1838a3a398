"""Op contracts: every `echo::` op and graph-level autograd function, declared once.

A contract names an op's arguments (in call order) and outputs, says which arguments
its backward keeps and which get a gradient, and lists the arena keys it writes. The
op's implementation (runtime/ops.py, clone.py, grouped_gemm.py, backends/sync.py), the
passes that insert and rewrite it, verify_sync_free and the memory plan all read the
contract; nothing else indexes `node.args` by position.

Arena keys (runtime/arena.py) of an op called with `buf`, its node's name:

    buf           the output of an op with one output
    buf[i]        output i of an op with several (named `outputs[i]`)
    buf.<part>    an internal buffer: `send`, `recv`, `bwd.grad_in`, ...

`bind(contract, target)` ties a contract to the op or function that implements it and
checks that the target's signature names the contract's arguments in order.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

# --- the declaration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """An internal buffer of an op, keyed `buf.<name>` (`bwd.` parts live in its backward)."""
    name: str
    arena: bool = True                 # False: a kernel without out= allocates it (listed, not placed)
    saved: bool = False                # kept for the backward (live from the op's forward to its backward)
    call: OpContract | None = None     # an op the op calls with this key as `buf` (its keys nest here)
    symmetric: bool = False            # in the backend's symmetric-memory pool (symm_mem / NVSHMEM), not the arena
    exchange: bool = False             # used only when the op's group has several ranks (at one rank the
                                       # exchange is the identity and the op gathers straight to its result)


@dataclass(frozen=True, eq=False)     # one object per op: compared and hashed by identity (fast)
class OpContract:
    """What an op takes, returns, keeps for its backward and writes into the arena."""
    name: str
    args: tuple[str, ...]             # named arguments, in call order
    outputs: tuple[str, ...]          # named outputs (one name: the op returns one tensor)
    roles: tuple[str, ...] = ()       # per output, what it is in the memory plan ('' or empty: not planned)
    saves: tuple[str, ...] = ()       # arguments its backward keeps, in save_for_backward order
    keeps: tuple[str, ...] = ()       # outputs its own backward keeps (saved after the arguments)
    grads: tuple[str, ...] = ()       # arguments that get a gradient
    parts: tuple[Part, ...] = ()      # internal buffers, keyed `buf.<part>`
    input_grad: str = ""              # the part its backward writes grads[0]'s gradient into
    output_in_arena: bool = True      # False: a kernel without out= allocates the output
    moves_tokens: bool = False        # gather into `send` · exchange into `recv` · gather the result
    host_sync: bool = False           # reads device values on the host: never inside a CUDA graph

    def __post_init__(self):
        assert not self.roles or len(self.roles) == len(self.outputs), self.name
        assert set(self.saves) <= set(self.args) and set(self.grads) <= set(self.args), self.name
        assert set(self.keeps) <= set(self.outputs), self.name
        assert not self.input_grad or self.input_grad in self.part_names, self.name

    # --- reading and building graph nodes ------------------------------------------------------
    def arg(self, node, name: str) -> Any:
        """The value `node` (an fx Node calling this op) passes for argument `name`."""
        if name in node.kwargs:
            return node.kwargs[name]
        i = self.args.index(name)
        assert i < len(node.args), f"{node.name}: {self.name} called without {name!r}"
        return node.args[i]

    def values(self, node) -> dict[str, Any]:
        """Every argument of `node`, by name."""
        return {n: self.arg(node, n) for n in self.args}

    def call_args(self, **values: Any) -> tuple:
        """Positional arguments in the declared order; every argument must be named once."""
        missing, unknown = set(self.args) - set(values), set(values) - set(self.args)
        assert not missing and not unknown, f"{self.name}: missing {sorted(missing)}, unknown {sorted(unknown)}"
        return tuple(values[n] for n in self.args)

    def set_args(self, node, **changes: Any) -> None:
        """Rewrite some of `node`'s arguments by name (the others stay)."""
        assert set(changes) <= set(self.args), (self.name, sorted(set(changes) - set(self.args)))
        node.args, node.kwargs = self.call_args(**(self.values(node) | changes)), {}

    def named(self, inputs: tuple) -> dict[str, Any]:
        """The op's runtime inputs (setup_context's `inputs`) by name."""
        assert len(inputs) == len(self.args), (self.name, len(inputs))
        return dict(zip(self.args, inputs))

    def saved(self, inputs: tuple) -> tuple:
        """The inputs its backward keeps, in `saves` order."""
        named = self.named(inputs)
        return tuple(named[n] for n in self.saves)

    def setup_context(self, *keep: str) -> Callable:
        """A setup_context for torch.library.register_autograd: saves the `saves` arguments (and the
        `keeps` outputs) and sets `ctx.<name>` for each argument named in `keep` (`ctx.<name>_shape`
        for a tensor)."""
        def setup(ctx, inputs, output):
            named = self.named(inputs)
            outs = (output,) if len(self.outputs) == 1 else output
            kept = tuple(outs[self.output_index(n)] for n in self.keeps)
            ctx.save_for_backward(*self.saved(inputs), *kept)
            for n in keep:
                v = named[n]
                setattr(ctx, f"{n}_shape" if hasattr(v, "shape") else n, getattr(v, "shape", v))
        return setup

    def saved_by_name(self, ctx) -> dict[str, Any]:
        """In a backward: the saved arguments (and kept outputs) by name."""
        return dict(zip(self.saves + self.keeps, ctx.saved_tensors))

    def input_grads(self, **grads: Any) -> tuple:
        """A backward's return value: the given gradients by argument name, None elsewhere."""
        assert set(grads) <= set(self.grads), (self.name, sorted(set(grads) - set(self.grads)))
        return tuple(grads.get(n) for n in self.args)

    # --- arena keys ---------------------------------------------------------------------------
    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    @property
    def saved_parts(self) -> tuple[str, ...]:
        """Internal buffers its backward keeps (after the saved arguments, in this order)."""
        return tuple(p.name for p in self.parts if p.saved)

    def output_index(self, name: str) -> int:
        return self.outputs.index(name)

    def output_key(self, buf: str, name: str = "") -> str:
        """The arena key of output `name` (of the only output when `name` is empty)."""
        if not name:
            assert len(self.outputs) == 1, f"{self.name} has several outputs: name one"
            return buf
        return self.output_keys(buf)[self.output_index(name)]

    def output_keys(self, buf: str) -> tuple[str, ...]:
        """The arena key of each output: `buf`, or `buf[i]` for an op with several outputs."""
        if len(self.outputs) == 1:
            return (buf,)
        return tuple(f"{buf}[{i}]" for i in range(len(self.outputs)))

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def key(self, buf: str, part: str) -> str:
        """The arena key of internal buffer `part` of the op called with `buf`."""
        assert part in self.part_names, f"{self.name} declares no part {part!r}"
        return f"{buf}.{part}"

    def owns(self, buf: str, key: str) -> bool:
        """Whether `key` is an arena key of this op called with `buf`: an output, a part, or a key
        of an op it calls."""
        if key in self.output_keys(buf):
            return True
        return any(key == self.key(buf, p.name) or (p.call is not None and p.call.owns(self.key(buf, p.name), key))
                   for p in self.parts)


def _parts(*names: str, allocated: tuple[str, ...] = (), saved: tuple[str, ...] = (),
           calls: OpContract | None = None, exchange: bool = False) -> tuple[Part, ...]:
    return tuple(Part(n, arena=n not in allocated, saved=n in saved, call=calls, exchange=exchange) for n in names)


_MAPS = ("send_copy", "copy_slot", "sorted_src", "recv_sorted")   # a layout's four index maps
LAYOUT_OUTPUTS = _MAPS + ("offs", "stats")
_MOVE = ("send", "recv", "bwd.send", "bwd.recv")
_FFN_PARTS = ("h13", "act", "bwd.grad_act", "bwd.grad_h13")
_FFN_ALLOCATED = ("h13", "bwd.grad_act")                           # grouped_mm has no out= variant
_FFN_SAVED = ("h13", "act")                                        # the backward reads them (silu(gate) is recomputed)

# --- count / exchange / layout -----------------------------------------------------------------
COUNT = OpContract("echo::count", ("dest_slot", "n_slots", "buf"), ("counts",), ("counts",))
ALL_GATHER_COUNTS = OpContract("echo::all_gather_counts", ("counts", "group", "group_size", "buf"),
                               ("counts_all",), ("counts",))
LAYOUT = OpContract("echo::layout",
                    ("dest_slot", "counts", "counts_all", "slots_per_rank", "chunk_rows", "group", "buf"),
                    LAYOUT_OUTPUTS, ("index",) * 5 + ("stats",))

# --- token movement ----------------------------------------------------------------------------
# send → exchange → recv only across ranks; dispatch's backward sums each token's K copies as it
# gathers them (no [T·K, H] buffer); combine's backward writes the experts' row gradient.
DISPATCH = OpContract("echo::dispatch", ("x",) + _MAPS + ("top_k", "group", "buf"), ("rows",), ("activation",),
                      saves=_MAPS, grads=("x",), parts=_parts(*_MOVE, exchange=True), moves_tokens=True)
COMBINE = OpContract("echo::combine", ("y",) + _MAPS + ("group", "buf"), ("copies",), ("activation",),
                     saves=_MAPS, grads=("y",), parts=_parts(*_MOVE, exchange=True) + _parts("bwd.grad_in"),
                     input_grad="bwd.grad_in", moves_tokens=True)

# `torch` under backends.exchange 'p2p' at ep > 1 (runtime/p2p_moves.py): four exchanges a layer.
# Dispatch carries each copy's router weight and place to the expert side with the rows and
# returns them per sorted row (`row_weight`) and as the movement's index maps (`routes`), which
# its own backward keeps; combine and the weighted sum are one op, returning one row per token
# and rank (Σ w · y over the copies it holds); its backward keeps the expert outputs for ⟨g, y⟩.
P2P_DISPATCH = OpContract("echo::dispatch_weighted", ("x", "weights") + _MAPS + ("top_k", "group", "group_size", "buf"),
                          ("rows", "row_weight", "routes"), ("activation", "activation", "index"),
                          saves=("copy_slot", "recv_sorted"), keeps=("routes",), grads=("x", "weights"),
                          moves_tokens=True)
P2P_COMBINE = OpContract("echo::combine_weighted", ("y", "row_weight", "routes", "copy_slot", "top_k", "group", "buf"),
                         ("out",), saves=("y", "row_weight", "routes"), grads=("y", "row_weight"),
                         parts=_parts("bwd.grad_in"), input_grad="bwd.grad_in", moves_tokens=True)

# --- ECHO: plan, slots, clones -----------------------------------------------------------------
PLAN = OpContract("echo::plan", ("counts_all", "experts_per_rank", "spares", "domain_size", "offer",
                                 "min_clone_rows", "buf"), ("spare_expert", "quota"), ("plan", "plan"))
ASSIGN_SLOTS = OpContract("echo::assign_slots", ("topk_idx", "counts_all", "quota", "experts_per_rank", "spares",
                                                 "group", "buf"), ("slots",), ("plan",))
CLONE_WEIGHTS = OpContract("echo::clone_weights", ("w", "counts_all", "spare_expert", "offer", "group", "ep_group",
                                                   "buf"), ("w_slots",), ("clone_weights",),
                           saves=("counts_all", "spare_expert"), grads=("w",),
                           parts=_parts("send", "gather", "bwd.rs_in", "bwd.rs_out"))

# --- the `sync` backend (host-synced; never planned) -------------------------------------------
SYNC_LAYOUT = OpContract("echo::sync_layout", ("dest_slot", "counts", "counts_all", "slots_per_rank", "group"),
                         LAYOUT_OUTPUTS + ("splits",), host_sync=True)
SYNC_DISPATCH = OpContract("echo::sync_dispatch", ("x",) + _MAPS + ("splits", "top_k", "group"), ("rows",),
                           saves=_MAPS + ("splits",), grads=("x",), host_sync=True)
SYNC_COMBINE = OpContract("echo::sync_combine", ("y",) + _MAPS + ("splits", "group"), ("copies",),
                          saves=_MAPS + ("splits",), grads=("y",), host_sync=True)

# --- the real-row backends (runtime/backends/symm_mem.py, deepep.py) ----------------------------
# Their exchange buffers live in the backend's symmetric pool (one per rank, shared by every
# exchange): `buf.<part>` keys name them in the memory plan; the arena holds only their outputs.
_SYMM_MAPS = ("send_copy", "copy_slot", "in_splits", "splits_offsets", "recv_row")
_SYMM_POOL = tuple(Part(n, arena=False, symmetric=True)
                  for n in ("inp", "out", "in_splits", "in_splits_offsets", "out_splits_offsets"))
SYMM_LAYOUT = OpContract("echo::symm_layout", ("dest_slot", "counts", "counts_all", "slots_per_rank", "chunk_rows",
                                               "major_align", "group", "buf"),
                         _SYMM_MAPS + ("offs", "stats"), ("index",) * 6 + ("stats",))
SYMM_DISPATCH = OpContract("echo::symm_dispatch", ("x",) + _SYMM_MAPS + ("major_align", "top_k", "group", "buf"),
                           ("rows",),
                           ("activation",), saves=_SYMM_MAPS, grads=("x",),
                           parts=_SYMM_POOL + _parts("bwd.grad_copies"), moves_tokens=True)
SYMM_COMBINE = OpContract("echo::symm_combine", ("y",) + _SYMM_MAPS + ("major_align", "group", "buf"), ("copies",),
                          ("activation",),
                          saves=_SYMM_MAPS, grads=("y",), parts=_SYMM_POOL + _parts("bwd.grad_in"),
                          input_grad="bwd.grad_in", moves_tokens=True)
_HYBRID_EP = (Part("hybrid_ep", arena=False, symmetric=True),)   # HybridEPBuffer's registered buffers
DEEPEP_LAYOUT = OpContract("echo::deepep_layout", ("dest_slot", "counts", "counts_all", "slots_per_rank",
                                                   "chunk_rows", "pad_multiple", "group", "buf"),
                           ("routing_map", "kept_slot", "offs", "stats"), ("index",) * 3 + ("stats",))
DEEPEP_DISPATCH = OpContract("echo::deepep_dispatch", ("x", "weights", "routing_map", "kept_slot", "permuted_rows",
                                                       "pad_multiple", "group", "buf"), ("rows", "row_weight"),
                             ("activation", "activation"), saves=("kept_slot",), grads=("x", "weights"),
                             parts=_HYBRID_EP, moves_tokens=True)
DEEPEP_COMBINE = OpContract("echo::deepep_combine", ("y", "handle", "tokens", "group", "buf"), ("out",), ("activation",),
                            grads=("y",), parts=_HYBRID_EP, moves_tokens=True)
TOKEN_LAYOUTS = (LAYOUT, SYMM_LAYOUT, DEEPEP_LAYOUT)          # the sync-free layouts ECHO rewires
TOKEN_DISPATCHES = (DISPATCH, P2P_DISPATCH, SYMM_DISPATCH, DEEPEP_DISPATCH)

# --- graph-level autograd functions ------------------------------------------------------------
EXPERT_FFN = OpContract("expert_ffn", ("rows", "w13", "w2", "offs", "impl", "wgrad", "buf"), ("y",), ("activation",),
                        saves=("rows", "w13", "w2", "offs"), grads=("rows", "w13", "w2"),
                        parts=_parts(*_FFN_PARTS, allocated=_FFN_ALLOCATED, saved=_FFN_SAVED),
                        output_in_arena=False)
EXPERT_FFN_RECOMPUTE_CLONE = OpContract(
    "expert_ffn_recompute_clone",
    ("rows", "w13", "w2", "offs", "impl", "counts_all", "spare_expert", "offer", "ep_group", "buf"), ("y",),
    ("activation",), saves=("rows", "w13", "w2", "offs", "counts_all", "spare_expert"), grads=("rows", "w13", "w2"),
    # the clones are echo::clone_weights calls keyed by these parts, in forward and again in backward
    parts=_parts(*_FFN_PARTS, allocated=_FFN_ALLOCATED, saved=_FFN_SAVED)
    + _parts("clone_w13", "clone_w2", "clone_w13.recompute", "clone_w2.recompute", calls=CLONE_WEIGHTS),
    output_in_arena=False)
WEIGHTED_SUM = OpContract("weighted_sum", ("copies", "weights", "buf"), ("out",), saves=("copies", "weights"),
                          grads=("copies", "weights"), parts=_parts("bwd.grad_in"), input_grad="bwd.grad_in")
LAYER_STATS = OpContract("layer_stats", ("stats", "buf", "spare_expert"), ("stats_row",), ("stats",))

# --- binding contracts to their implementations ------------------------------------------------
_BY_TARGET: dict[Any, OpContract] = {}
_TARGETS: dict[str, Any] = {}


def _signature(target: Callable) -> tuple[str, ...]:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return tuple(a.name for a in schema.arguments)
    return tuple(inspect.signature(target).parameters)


def bind(contract: OpContract, target: Callable) -> None:
    """`target` (an OpOverload or a plain function) implements `contract`."""
    assert _signature(target) == contract.args, (
        f"{contract.name}: the implementation takes {_signature(target)}, the contract says {contract.args}")
    _BY_TARGET[target] = contract
    _TARGETS[contract.name] = target


def of(target: Any) -> OpContract | None:
    """The contract of a node's target, or None for anything that is not an echo op."""
    return _BY_TARGET.get(target)


def target(contract: OpContract) -> Callable:
    """The op or function bound to `contract` (its module must have been imported)."""
    assert contract.name in _TARGETS, f"{contract.name} is not bound: import its implementation"
    return _TARGETS[contract.name]
