"""The atlas bundle that template building writes is the one the nodule atlas reads."""
import SimpleITK as sitk

from LungAtlasLib.nodules.atlas_stats import find_atlas_files
from LungAtlasLib.template.builder import TemplateResult, write_atlas


def test_written_bundle_is_found_by_the_nodule_atlas(tmp_path, phantom_atlas):
    result = TemplateResult(ct=sitk.Cast(phantom_atlas.ct, sitk.sitkFloat32), labels=phantom_atlas.labels,
                            probabilities={1: sitk.Cast(sitk.Equal(phantom_atlas.labels, 1), sitk.sitkFloat32)},
                            rounds=[], reference="atlas", provenance={})
    write_atlas(result, tmp_path)
    ct, labels = find_atlas_files(tmp_path)
    assert ct == tmp_path / "template_ct.nii.gz"
    assert labels == tmp_path / "template_labels.nii.gz"
    (tmp_path / "atlas.json").unlink()  # without the manifest, the file names alone suffice
    assert find_atlas_files(tmp_path) == (ct, labels)
