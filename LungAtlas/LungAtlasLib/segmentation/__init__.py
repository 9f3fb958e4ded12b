"""Lung and lobe segmentation: one interface, backends chosen by name.

    from LungAtlasLib.segmentation import get_segmenter
    result = get_segmenter("totalsegmentator", mode="fast").segment(ct_image, case_id="p100001_T0")
    result.labels   # UInt8 label map on the CT grid, values from the label table
    result.kind     # "lobes" (1-5) or "sides" (1 right lung, 2 left lung: lobe-less backends)
    result.qc       # quality-control flags with reasons
"""
from .base import SegmentationError, SegmentationResult, Segmenter, available_segmenters, get_segmenter

__all__ = ["SegmentationError", "SegmentationResult", "Segmenter", "available_segmenters", "get_segmenter"]
