"""The segmentation interface that every backend implements and every caller uses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import SimpleITK as sitk

from ..backends import load_backend

# backend name -> "module:Class", imported on first use so that heavy optional
# dependencies (torch, nnU-Net) load only when that backend is chosen
BACKENDS: dict[str, str] = {
    "totalsegmentator": ".totalsegmentator:TotalSegmentatorSegmenter",
    "precomputed": ".precomputed:PrecomputedSegmenter",
    "classical": ".classical:ClassicalSegmenter",
}
DEFAULT_BACKEND = "totalsegmentator"


class SegmentationError(RuntimeError):
    """A segmentation could not be produced; the message names the case and what to do."""


@dataclass
class SegmentationResult:
    labels: sitk.Image            # UInt8, on the input CT's grid
    kind: str                     # "lobes": values 1-5; "sides": 1 right lung, 2 left lung
    backend: str
    qc: dict = field(default_factory=dict)    # {"passed": bool, "flags": [{"check", "passed", "reason", ...}]}
    info: dict = field(default_factory=dict)  # provenance: versions, mode, weights, timings, log path


class Segmenter:
    """Base class: ``segment(ct, case_id)`` returns a :class:`SegmentationResult`."""

    name: ClassVar[str] = ""

    def check_ready(self) -> None:
        """Raise :class:`SegmentationError` (saying how to fix it) when the backend
        cannot run here, e.g. missing weights; called before any work starts."""

    def segment(self, ct: sitk.Image, case_id: str = "case") -> SegmentationResult:
        raise NotImplementedError


def available_segmenters() -> list[str]:
    return sorted(BACKENDS)


def get_segmenter(name: str, **options) -> Segmenter:
    return load_backend(BACKENDS, name, __package__, SegmentationError, "segmentation", **options)
