"""The LungAtlas label table: lobe values, names, colours and foreign codes.

Every other module asks this one what a label value means; the table itself
lives in ``Resources/label_table.json`` next to this file so that the pip
package and the Slicer extension ship the same file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

LABEL_TABLE_PATH = Path(__file__).resolve().parent / "Resources" / "label_table.json"


@dataclass(frozen=True)
class Region:
    """One labelled region. ``value`` is its label in LungAtlas label maps."""

    value: int
    key: str
    name: str
    slicer_segment: str
    color: tuple[int, int, int]
    side: str | None = None
    totalsegmentator: int | None = None
    totalsegmentator_name: str | None = None

    @property
    def color_float(self) -> tuple[float, float, float]:
        """Colour as RGB floats in [0, 1], as Slicer segments take it."""
        return tuple(c / 255.0 for c in self.color)


@dataclass(frozen=True)
class NlstLocation:
    """An NLST ``sct_epi_loc`` code and the lobe it maps to (None for "other")."""

    code: int
    name: str
    lobe: int | None
    other: bool = False


@dataclass(frozen=True)
class LabelTable:
    lobes: tuple[Region, ...]
    lung: Region
    right_lung: Region
    left_lung: Region
    nlst_locations: dict[int, NlstLocation]

    # -- lookups -------------------------------------------------------
    @property
    def lobe_values(self) -> tuple[int, ...]:
        return tuple(r.value for r in self.lobes)

    def lobe(self, value_or_key: int | str) -> Region:
        for r in self.lobes:
            if value_or_key in (r.value, r.key, r.name, r.slicer_segment):
                return r
        raise KeyError(f"no lobe {value_or_key!r} in the label table {LABEL_TABLE_PATH}")

    def lobes_of_side(self, side: str) -> tuple[int, ...]:
        return tuple(r.value for r in self.lobes if r.side == side)

    @property
    def totalsegmentator_to_lobe(self) -> dict[int, int]:
        """TotalSegmentator ``total`` task codes (10-14) -> LungAtlas lobe values."""
        return {r.totalsegmentator: r.value for r in self.lobes}

    def nlst_location(self, code) -> NlstLocation:
        """The NLST ``sct_epi_loc`` entry for ``code``; KeyError for unknown codes
        (the caller reports them, it never guesses)."""
        try:
            return self.nlst_locations[int(code)]
        except (KeyError, TypeError, ValueError):
            raise KeyError(f"unknown NLST sct_epi_loc code {code!r}; known: "
                           f"{sorted(self.nlst_locations)}") from None

    # -- label map helpers ---------------------------------------------
    def remap(self, label_array: np.ndarray, code_map: dict[int, int]) -> np.ndarray:
        """Map foreign codes to LungAtlas values; codes not in ``code_map`` become 0."""
        lut = np.zeros(max(int(label_array.max(initial=0)), max(code_map, default=0)) + 1, np.uint8)
        for src, dst in code_map.items():
            lut[src] = dst
        return lut[label_array]

    def lung_mask(self, label_array: np.ndarray) -> np.ndarray:
        """Whole lung = union of the lobes (or of the side labels of a lobe-less map)."""
        return label_array > 0

    def side_map(self, label_array: np.ndarray) -> np.ndarray:
        """Collapse lobes to sides: 1 = right lung, 2 = left lung."""
        out = np.zeros(label_array.shape, np.uint8)
        out[np.isin(label_array, self.lobes_of_side("right"))] = self.right_lung.value
        out[np.isin(label_array, self.lobes_of_side("left"))] = self.left_lung.value
        return out


def _region(entry: dict, **extra) -> Region:
    fields = {k: entry.get(k) for k in ("value", "key", "name", "slicer_segment", "side",
                                         "totalsegmentator", "totalsegmentator_name")}
    fields.update(extra)
    return Region(color=tuple(entry["color"]), **{k: v for k, v in fields.items() if v is not None})


@lru_cache(maxsize=None)
def load_label_table(path: str | Path = LABEL_TABLE_PATH) -> LabelTable:
    with open(path) as f:
        raw = json.load(f)
    lobes = tuple(_region(e) for e in raw["lobes"])
    values = [r.value for r in lobes]
    if values != list(range(1, len(values) + 1)):
        raise ValueError(f"{path}: lobe values must be 1..{len(values)} in order, got {values}")
    lung = _region(raw["lung"], value=0)
    sides = raw["sides"]
    right = _region(sides["right"], key="right_lung", side="right")
    left = _region(sides["left"], key="left_lung", side="left")
    nlst = {int(code): NlstLocation(int(code), e["name"], e["lobe"], bool(e.get("other", False)))
            for code, e in raw["nlst_sct_epi_loc"].items()}
    return LabelTable(lobes, lung, right, left, nlst)


LABELS = load_label_table()
