"""Generation backends behind one interface (:mod:`backends.base`), registered here.

Backends import their heavy dependencies lazily: ``get_backend("diffusers")`` imports
diffusers, listing the names does not.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.base import Backend

#: name -> "module:Class". One line per backend.
REGISTRY: dict[str, str] = {
    "diffusers": "backends.diffusers_backend:DiffusersBackend",
    "original": "backends.original:OriginalBackend",
}
BACKEND_NAMES: tuple[str, ...] = tuple(REGISTRY)


def get_backend(name: str) -> Backend:
    """Instantiate the backend registered as ``name``."""
    try:
        target = REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(REGISTRY)}") from None
    module_name, class_name = target.split(":")
    module = importlib.import_module(module_name)
    backend: Backend = getattr(module, class_name)()
    return backend
