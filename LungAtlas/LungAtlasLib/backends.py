"""Backends chosen by name: the one lookup that every pipeline step's registry uses.

A registry maps a backend name to ``"module:Class"``; the module is imported on
first use, so heavy optional dependencies (torch, nnU-Net) load only when that
backend is chosen.
"""
from __future__ import annotations

import importlib


def load_backend(registry: dict[str, str], name: str, package: str, error: type[Exception],
                 step: str, /, **options):
    """Instantiate backend ``name`` of ``registry`` (relative modules resolve in ``package``)
    with ``options``; an unknown name raises ``error`` listing the choices. The lookup's
    own parameters are positional-only, so every keyword belongs to the backend."""
    try:
        target = registry[name]
    except KeyError:
        raise error(f"unknown {step} backend {name!r}; choose one of {sorted(registry)}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name, package), class_name)
    return cls(**options)
