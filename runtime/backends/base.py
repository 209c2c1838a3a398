"""What the real-row backends share: which device collective carries their rows.

A backend (`symm_mem`, `deepep`) is its own index arithmetic — layout, splits and offsets,
padding, overflow — around ONE library call (torch's NVSHMEM `all_to_all_vdev_2d`, DeepEP
HybridEP's `dispatch_with_permute` / `combine_with_unpermute`). That call sits behind a
transport object with exactly the library's contract; each backend module defines the
Protocol its transport follows and the real one, built lazily on first use (the optional
packages are imported there, never at module import).

Test seam: `install(backend, transport)` replaces the real transport in this process.
The CPU oracle installs gloo stand-ins (tests/runtime/backend_standins.py) that follow the
same contracts, so everything but the library call runs on CPU. It is not a user-facing
CPU mode: a spec asking for these backends on `device: cpu` is refused at validation.
"""
from __future__ import annotations

from typing import Any, Callable

_INSTALLED: dict[str, Any] = {}
_REAL: dict[tuple, Any] = {}


def install(backend: str, transport: Any) -> None:
    """Use `transport` for `backend`'s device collective in this process (tests only)."""
    _INSTALLED[backend] = transport


def uninstall(backend: str) -> None:
    _INSTALLED.pop(backend, None)


def installed(backend: str) -> Any | None:
    """The transport a test installed for `backend`, or None."""
    return _INSTALLED.get(backend)


def transport(backend: str, key: tuple, make: Callable[[], Any]) -> Any:
    """The installed transport for `backend`, else the real one for `key` (made once by `make`:
    a library buffer is allocated and rendezvoused on the host, before any CUDA-graph capture)."""
    if backend in _INSTALLED:
        return _INSTALLED[backend]
    full = (backend,) + key
    if full not in _REAL:
        _REAL[full] = make()
    return _REAL[full]
