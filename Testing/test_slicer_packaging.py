"""The Slicer extension package: CMake lists, .ui files, catalog entry, icons, screenshots.

A file missing from a module's CMakeLists.txt is missing from the Extension
Manager package although every test here passes; these checks catch that.
"""
from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cmake_list(cmake: Path, variable: str) -> list[str]:
    text = cmake.read_text()
    match = re.search(r"set\(" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"{cmake}: no set({variable} ...)"
    module = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text).group(1)
    return [item.replace("${MODULE_NAME}", module) for item in match.group(1).split()]


def _files(folder: Path, pattern: str) -> set[str]:
    return {str(p.relative_to(folder.parent if folder.name != "." else folder))
            for p in folder.rglob(pattern) if "__pycache__" not in p.parts and p.is_file()}


def test_every_python_file_and_resource_of_the_lungatlas_module_is_listed():
    module = REPO / "LungAtlas"
    scripts = _cmake_list(module / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(module / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")
    python = {str(p.relative_to(module)) for folder in ("LungAtlasLib", "LungAtlasMRML")
              for p in (module / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert python - set(scripts) == set(), "add these to MODULE_PYTHON_SCRIPTS in LungAtlas/CMakeLists.txt"
    data = {str(p.relative_to(module)) for folder in ("Resources", "LungAtlasLib/Resources")
            for p in (module / folder).rglob("*") if p.is_file()}
    assert data - set(resources) == set(), "add these to MODULE_PYTHON_RESOURCES in LungAtlas/CMakeLists.txt"
    missing = [f for f in scripts + resources if not (module / f).is_file()]
    assert not missing, f"listed in LungAtlas/CMakeLists.txt but absent: {missing}"
    assert scripts == sorted(scripts, key=lambda s: (s != "LungAtlas.py", s)), "keep the list alphabetical"


def test_every_file_of_the_batch_module_is_listed():
    module = REPO / "LungAtlasBatch"
    listed = _cmake_list(module / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS") + \
        _cmake_list(module / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")
    present = {str(p.relative_to(module)) for p in module.rglob("*") if p.is_file() and p.name != "CMakeLists.txt"
               and "__pycache__" not in p.parts}
    assert present - set(listed) == set()
    assert all((module / f).is_file() for f in listed)


def _ui_names(path: Path) -> tuple[set[str], set[str]]:
    root = ET.parse(path).getroot()
    names = {w.get("name") for w in root.iter("widget")}
    parameters = {p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    return names, parameters


def _ui_attributes_used(source: Path) -> set[str]:
    return set(re.findall(r"self\.ui\.(\w+)", source.read_text()))


def test_widgets_use_only_widgets_that_exist_in_their_ui_files():
    for module in ("LungAtlas", "LungAtlasBatch"):
        names, _ = _ui_names(REPO / module / "Resources" / "UI" / f"{module}.ui")
        used = _ui_attributes_used(REPO / module / f"{module}.py")
        assert used - names == set(), f"{module}.py uses widgets missing from {module}.ui"


def test_ui_parameter_bindings_match_the_parameter_node_fields():
    # connectGui binds widgets by their SlicerParameterName; a name that is not a field breaks
    # the GUI in Slicer only, so compare with the wrapper class's annotations here.
    _, parameters = _ui_names(REPO / "LungAtlas" / "Resources" / "UI" / "LungAtlas.ui")
    tree = ast.parse((REPO / "LungAtlas" / "LungAtlas.py").read_text())
    wrapper = next(node for node in ast.walk(tree)
                   if isinstance(node, ast.ClassDef) and node.name == "LungAtlasParameterNode")
    fields = {statement.target.id for statement in wrapper.body if isinstance(statement, ast.AnnAssign)}
    assert parameters <= fields, parameters - fields
    assert len(parameters) >= 14


def test_catalog_entry_follows_the_schema_and_matches_cmake():
    entry = json.loads((REPO / "LungAtlas.json").read_text())
    # Schema v1.0.1: these keys only (additionalProperties false); $schema, category, scm_url required.
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert "slicer-extension-catalog-entry-schema-v1.0" in entry["$schema"]
    assert entry["tier"] in (1, 3, 5)
    cmake = (REPO / "CMakeLists.txt").read_text()
    category = re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', cmake).group(1)
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', cmake).group(1).split()
    assert entry["category"] == category
    assert sorted(entry["build_dependencies"]) == sorted(d for d in depends if d != "NA")
    for url_variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        url = re.search(url_variable + r' "([^"]+)"', cmake).group(1)
        relative = url.split("/main/", 1)[1]
        assert (REPO / relative).is_file(), f"{url_variable} points at {relative}, which is not in the repository"


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_icons_and_screenshots():
    assert _png_size(REPO / "LungAtlas.png") == (128, 128)
    for module in ("LungAtlas", "LungAtlasBatch"):
        assert _png_size(REPO / module / "Resources" / "Icons" / f"{module}.png") == (128, 128)
    guide = (REPO / "docs" / "slicer.md").read_text()
    for shot in ("atlas_view.png", "segment_step.png", "nodules_step.png"):
        width, height = _png_size(REPO / "Resources" / "Screenshots" / shot)
        assert width >= 800 and height >= 400
        assert f"Resources/Screenshots/{shot}" in guide
