"""Shared fixtures: where the real CT lives, and seeded phantoms.

Real CT is read from ../shared/data/ct (relative to the repository root) or
from $LUNGATLAS_TEST_DATA. Tests that need it skip with a reason when it is
absent; in CI it is present, so they run.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def ct_data_root() -> Path:
    return Path(os.environ.get("LUNGATLAS_TEST_DATA", REPO_ROOT.parent / "shared" / "data" / "ct"))


@pytest.fixture(scope="session")
def ct_data() -> Path:
    root = ct_data_root()
    if not (root / "nsclc-lung1-001").is_dir():
        message = f"real CT not found under {root} (set LUNGATLAS_TEST_DATA)"
        if os.environ.get("CI"):
            # In CI the data is always beside the clone: a skip there would hide real-data tests.
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def lung1_dicom(ct_data) -> Path:
    return ct_data / "nsclc-lung1-001" / "dicom" / "image"


@pytest.fixture(scope="session")
def phantom_atlas():
    from LungAtlasLib import phantom
    return phantom.make_atlas_subject(spacing_mm=4.0)


@pytest.fixture(scope="session")
def phantom_subject():
    from LungAtlasLib import phantom
    return phantom.make_subject(seed=3, spacing_mm=4.0, n_nodules=3)


@pytest.fixture(scope="session")
def slicer_modules():
    """Makes the Slicer module files importable in plain Python under slicer-core:
    Qt-free stand-ins for ``slicer.ScriptedLoadableModule`` (Testing/slicer_stubs/slicer,
    no __init__.py: slicer-core extends the ``slicer`` package path) and the module folders
    on sys.path. Returns the repository root."""
    import sys

    pytest.importorskip("slicer")
    stubs = REPO_ROOT / "Testing" / "slicer_stubs"
    for folder in (stubs, REPO_ROOT / "LungAtlasBatch", REPO_ROOT / "LungAtlas"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import slicer
    if str(stubs / "slicer") not in slicer.__path__:  # slicer imported before the path was set
        slicer.__path__.append(str(stubs / "slicer"))
    return REPO_ROOT
