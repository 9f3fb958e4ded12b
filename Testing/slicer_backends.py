"""Test-only backends for the Slicer module tests (never part of the product).

The LungAtlas logic runs segmentation and registration in a background process
(LungAtlasMRML/runner.py); the tests pass ``--plugin slicer_backends`` so that
process registers these backends by name:

- ``test-lungsplit`` segmenter: the clinical lung contours of the real CT
  (``$LUNGATLAS_TEST_LUNGS``, 1 right, 2 left) split into five "lobes" by height
  (right lung in thirds, left in halves): stands in for TotalSegmentator so
  that segment names, colours and voxel counts can be checked exactly.
- ``test-missing-weights`` segmenter: ``check_ready`` fails as a model backend
  without weights does.
- ``test-hang`` segmenter: starts a child process that never ends, prints its
  pid, and waits: the tests cancel it and check that the whole tree is gone.
- ``test-analytic`` registration: the exact known transform
  fixed_to_moving(x) = x + T + S (x - C) (LPS mm) as displacement fields, with its
  exact inverse, so tests know where every point must go.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from LungAtlasLib.geometry import resample_to
from LungAtlasLib.io import read_label_map
from LungAtlasLib.registration import base as registration_base
from LungAtlasLib.registration.base import Registration, RegistrationResult
from LungAtlasLib.segmentation import base as segmentation_base
from LungAtlasLib.segmentation.base import SegmentationError, SegmentationResult, Segmenter

segmentation_base.BACKENDS["test-lungsplit"] = "slicer_backends:LungSplitSegmenter"
segmentation_base.BACKENDS["test-missing-weights"] = "slicer_backends:MissingWeightsSegmenter"
segmentation_base.BACKENDS["test-hang"] = "slicer_backends:HangingSegmenter"
registration_base.BACKENDS["test-analytic"] = "slicer_backends:AnalyticRegistration"

# fixed_to_moving(x) = x + T + S (x - C): a 5 % scaling about C plus a translation (mm, LPS)
T = np.array([6.0, -4.0, 9.0])
S = 0.05
C = np.array([0.0, 0.0, 0.0])


def fixed_to_moving(points):
    points = np.asarray(points, float)
    return points + T + S * (points - C)


def moving_to_fixed(points):
    return (np.asarray(points, float) - T + S * C) / (1.0 + S)


def split_lungs(sides: np.ndarray) -> np.ndarray:
    """Right lung (1) in thirds by slice index, left (2) in halves -> values 1-5 (numpy order z, y, x;
    a higher index is more superior for an LPS-ordered image)."""
    out = np.zeros(sides.shape, np.uint8)
    for side, values in ((1, (3, 2, 1)), (2, (5, 4))):
        z = np.nonzero(sides == side)[0]
        edges = np.quantile(z, np.linspace(0, 1, len(values) + 1)[1:-1])
        part = np.digitize(np.arange(sides.shape[0]), edges)
        for index, value in enumerate(values):
            out[(sides == side) & (part[:, None, None] == index)] = value
    return out


class LungSplitSegmenter(Segmenter):
    name = "test-lungsplit"

    def __init__(self, mode=None, device=None):
        self.mode = mode
        self.device = device

    def segment(self, ct, case_id="case"):
        sides = resample_to(read_label_map(os.environ["LUNGATLAS_TEST_LUNGS"]), ct, is_label=True)
        labels = sitk.GetImageFromArray(split_lungs(sitk.GetArrayViewFromImage(sides)))
        labels.CopyInformation(ct)
        qc = {"passed": False, "flags": [{"check": "lobes_present", "passed": True, "reason": ""},
                                         {"check": "test_flag", "passed": False, "reason": "stand-in lobes"}]}
        return SegmentationResult(labels, "lobes", self.name, qc, {"mode": self.mode, "device": self.device})


class MissingWeightsSegmenter(Segmenter):
    name = "test-missing-weights"

    def check_ready(self):
        raise SegmentationError("model weights not found in /nowhere/Dataset297: put the weights folder there "
                                "or set TOTALSEG_HOME_DIR")

    def segment(self, ct, case_id="case"):
        raise AssertionError("must not run without weights")


class HangingSegmenter(Segmenter):
    name = "test-hang"

    def segment(self, ct, case_id="case"):
        child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
        print(f"CHILD {child.pid}", flush=True)
        print("LUNGATLAS-PROGRESS 30 waiting forever", flush=True)
        child.wait()
        raise AssertionError("the child never ends by itself")


def _field(reference: sitk.Image, mapping) -> sitk.DisplacementFieldTransform:
    size = reference.GetSize()
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij"), -1)[..., ::-1]
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    points = np.asarray(reference.GetOrigin()) + (index * np.asarray(reference.GetSpacing())) @ direction.T
    field = sitk.GetImageFromArray(mapping(points) - points, isVector=True)
    field.CopyInformation(reference)
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


class AnalyticRegistration(Registration):
    name = "test-analytic"

    def __init__(self, io_steps=None, device=None):
        self.io_steps = io_steps

    def register(self, fixed, moving, *, fixed_mask=None, moving_mask=None, fixed_labels=None, moving_labels=None):
        return RegistrationResult(_field(fixed, fixed_to_moving), _field(moving, moving_to_fixed), self.name,
                                  {"io_steps": self.io_steps})
