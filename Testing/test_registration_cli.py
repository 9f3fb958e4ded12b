"""`lungatlas register` and `lungatlas template` end to end on small phantoms (classical backend)."""
from __future__ import annotations

import json

import pytest
import SimpleITK as sitk

from LungAtlasLib import phantom
from LungAtlasLib.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_inputs")
    paths = {}
    for name, subject in (("atlas", phantom.make_atlas_subject(spacing_mm=6.0)),
                          ("a", phantom.make_subject(seed=21, spacing_mm=6.0, n_nodules=0)),
                          ("b", phantom.make_subject(seed=22, spacing_mm=6.0, n_nodules=0))):
        sitk.WriteImage(subject.ct, str(folder / f"{name}_ct.nii.gz"))
        sitk.WriteImage(subject.labels, str(folder / f"{name}_lobes.nii.gz"))
        paths[name] = (folder / f"{name}_ct.nii.gz", folder / f"{name}_lobes.nii.gz")
    return folder, paths


def test_register_writes_transforms_warped_images_and_metrics(files, tmp_path, capsys):
    _, paths = files
    out = tmp_path / "reg"
    status = main(["register", "--fixed", str(paths["atlas"][0]), "--moving", str(paths["a"][0]),
                   "--fixed-labels", str(paths["atlas"][1]), "--moving-labels", str(paths["a"][1]),
                   "--backend", "classical", "--spacing", "6", "--threads", "1", "--out", str(out)])
    assert status == 0
    for name in ("fixed_to_moving.h5", "moving_to_fixed.h5", "fixed_to_moving_displacement.nii.gz",
                 "warped.nii.gz", "warped_labels.nii.gz", "metrics.json", "registration.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    lung = {row["stage"]: row for row in metrics["regions"] if row["region"] == "lung"}
    # the phantom subject is posed/scaled/deformed away from the atlas: registration must beat
    # both "before" (no alignment) and centroid alignment, at 6 mm by a wide margin
    assert lung["after"]["dice"] > 0.93 > lung["centroid"]["dice"]
    assert lung["after"]["dice"] > lung["before"]["dice"] + 0.1
    assert metrics["folding"]["jacobian_nonpositive_percent"] < 0.05
    warped = sitk.ReadImage(str(out / "warped_labels.nii.gz"))
    assert warped.GetSize() == sitk.ReadImage(str(paths["atlas"][0])).GetSize()
    assert "lung Dice" in capsys.readouterr().out


def test_register_errors_are_user_errors(files, tmp_path, capsys, monkeypatch):
    _, paths = files
    monkeypatch.delenv("LUNGATLAS_UNIGRADICON_WEIGHTS", raising=False)
    status = main(["register", "--fixed", str(paths["atlas"][0]), "--moving", str(paths["a"][0]),
                   "--backend", "unigradicon", "--out", str(tmp_path / "x")])
    assert status == 2
    assert "weights are not configured" in capsys.readouterr().err
    status = main(["register", "--fixed", str(paths["atlas"][0]), "--moving", str(paths["a"][0]),
                   "--backend", "classical", "--out", str(tmp_path / "y")])
    assert status == 2
    assert "needs a lung mask" in capsys.readouterr().err


@pytest.mark.slow
def test_template_command_writes_an_atlas_bundle(files, tmp_path):
    folder, paths = files
    manifest = folder / "cases.csv"
    manifest.write_text("case_id,ct,labels\n" + "".join(f"{n},{paths[n][0].name},{paths[n][1].name}\n"
                                                         for n in ("atlas", "a", "b")))
    out = tmp_path / "atlas"
    status = main(["template", "--manifest", str(manifest), "--backend", "classical", "--spacing", "6",
                   "--template-spacing", "6", "--rounds", "1", "--threads", "1", "--out", str(out)])
    assert status == 0
    atlas = json.loads((out / "atlas.json").read_text())
    assert [i["case_id"] for i in atlas["inputs"]] == ["atlas", "a", "b"]
    assert atlas["rounds"][0]["mean_lung_dice_to_template"] > 0.9
    assert (out / "template_ct.nii.gz").is_file() and (out / "probability_right_middle.nii.gz").is_file()
