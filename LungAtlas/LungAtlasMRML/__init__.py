"""Slicer-side helpers of the LungAtlas extension (imports ``slicer``; never imported by LungAtlasLib).

- :mod:`.bridge`: the one place that converts between the core's types
  (SimpleITK images and transforms in LPS, label maps, tables, points) and MRML
  nodes (RAS): volume, segmentation, transform, table and markups nodes.
- :mod:`.headless`: a ready MRML scene with the logics Slicer would set up
  (colour tables, segmentation converter rules) for plain-Python use under the
  PyPI ``slicer-core`` package (tests, the screenshot script, headless batch).
- :mod:`.process`: long steps in a background process, read by a thread and a
  Qt timer in the GUI, or waited for in tests and batch; cancel kills the tree.
- :mod:`.runner`: the script that background process runs (no ``slicer`` import).
"""
