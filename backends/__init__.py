"""Generation backends behind one interface (:mod:`backends.base`), and their registry.

A backend is named in a scenario's ``matrix.backend`` in one of three ways:

- a built-in name (:data:`BUILTIN`: ``diffusers``, ``original``);
- a name an installed package registers in the entry-point group :data:`ENTRY_POINT_GROUP`
  (``sdbench.backends``), e.g. in its ``pyproject.toml``::

      [project.entry-points."sdbench.backends"]
      myapp = "myapp.sdbench_backend:MyAppBackend"

- ``package.module:Class`` directly, for a class on the Python path that is not registered.

Discovery is lazy: listing the names (:func:`names`) reads the installed packages' metadata and
imports no backend; :func:`get_backend` imports the one it is asked for. Backends import their
heavy dependencies lazily themselves (in :meth:`~backends.base.Backend.imports` / ``load``).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.base import Backend

#: The entry-point group of backend plugins.
ENTRY_POINT_GROUP = "sdbench.backends"
#: The backends sdbench ships: name -> ``module:Class``.
BUILTIN: dict[str, str] = {
    "diffusers": "backends.diffusers_backend:DiffusersBackend",
    "original": "backends.original:OriginalBackend",
}
#: Backends registered in this process (:func:`register`; tests). Workers started as fresh
#: interpreters do not see them: a plugin for real runs is an entry point or ``module:Class``.
REGISTRY: dict[str, str] = dict(BUILTIN)

HOW_TO_REGISTER = (
    f"register one with an entry point in group {ENTRY_POINT_GROUP!r} of an installed package "
    "(docs/backends.md), or name it as package.module:Class"
)


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry)
    return found


def registry() -> dict[str, str]:
    """Every known backend name -> ``module:Class`` (built-ins win over a plugin's name)."""
    plugins = {name: entry.value for name, entry in _entry_points().items()}
    return {**plugins, **REGISTRY}


def names() -> tuple[str, ...]:
    """The known backend names: built-ins first, then plugins, sorted."""
    known = registry()
    return (*REGISTRY, *sorted(name for name in known if name not in REGISTRY))


def register(name: str, target: str) -> None:
    """Register ``name`` as ``module:Class`` in this process."""
    if ":" not in target:
        raise ValueError(f"expected 'module:Class', got {target!r}")
    REGISTRY[name] = target


def is_target(name: str) -> bool:
    """``package.module:Class`` rather than a registered name."""
    return ":" in name


def unknown(name: str) -> str | None:
    """Why ``name`` names no backend (one line, listing the known names), or None if it does.

    A ``module:Class`` is imported to check it; a registered name is not.
    """
    if not is_target(name):
        if name in registry():
            return None
        return f"unknown backend {name!r}; known: {', '.join(names())}; {HOW_TO_REGISTER}"
    try:
        backend_class(name)
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        return f"backend {name!r} cannot be loaded: {error}"
    return None


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name`` (a registered name or ``module:Class``), imported."""
    from backends.base import Backend

    target = name if is_target(name) else registry().get(name)
    if target is None:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(names())}")
    module_name, _, class_name = target.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"expected 'package.module:Class', got {target!r}")
    found = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(found, type) and issubclass(found, Backend)):
        raise TypeError(f"{target} is not a subclass of backends.base.Backend")
    return found


def get_backend(name: str) -> Backend:
    """Instantiate backend ``name`` (a registered name or ``module:Class``)."""
    return backend_class(name)()


def versions(name: str) -> dict[str, str]:
    """The versions of the packages that identify backend ``name`` (``Backend.versions``)."""
    return backend_class(name).versions()
