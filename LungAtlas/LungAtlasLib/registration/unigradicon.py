"""``unigradicon`` backend (default): the uniGradICON foundation model through its own package.

Weights: a local file given as ``weights=`` or in ``$LUNGATLAS_UNIGRADICON_WEIGHTS``
(the release file ``Step_2_final.trch``, ~283 MB). It is checked before any work
(exists, is a file, plausible size), its sha256 is recorded in ``info``, and it is
loaded here with ``torch.load(weights_only=True)``. The package's own loader
would download into the CURRENT DIRECTORY when the file is missing; this backend
never calls it, and downloads only with ``allow_download=True`` (into
``download_dir``, default ``~/.cache/lungatlas/unigradicon``).

The network is built once per backend instance (and per input shape) and reused
for every pair; a cohort worker keeps one instance.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .base import Registration, RegistrationError, RegistrationResult
from .itk_bridge import itk_transform_to_sitk, sitk_to_itk

log = logging.getLogger(__name__)

WEIGHTS_ENV = "LUNGATLAS_UNIGRADICON_WEIGHTS"
WEIGHTS_URL = "https://github.com/uncbiag/uniGradICON/releases/download/unigradicon_weights/Step_2_final.trch"
DEFAULT_SHAPE = (175, 175, 175)
# A real state dict of the 70.7 M-parameter network is ~283 MB; anything under this is a
# truncated download or an HTML error page, not weights.
MIN_WEIGHTS_BYTES = 1_000_000
SIMILARITIES = ("lncc", "lncc2", "mind")

_HASH_CACHE: dict[tuple, str] = {}


def sha256_of(path: Path) -> str:
    key = (str(path), path.stat().st_size, path.stat().st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def weights_help() -> str:
    return (f"put the uniGradICON weights file (Step_2_final.trch, ~283 MB, from {WEIGHTS_URL}) on this "
            f"machine and pass its path (--unigradicon-weights PATH or ${WEIGHTS_ENV}), or choose the "
            "offline 'classical' backend")


class UniGradICONRegistration(Registration):
    """uniGradICON registration.

    Options: ``weights`` (path; default ``$LUNGATLAS_UNIGRADICON_WEIGHTS``);
    ``allow_download`` (fetch the release weights into ``download_dir`` when missing);
    ``input_shape`` network grid (default 175^3 as trained; 96^3 is the smallest that
    works, used by tests); ``io_iterations`` instance-optimisation steps (None = off);
    ``io_similarity`` lncc|lncc2|mind; ``loss_function_masking`` (needs lung masks);
    ``dice_loss_weight`` (> 0 needs lobe labels of both scans); ``device``
    ("cpu", "cuda", "cuda:N"; default: cuda when available); ``threads`` torch CPU threads;
    ``network`` an already built icon network (tests, or callers that share one).
    """

    name = "unigradicon"

    def __init__(self, weights: str | os.PathLike | None = None, allow_download: bool = False,
                 download_dir: str | os.PathLike | None = None, input_shape=DEFAULT_SHAPE,
                 io_iterations: int | None = None, io_similarity: str = "lncc",
                 loss_function_masking: bool = False, dice_loss_weight: float = 0.0,
                 device: str | None = None, threads: int | None = None, network=None):
        if io_iterations is not None and int(io_iterations) < 1:
            raise ValueError("io_iterations must be None (no instance optimisation) or >= 1")
        if io_similarity not in SIMILARITIES:
            raise ValueError(f"io_similarity must be one of {SIMILARITIES}, not {io_similarity!r}")
        if len(tuple(input_shape)) != 3 or min(input_shape) <= 64:
            raise ValueError(f"input_shape must be three sizes above 64 (the network fails at 64^3 and below), "
                             f"got {tuple(input_shape)}")
        self.weights = weights if weights is not None else os.environ.get(WEIGHTS_ENV) or None
        self.allow_download = bool(allow_download)
        self.download_dir = Path(download_dir) if download_dir else Path.home() / ".cache" / "lungatlas" / "unigradicon"
        self.input_shape = tuple(int(s) for s in input_shape)
        self.io_iterations = None if io_iterations is None else int(io_iterations)
        self.io_similarity = io_similarity
        self.loss_function_masking = bool(loss_function_masking)
        self.dice_loss_weight = float(dice_loss_weight)
        self.device = device
        self.threads = threads
        self._network = network
        self._weights_info: dict = {"weights": "provided network" if network is not None else None}

    # -- weights ---------------------------------------------------------------------
    def resolve_weights(self) -> Path:
        """The checked weights path; raises :class:`RegistrationError` saying what to do."""
        if self.weights is None:
            if not self.allow_download:
                raise RegistrationError(f"uniGradICON weights are not configured: {weights_help()}")
            target = self.download_dir / "Step_2_final.trch"
            if not target.is_file():
                self._download(target)
            path = target
        else:
            path = Path(self.weights).expanduser()
            if not path.exists():
                if self.allow_download:
                    self._download(path)
                else:
                    raise RegistrationError(f"uniGradICON weights file {path} does not exist: {weights_help()}")
        if not path.is_file():
            raise RegistrationError(f"uniGradICON weights path {path} is not a file: {weights_help()}")
        size = path.stat().st_size
        if size < MIN_WEIGHTS_BYTES:
            raise RegistrationError(f"uniGradICON weights file {path} holds only {size} bytes (a real one is "
                                    f"~283 MB; a failed download?): {weights_help()}")
        return path

    @staticmethod
    def _download(target: Path) -> None:
        import urllib.request

        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        log.info("downloading uniGradICON weights to %s (allow_download=True)", target)
        try:
            urllib.request.urlretrieve(WEIGHTS_URL, partial)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise RegistrationError(f"could not download uniGradICON weights ({exc}): {weights_help()}") from None
        partial.replace(target)

    def check_ready(self) -> None:
        if self._network is None:
            self.resolve_weights()

    # -- network ---------------------------------------------------------------------
    def _torch_device(self):
        import torch

        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def network(self):
        """The network, built (and its weights loaded) on first use, then reused."""
        if self._network is not None:
            return self._network
        import torch
        import unigradicon

        path = self.resolve_weights()
        started = time.perf_counter()
        net = unigradicon.make_network([1, 1, *self.input_shape], include_last_step=True,
                                       loss_fn=unigradicon.make_sim(self.io_similarity),
                                       dice_loss_weight=self.dice_loss_weight,
                                       loss_function_masking=self.loss_function_masking)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.regis_net.load_state_dict(state)
        except Exception as exc:  # unpickling and key/shape mismatches raise many types
            raise RegistrationError(f"{path} is not a uniGradICON state dict ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:200]}): {weights_help()}") from None
        net.eval()
        self._network = net
        self._weights_info = {"weights": str(path), "weights_bytes": path.stat().st_size,
                              "weights_sha256": sha256_of(path),
                              "network_build_s": time.perf_counter() - started}
        return net

    # -- registration ----------------------------------------------------------------
    def register(self, fixed: sitk.Image, moving: sitk.Image, *, fixed_mask: sitk.Image | None = None,
                 moving_mask: sitk.Image | None = None, fixed_labels: sitk.Image | None = None,
                 moving_labels: sitk.Image | None = None) -> RegistrationResult:
        import torch
        import unigradicon
        from icon_registration import config
        from icon_registration import itk_wrapper

        from .classical import check_image, lung_mask_from

        check_image(fixed, "fixed")
        check_image(moving, "moving")
        for role, image in (("fixed", fixed), ("moving", moving)):
            array = sitk.GetArrayViewFromImage(image)
            if float(array.max()) == float(array.min()):
                raise RegistrationError(f"the {role} image is constant ({float(array.min())}); nothing to register")
        use_masks = self.loss_function_masking
        use_dice = self.dice_loss_weight > 0
        if use_dice and (fixed_labels is None or moving_labels is None):
            raise RegistrationError("dice_loss_weight > 0 needs the lobe labels of both scans")
        masks = {}
        if use_masks:
            masks["mask_A"] = sitk_to_itk(lung_mask_from(moving_mask, moving_labels, moving, "moving"), np.int16)
            masks["mask_B"] = sitk_to_itk(lung_mask_from(fixed_mask, fixed_labels, fixed, "fixed"), np.int16)
        if use_dice:
            masks["segmentation_A"] = sitk_to_itk(moving_labels, np.int16)
            masks["segmentation_B"] = sitk_to_itk(fixed_labels, np.int16)

        if self.threads:
            torch.set_num_threads(int(self.threads))
        net = self.network()
        device = self._torch_device()
        config.device = device  # the wrapper moves the model and tensors to config.device
        started = time.perf_counter()
        # image A = moving, image B = fixed: phi_AB resamples A onto B's grid, i.e. maps
        # fixed points to moving points (fixed_to_moving); phi_BA maps moving -> fixed.
        moving_itk = unigradicon.preprocess(sitk_to_itk(moving), "ct")
        fixed_itk = unigradicon.preprocess(sitk_to_itk(fixed), "ct")
        if masks:
            phi_ab, phi_ba = itk_wrapper.register_pair_with_mask(net, moving_itk, fixed_itk,
                                                                 finetune_steps=self.io_iterations, **masks)
        else:
            phi_ab, phi_ba = itk_wrapper.register_pair(net, moving_itk, fixed_itk, finetune_steps=self.io_iterations)
        network_s = time.perf_counter() - started
        fixed_to_moving = itk_transform_to_sitk(phi_ab, fixed)
        moving_to_fixed = itk_transform_to_sitk(phi_ba, moving)
        import icon_registration
        info = {
            "options": {"input_shape": list(self.input_shape), "io_iterations": self.io_iterations,
                        "io_similarity": self.io_similarity, "loss_function_masking": self.loss_function_masking,
                        "dice_loss_weight": self.dice_loss_weight, "device": str(device)},
            **self._weights_info,
            "versions": {"unigradicon": getattr(unigradicon, "__version__", _version("unigradicon")),
                         "icon_registration": getattr(icon_registration, "__version__",
                                                      _version("icon-registration")),
                         "torch": torch.__version__},
            "timings": {"network_s": network_s, "total_s": time.perf_counter() - started},
        }
        return RegistrationResult(fixed_to_moving, moving_to_fixed, self.name, info)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
