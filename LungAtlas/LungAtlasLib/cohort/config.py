"""The cohort run configuration, its stored form, and the hashes that decide what reruns.

One run folder holds one configuration (``run_config.json``). Each stage's
output carries a hash of everything it depends on: its own parameters, the
hashes of the stages it reads from, the case's input, and the versions of the
packages that compute it. A stage whose stored hash equals the one computed now
is finished and is never recomputed; changing a registration option therefore
reruns registration, metrics and nodule mapping, but not segmentation.
"""
from __future__ import annotations

import copy
import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from ..paths import inside, read_json, write_json_atomic

# Stages in pipeline order; "ingest" runs in the driver (index / manifest), the
# per-case stages run on workers, "template" and "aggregate" once per cohort.
STAGES = ("ingest", "segment", "template", "register", "metrics", "nodules", "aggregate")
CASE_STAGES = ("segment", "register", "metrics", "nodules")

# Packages whose version changes what a stage computes (absent ones are recorded as None).
VERSIONED_PACKAGES = {
    "segment": ("lungatlas", "SimpleITK", "numpy", "scipy", "torch", "nnunetv2", "TotalSegmentator"),
    "template": ("lungatlas", "SimpleITK", "numpy", "itk", "antspyx", "torch", "unigradicon"),
    "register": ("lungatlas", "SimpleITK", "numpy", "itk", "antspyx", "torch", "unigradicon",
                 "icon-registration"),
    "metrics": ("lungatlas", "SimpleITK", "numpy", "scipy"),
    "nodules": ("lungatlas", "SimpleITK", "numpy"),
}

DEFAULT_CONFIG = {
    # Extra modules imported on every worker before backends are looked up, so that
    # backends registered by site code (or tests) exist on remote workers too.
    "plugins": [],
    "segmentation": {"name": "totalsegmentator", "options": {}},
    "registration": {"name": "unigradicon", "options": {}},
    # path: an existing template folder (ct.nii.gz + lobes.nii.gz, or an atlas bundle) used
    # as is; otherwise one is built from `subset` segmented cases (first by case id); options
    # go to template.build_template (rounds, spacing_mm, ...).
    # builder: "module:function" (see pipeline._build_template_task for its call)
    "template": {"path": None, "subset": 30, "options": {}, "builder": "LungAtlasLib.cohort.stages:build_template"},
    "metrics": {"hausdorff": True},
    # cohort statistics (nodules/atlas_stats.py); recomputed from the case files on every run
    "aggregate": {"bandwidth_mm": 10.0, "permutations": 199, "report": True},
    "series_rule": {
        "max_thickness_mm": 2.5,
        "require_axial": True,
        "require_complete": True,
        "min_slices": 20,
        # soft-tissue / standard reconstruction kernels of the NLST scanners
        # (GE STANDARD/SOFT, Siemens B1x-B4x, Philips A-C, Toshiba FC01-FC18)
        "preferred_kernels": r"^(STANDARD|SOFT|B[1-4]\d[fs]?|[ABC]|FC0[1-9]|FC1[0-8])$",
        "kernel_first": True,
    },
    # not hashed: where and how the work runs
    "execution": {"workers": 1, "threads_per_worker": 1, "memory_limit": "6GB", "scheduler": None,
                  "retries": 0, "allowed_failures": 2, "gpu_resources": False},
}


def default_config() -> dict:
    return copy.deepcopy(DEFAULT_CONFIG)


def merge(base: dict, override: dict) -> dict:
    """``base`` updated recursively with ``override`` (dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_path(out: str | Path) -> Path:
    return inside(out, "run_config.json")


def load_run_config(out: str | Path) -> dict | None:
    path = config_path(out)
    return merge(default_config(), read_json(path)) if path.exists() else None


def save_run_config(out: str | Path, config: dict) -> Path:
    return write_json_atomic(config_path(out), config)


def load_config_file(path: str | Path) -> dict:
    """A user configuration file (JSON, or YAML when PyYAML is installed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a configuration must be a mapping, got {type(data).__name__}")
    unknown = set(data) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"{path}: unknown configuration keys {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    return data


@lru_cache(maxsize=None)
def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def stage_versions(stage: str) -> dict:
    return {name: package_version(name) for name in VERSIONED_PACKAGES.get(stage, ())}


def digest(*parts) -> str:
    """Short stable hash of JSON-able parts (key order does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_parameters(config: dict, stage: str) -> dict:
    """The part of the configuration that a stage's result depends on."""
    if stage == "segment":
        return {"segmentation": config["segmentation"]}
    if stage == "template":
        return {"template": config["template"], "registration": config["registration"]}
    if stage == "register":
        return {"registration": config["registration"]}
    if stage == "metrics":
        return {"metrics": config["metrics"]}
    return {}


def case_stage_hashes(config: dict, case_input: dict, template_hash: str | None) -> dict:
    """Hash per case stage; each includes the hash of the stage it reads from."""
    hashes = {}
    hashes["segment"] = digest("segment", case_input, stage_parameters(config, "segment"), stage_versions("segment"))
    upstream = hashes["segment"], template_hash
    hashes["register"] = digest("register", upstream, stage_parameters(config, "register"), stage_versions("register"))
    hashes["metrics"] = digest("metrics", hashes["register"], stage_parameters(config, "metrics"),
                               stage_versions("metrics"))
    hashes["nodules"] = digest("nodules", hashes["register"], case_input.get("nodules"),
                               case_input.get("nlst_nodules"), stage_versions("nodules"))
    return hashes


def template_hash(config: dict, subset_segment_hashes: dict[str, str]) -> str:
    """Hash of the template: a given template folder by path, a built one by its inputs."""
    path = config["template"].get("path")
    if path:
        files = sorted(Path(path).glob("*.nii*"))
        stamp = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]
        return digest("template-path", str(Path(path).resolve()), stamp)
    return digest("template-build", stage_parameters(config, "template"), sorted(subset_segment_hashes.items()),
                  stage_versions("template"))
