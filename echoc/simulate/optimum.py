"""The exact optimum for small cases (ep ≤ 4, E ≤ 8, S ≤ 1): the least possible max rank rows
over every choice of expert for every spare slot, each with its best split of rows over the copies.
It bounds every strategy from below.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

OPTIMUM_LIMITS = (4, 8, 1)  # ep, E, S: enumerating (E + 1)^(ep·S) placements stays small


def fits_optimum(ep: int, experts: int, spares: int) -> bool:
    """Whether the optimum is small enough to enumerate (see OPTIMUM_LIMITS)."""
    ep_max, e_max, s_max = OPTIMUM_LIMITS
    return ep <= ep_max and experts <= e_max and spares <= s_max


def optimum_masks(ep: int, experts: int, spares: int) -> Tensor:
    """For every choice of expert (or none) in every spare slot: which ranks hold a copy of each
    expert, as bitmasks over ranks [choices, E]."""
    El = experts // ep
    choices = list(itertools.product(range(experts + 1), repeat=ep * spares))
    choice = torch.tensor(choices, dtype=torch.int64).view(len(choices), ep, spares, 1)
    hosts = (choice == torch.arange(experts)).any(2)                                 # [C, ep, E]
    home = (torch.arange(experts) // El).unsqueeze(0) == torch.arange(ep).unsqueeze(1)   # [ep, E]
    member = hosts | home
    return (member * (1 << torch.arange(ep)).view(1, ep, 1)).sum(1)


def optimum_max_rows(counts: Tensor, masks: Tensor) -> int:
    """Least possible max rank rows for counts [ep, E] over placements masks [C, E].

    Exact, LP-free: for one placement, rows can be split so that every rank computes ≤ T rows
    iff for every set B of ranks, the experts all of whose copies lie inside B carry ≤ T·|B|
    rows (max-flow min-cut on the experts→ranks graph, i.e. Hall's condition); and integral
    capacities give an integral flow. So the optimum is min over placements of
    max over B of ceil(load(experts inside B) / |B|).
    """
    ep = counts.shape[0]
    load = counts.sum(0)
    subsets = torch.arange(1, 1 << ep)                                         # every non-empty rank set
    inside = (masks.unsqueeze(1) & ~subsets.view(1, -1, 1)) == 0                # [C, B, E]
    size = torch.tensor([bin(b).count("1") for b in subsets.tolist()])
    need = ((inside * load).sum(2) + size - 1) // size                          # [C, B]
    return int(need.amax(1).min())
