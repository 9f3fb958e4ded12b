"""The registration interface that every backend implements and every caller uses.

Direction, stated once: with fixed = atlas and moving = patient,
``fixed_to_moving`` maps atlas points to patient points, which is what ITK's
resampler needs to pull a patient image onto the atlas grid, and
``moving_to_fixed`` maps patient points (nodule centres) into the atlas.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import SimpleITK as sitk

from ..backends import load_backend

# backend name -> "module:Class", imported on first use (torch loads only for unigradicon)
BACKENDS: dict[str, str] = {
    "classical": ".classical:ClassicalRegistration",
    "unigradicon": ".unigradicon:UniGradICONRegistration",
}
DEFAULT_BACKEND = "unigradicon"


class RegistrationError(RuntimeError):
    """A registration could not run; the message names the case and what to do."""


@dataclass
class RegistrationResult:
    fixed_to_moving: sitk.Transform
    moving_to_fixed: sitk.Transform
    backend: str
    info: dict = field(default_factory=dict)  # parameters, timings, weights hash, versions


class Registration:
    """Base class for registration backends."""

    name: ClassVar[str] = ""

    def check_ready(self) -> None:
        """Raise :class:`RegistrationError` when the backend cannot run here (e.g. missing weights)."""

    def register(self, fixed: sitk.Image, moving: sitk.Image, *, fixed_mask: sitk.Image | None = None,
                 moving_mask: sitk.Image | None = None, fixed_labels: sitk.Image | None = None,
                 moving_labels: sitk.Image | None = None) -> RegistrationResult:
        raise NotImplementedError


def available_registrations() -> list[str]:
    return sorted(BACKENDS)


def get_registration(name: str, **options) -> Registration:
    return load_backend(BACKENDS, name, __package__, RegistrationError, "registration", **options)
