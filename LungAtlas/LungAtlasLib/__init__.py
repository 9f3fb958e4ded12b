"""LungAtlas core: the Slicer-free pipeline (read CT, segment lungs and lobes,
register to the atlas template, measure alignment, map nodules, aggregate).

Never imports slicer, qt, ctk or MRML: the Slicer modules and the command line
both call into this package.
"""
__version__ = "0.1.0"
