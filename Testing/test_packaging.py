"""The core package installs from the repository root with its data and console script."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_holds_the_core_package_label_table_and_console_script(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, text=True)
    wheel = next(tmp_path.glob("lungatlas-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "LungAtlasLib/Resources/label_table.json" in names
    assert "LungAtlasLib/io.py" in names
    # Never the Slicer module files: the pip package is the Slicer-free core only.
    assert not any(n.startswith(("LungAtlas.py", "LungAtlasBatch")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lungatlas = LungAtlasLib.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_core_package_never_imports_slicer_or_qt():
    # The core must run on machines without Slicer (workers, the command line).
    pattern = re.compile(r"^\s*(import|from)\s+(slicer|qt|ctk|vtk|vtkmodules)\b")
    core = REPO / "LungAtlas" / "LungAtlasLib"
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for path in core.rglob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.match(line)]
    assert not offenders, offenders
