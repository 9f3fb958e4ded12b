"""uniGradICON backend through the real package, without the real weights.

A freshly built network is an exact identity (its last convolution is zero-initialised),
and a bias on the final stage's last convolution gives a known uniform translation
(FACTS.md): tallUNet2 returns conv/10 in [0, 1] grid units, so a bias b on channel 2
(the x axis) moves every point by b/10 * (N - 1) network voxels of size
size_x * spacing_x / N mm, with N the network grid (96 here: the smallest that works).
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LungAtlasLib.registration import RegistrationError, get_registration
from LungAtlasLib.registration import transforms as T

torch = pytest.importorskip("torch")
unigradicon = pytest.importorskip("unigradicon")

N = 96
SIZE, SPACING = (64, 56, 48), (2.0, 2.0, 3.0)


@pytest.fixture(scope="module")
def ellipsoid():
    z, y, x = np.mgrid[:SIZE[2], :SIZE[1], :SIZE[0]].astype(np.float32)
    c = np.array(SIZE[::-1]) / 2
    r = np.sqrt(((z - c[0]) * 3) ** 2 + ((y - c[1]) * 2) ** 2 + ((x - c[2]) * 2) ** 2)
    image = sitk.GetImageFromArray(np.where(r < 40, -850.0, 40.0).astype(np.float32))
    image.SetSpacing(SPACING)
    image.SetOrigin((-10.0, 5.0, 20.0))
    mask = sitk.GetImageFromArray((r < 40).astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


@pytest.fixture(scope="module")
def network():
    torch.set_num_threads(2)
    net = unigradicon.make_network([1, 1, N, N, N], include_last_step=True)
    net.eval()
    return net


@pytest.mark.slow
def test_unweighted_network_is_identity_then_bias_translates(ellipsoid, network, tmp_path):
    image, mask = ellipsoid
    backend = get_registration("unigradicon", network=network, input_shape=(N, N, N), device="cpu")
    result = backend.register(image, image)
    warped = sitk.GetArrayFromImage(T.warp_image(image, image, result.fixed_to_moving))
    # exact identity: resampling at the voxel centres themselves reproduces the input
    assert np.abs(warped - sitk.GetArrayFromImage(image)).max() < 1e-3
    assert result.info["options"]["input_shape"] == [N, N, N]

    bias = 0.5
    with torch.no_grad():
        network.regis_net.netPsi.net.lastConv.bias[:] = torch.tensor([0.0, 0.0, bias])
    try:
        result = backend.register(image, image)
    finally:
        with torch.no_grad():
            network.regis_net.netPsi.net.lastConv.bias.zero_()
    shift_mm = bias / 10 * (N - 1) * SIZE[0] * SPACING[0] / N  # 6.33 mm along x
    point = (3.0, 40.0, 90.0)
    assert np.allclose(result.fixed_to_moving.TransformPoint(point), np.add(point, (shift_mm, 0, 0)), atol=0.05)
    # the bias-only network gives the same displacement for (B, A): moving_to_fixed shifts the same way
    assert np.allclose(T.warp_points(point, result.moving_to_fixed), np.add(point, (shift_mm, 0, 0)), atol=0.05)
    # warped image content moves by -shift: the mask's centroid moves 6.33 mm towards -x
    warped_mask = T.warp_labels(mask, image, result.fixed_to_moving, mode="labelwise")
    com = lambda m: np.array(np.nonzero(sitk.GetArrayFromImage(m))).mean(axis=1)[::-1] * SPACING
    assert np.allclose(com(warped_mask) - com(mask), (-shift_mm, 0, 0), atol=0.7)  # within a third of a voxel


def test_missing_weights_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("LUNGATLAS_UNIGRADICON_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RegistrationError, match="not configured.*LUNGATLAS_UNIGRADICON_WEIGHTS"):
        get_registration("unigradicon").check_ready()
    with pytest.raises(RegistrationError, match="does not exist"):
        get_registration("unigradicon", weights=tmp_path / "nope.trch").check_ready()
    tiny = tmp_path / "tiny.trch"
    tiny.write_bytes(b"<html>rate limited</html>")
    monkeypatch.setenv("LUNGATLAS_UNIGRADICON_WEIGHTS", str(tiny))
    with pytest.raises(RegistrationError, match="only 25 bytes"):
        get_registration("unigradicon").check_ready()
    # nothing was downloaded into the current directory
    assert not (tmp_path / "network_weights").exists()


def test_wrong_weights_file_is_refused_before_registering(tmp_path):
    junk = tmp_path / "junk.trch"
    torch.save({"not": torch.zeros(300_000)}, junk)  # > 1 MB, a valid torch file, wrong keys
    backend = get_registration("unigradicon", weights=junk, input_shape=(N, N, N))
    with pytest.raises(RegistrationError, match="not a uniGradICON state dict"):
        backend.network()


def test_options_are_checked():
    with pytest.raises(ValueError, match="above 64"):
        get_registration("unigradicon", input_shape=(64, 64, 64))
    with pytest.raises(ValueError, match="io_iterations"):
        get_registration("unigradicon", io_iterations=0)
    with pytest.raises(ValueError, match="io_similarity"):
        get_registration("unigradicon", io_similarity="mse")
