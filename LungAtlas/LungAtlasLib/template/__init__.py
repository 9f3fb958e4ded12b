"""Groupwise template building: the atlas space itself, built from N scans.

    from LungAtlasLib.template import TemplateCase, build_template, write_atlas
    result = build_template([TemplateCase(id, ct, labels), ...], backend="classical", rounds=3)
    write_atlas(result, "atlas/")
"""
from .builder import TemplateCase, TemplateResult, build_template, choose_medoid, warp_atlas, write_atlas

__all__ = ["TemplateCase", "TemplateResult", "build_template", "choose_medoid", "warp_atlas", "write_atlas"]
