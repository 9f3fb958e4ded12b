"""The default backend: the real TotalSegmentator package, run in a subprocess.

Weights are never fetched silently. Before anything runs, the backend resolves
the weights folder and checks that every nnU-Net dataset folder the chosen mode
needs is there and complete; otherwise it stops with an error that names the
missing folder and how to get the weights (see docs/segmentation.md). Only
``allow_download=True`` lets TotalSegmentator download what is missing.

Where things live:

- home (``home_dir`` option, else ``$LUNGATLAS_TOTALSEG_HOME``, else
  ``~/.lungatlas/totalsegmentator``): the project-controlled TotalSegmentator home
  given to the subprocess as ``TOTALSEG_HOME_DIR``; its ``config.json`` is written
  with ``send_usage_stats: false`` before every run;
- weights (``weights_dir`` option, else ``$TOTALSEG_WEIGHTS_PATH``, else the first
  existing of ``<home>/nnunet/results``, ``$TOTALSEG_HOME_DIR/nnunet/results``,
  ``~/.totalsegmentator/nnunet/results``): given to the subprocess as
  ``TOTALSEG_WEIGHTS_PATH``, so read-only shared weights work.

The CT is reoriented to LPS before the run and the label map back after it;
TotalSegmentator codes 10-14 become the label table's lobes 1-5.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import geometry, io
from ..labels import LABELS
from .base import SegmentationError, SegmentationResult, Segmenter
from .qc import quality_control

MODES = ("fastest", "fast", "full")
PLANS = "nnUNetPlans"
# nnU-Net datasets TotalSegmentator 2.18 loads for task "total" with a roi_subset, per mode:
# the 6 mm model (298) always runs first to crop to the requested classes; "full"
# checks (and would download) all five 1.5 mm parts even though the lobes come from 291.
DATASETS = {
    298: ("Dataset298_TotalSegmentator_total_6mm_1559subj", "nnUNetTrainer_4000epochs_NoMirroring"),
    297: ("Dataset297_TotalSegmentator_total_3mm_1559subj", "nnUNetTrainer_4000epochs_NoMirroring"),
    291: ("Dataset291_TotalSegmentator_part1_organs_1559subj", "nnUNetTrainerNoMirroring"),
    292: ("Dataset292_TotalSegmentator_part2_vertebrae_1532subj", "nnUNetTrainerNoMirroring"),
    293: ("Dataset293_TotalSegmentator_part3_cardiac_1559subj", "nnUNetTrainerNoMirroring"),
    294: ("Dataset294_TotalSegmentator_part4_muscles_1559subj", "nnUNetTrainerNoMirroring"),
    295: ("Dataset295_TotalSegmentator_part5_ribs_1559subj", "nnUNetTrainerNoMirroring"),
}
MODE_DATASETS = {"fastest": (298,), "fast": (298, 297), "full": (298, 291, 292, 293, 294, 295)}
LOBE_CLASSES = tuple(r.totalsegmentator_name for r in LABELS.lobes)
WEIGHTS_HELP = ("get the weights on a machine with internet access (run `TotalSegmentator -i ct.nii.gz -o out "
                "--fast` once, or download the dataset zip files of the TotalSegmentator GitHub release "
                "v2.0.0-weights) and copy the dataset folders into the weights folder; or set "
                "TOTALSEG_WEIGHTS_PATH / LUNGATLAS_TOTALSEG_HOME to where they are; "
                "or allow the download (--allow-download, allow_download=True) where the network permits")
LOG_TAIL_CHARS = 4000


def default_home() -> Path:
    """The TotalSegmentator home that LungAtlas controls (config.json lives here)."""
    env = os.environ.get("LUNGATLAS_TOTALSEG_HOME")
    return Path(env).expanduser() if env else Path.home() / ".lungatlas" / "totalsegmentator"


def resolve_weights_dir(weights_dir: str | Path | None = None, home_dir: str | Path | None = None) -> tuple[Path, list[str]]:
    """The nnU-Net results folder to use, and the places that were considered (for messages)."""
    if weights_dir is not None:
        return Path(weights_dir).expanduser(), [f"weights_dir option: {weights_dir}"]
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        path = Path(os.environ["TOTALSEG_WEIGHTS_PATH"]).expanduser()
        return path, [f"TOTALSEG_WEIGHTS_PATH={path}"]
    home = Path(home_dir).expanduser() if home_dir is not None else default_home()
    candidates = [("LungAtlas home", home / "nnunet" / "results")]
    if os.environ.get("TOTALSEG_HOME_DIR"):
        candidates.append(("TOTALSEG_HOME_DIR", Path(os.environ["TOTALSEG_HOME_DIR"]).expanduser() / "nnunet" / "results"))
    candidates.append(("TotalSegmentator default", Path.home() / ".totalsegmentator" / "nnunet" / "results"))
    searched = [f"{what}: {path}" for what, path in candidates]
    for _, path in candidates:
        if path.is_dir():
            return path, searched
    return candidates[0][1], searched


def missing_weights(weights_dir: Path, mode: str) -> list[str]:
    """Problems with the dataset folders ``mode`` needs under ``weights_dir`` (empty: ready)."""
    problems = []
    for dataset_id in MODE_DATASETS[mode]:
        folder_name, trainer = DATASETS[dataset_id]
        folder = weights_dir / folder_name
        if not folder.is_dir():
            problems.append(f"missing dataset folder {folder}")
            continue
        model = folder / f"{trainer}__{PLANS}__3d_fullres"
        needed = [model / "plans.json", model / "dataset.json", model / "fold_0" / "checkpoint_final.pth"]
        absent = [str(p.relative_to(weights_dir)) for p in needed if not p.is_file()]
        if absent:
            problems.append(f"incomplete dataset folder {folder}: lacks {', '.join(absent)}")
    return problems


def write_totalseg_config(home: Path) -> Path:
    """TotalSegmentator's config.json with usage statistics off (other keys kept)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    config = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            config = {}
    config.setdefault("totalseg_id", "totalseg_lungatlas")
    config.setdefault("prediction_counter", 0)
    config["send_usage_stats"] = False
    config["statistics_disclaimer_shown"] = True
    tmp = path.with_name(f".config.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, path)
    return path


class TotalSegmentatorSegmenter(Segmenter):
    """Five lobes from TotalSegmentator (task ``total``, the lobes as ``roi_subset``).

    Options:
      mode: "fastest" (6 mm model), "fast" (3 mm, default) or "full" (1.5 mm);
      device: "cpu" (default) or "gpu" / "gpu:N";
      weights_dir, home_dir: see the module docstring;
      allow_download: let TotalSegmentator download missing weights (default False);
      timeout_s: kill the run after this many seconds (default None: no limit);
      work_dir: folder for the temporary input/output (default: a new temporary folder,
        removed afterwards unless keep_work);
      log_path: where to keep the run's log (default: inside work_dir; its tail is in info);
      python: interpreter for the subprocess (default: this one);
      threads: TotalSegmentator's resampling/saving threads (default 1);
      should_cancel: callable polled every 0.2 s; when it returns True the run is killed.
    """

    name = "totalsegmentator"

    def __init__(self, mode: str = "fast", device: str = "cpu", weights_dir=None, home_dir=None,
                 allow_download: bool = False, timeout_s: float | None = None, work_dir=None,
                 keep_work: bool = False, log_path=None, python: str | None = None, threads: int = 1,
                 should_cancel=None):
        if mode not in MODES:
            raise SegmentationError(f"unknown TotalSegmentator mode {mode!r}; choose one of {MODES}")
        if not (device == "cpu" or device == "mps" or device.startswith("gpu") or device.startswith("cuda")):
            raise SegmentationError(f"unknown device {device!r}; use cpu, gpu or gpu:N")
        self.mode = mode
        self.device = "gpu" + device[4:] if device.startswith("cuda") else device
        self.home_dir = Path(home_dir).expanduser() if home_dir is not None else default_home()
        self.weights_dir, self.weights_searched = resolve_weights_dir(weights_dir, self.home_dir)
        self.allow_download = bool(allow_download)
        self.timeout_s = timeout_s
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.keep_work = keep_work
        self.log_path = Path(log_path) if log_path is not None else None
        self.python = python or sys.executable
        self.threads = int(threads)
        self.should_cancel = should_cancel

    # -- readiness -------------------------------------------------------
    def check_ready(self) -> None:
        problems = missing_weights(self.weights_dir, self.mode)
        if problems and not self.allow_download:
            needed = ", ".join(DATASETS[d][0] for d in MODE_DATASETS[self.mode])
            raise SegmentationError(
                f"TotalSegmentator weights for mode {self.mode!r} are not ready: {'; '.join(problems)}. "
                f"Mode {self.mode!r} needs {needed} in the weights folder {self.weights_dir} "
                f"(looked at: {'; '.join(self.weights_searched)}). To fix: {WEIGHTS_HELP}.")
        try:
            write_totalseg_config(self.home_dir)
        except OSError as exc:
            raise SegmentationError(f"TotalSegmentator home {self.home_dir} is not writable ({exc}); "
                                    "set home_dir or LUNGATLAS_TOTALSEG_HOME to a writable folder") from None

    # -- run -------------------------------------------------------------
    def _environment(self) -> dict:
        env = dict(os.environ)
        env["TOTALSEG_HOME_DIR"] = str(self.home_dir)
        env["TOTALSEG_WEIGHTS_PATH"] = str(self.weights_dir)
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        # The runner imports LungAtlasLib; make sure it finds this copy.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def _run(self, command: list[str], log_path: Path, case_id: str) -> tuple[int, float]:
        start = time.perf_counter()
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._environment(),
                                       start_new_session=True)
            reason = None
            while True:
                try:
                    returncode = process.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if self.timeout_s is not None and time.perf_counter() - start > self.timeout_s:
                    reason = f"timed out after {self.timeout_s:g} s"
                elif self.should_cancel is not None and self.should_cancel():
                    reason = "cancelled"
                if reason:
                    _kill_tree(process)
                    raise SegmentationError(f"case {case_id}: TotalSegmentator {reason}; log: {log_path}")
        return returncode, time.perf_counter() - start

    def segment(self, ct: sitk.Image, case_id: str = "case") -> SegmentationResult:
        self.check_ready()
        canonical, original_orientation = io.to_canonical(ct)
        work = self.work_dir or Path(tempfile.mkdtemp(prefix="lungatlas_totalseg_"))
        work.mkdir(parents=True, exist_ok=True)
        input_path, output_path = work / "ct.nii.gz", work / "totalseg.nii.gz"
        log_path = self.log_path or work / "totalsegmentator.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        succeeded = False
        try:
            io.write_image(canonical, input_path)
            if output_path.exists():
                output_path.unlink()
            command = [self.python, "-m", "LungAtlasLib.segmentation.totalseg_runner",
                       "--input", str(input_path), "--output", str(output_path), "--mode", self.mode,
                       "--device", self.device, "--threads", str(self.threads), "--roi", *LOBE_CLASSES]
            returncode, seconds = self._run(command, log_path, case_id)
            log_text = log_path.read_text(errors="replace")
            tail = log_text[-LOG_TAIL_CHARS:]
            if returncode != 0:
                raise SegmentationError(
                    f"case {case_id}: TotalSegmentator exited with status {returncode}; log: {log_path}; "
                    f"last lines: {_last_lines(log_text)}")
            if not output_path.is_file() or output_path.stat().st_size == 0:
                raise SegmentationError(
                    f"case {case_id}: TotalSegmentator exited 0 but wrote no output {output_path}; log: {log_path}; "
                    f"last lines: {_last_lines(log_text)}")
            try:
                raw = sitk.ReadImage(str(output_path))
            except RuntimeError as exc:
                raise SegmentationError(f"case {case_id}: TotalSegmentator output {output_path} is unreadable: "
                                        f"{str(exc).strip().splitlines()[-1]}; log: {log_path}") from None
            labels = self._to_lobes(raw, canonical, case_id, output_path)
            succeeded = True
        finally:
            # A temporary folder goes after success; after a failure it stays when it
            # holds the only copy of the log that the error message points to.
            if self.work_dir is None and not self.keep_work and (succeeded or self.log_path is not None):
                shutil.rmtree(work, ignore_errors=True)
        labels = io.from_canonical(labels, original_orientation)
        qc = quality_control(labels, ct, kind="lobes")
        info = {"backend": self.name, "mode": self.mode, "device": self.device,
                "weights_dir": str(self.weights_dir), "datasets": [DATASETS[d][0] for d in MODE_DATASETS[self.mode]],
                "home_dir": str(self.home_dir), "returncode": returncode, "seconds": round(seconds, 2),
                "log_path": str(log_path) if (self.log_path or self.work_dir or self.keep_work) else None,  # else removed
                "log_tail": tail, "orientation_in": original_orientation,
                "totalsegmentator_version": _package_version("totalsegmentator")}
        return SegmentationResult(labels=labels, kind="lobes", backend=self.name, qc=qc, info=info)

    @staticmethod
    def _to_lobes(raw: sitk.Image, canonical: sitk.Image, case_id: str, path: Path) -> sitk.Image:
        if raw.GetDimension() != 3 or raw.GetNumberOfComponentsPerPixel() != 1:
            raise SegmentationError(f"case {case_id}: TotalSegmentator output {path} is not a 3D label map")
        array = sitk.GetArrayFromImage(raw)
        if array.min() < 0 or array.max() > 255:
            raise SegmentationError(f"case {case_id}: TotalSegmentator output {path} holds values "
                                    f"{array.min()}..{array.max()}, not class codes")
        lobes = LABELS.remap(array.astype(np.int64), LABELS.totalsegmentator_to_lobe)
        if not lobes.any():
            raise SegmentationError(f"case {case_id}: TotalSegmentator produced no lung lobe (codes 10-14 absent "
                                    f"from {path}, codes present: {np.unique(array)[:20].tolist()})")
        image = sitk.GetImageFromArray(lobes.astype(np.uint8))
        image.CopyInformation(raw)
        if geometry.same_grid(image, canonical, tolerance=1e-3):
            image.CopyInformation(canonical)
        else:  # never expected; keep the contract (labels on the CT grid) anyway
            image = geometry.resample_to(image, canonical, is_label=True)
        return image


def _kill_tree(process: subprocess.Popen) -> None:
    """Stop the runner and the nnU-Net workers it spawned (its own session)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _last_lines(text: str, n: int = 5) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:]) if lines else "(empty log)"


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # not installed in this interpreter: the subprocess may still have it
        return None
