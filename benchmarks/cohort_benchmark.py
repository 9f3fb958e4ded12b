"""Cohort-engine benchmarks (ratios measured side by side, not timed tests).

    .venv/bin/python benchmarks/cohort_benchmark.py [--out benchmarks/out/cohort] [--only index,workers,plan]

(a) index: a synthetic NLST-like tree of >= 2,000 series (real DICOM headers, 8x8 pixels):
    indexing time per series against reading one header, and per slice header.
(b) workers: the demo cohort run with 2 local Dask worker processes against 1 (throughput ratio).
(c) plan: series selection and run planning for 75,000 exams / 200,000 series, no images.
Results are printed and written to OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def bench_index(out: Path, n_participants: int = 450, slices: int = 6) -> dict:
    """~450 participants x 1-2 exams x 2 series; each series `slices` slices."""
    import pydicom

    sys.path.insert(0, str(REPO / "Testing"))
    from test_cohort_ingest import write_series
    from pydicom.uid import generate_uid

    from LungAtlasLib.cohort import config as cfgmod
    from LungAtlasLib.cohort import ingest

    tree = out / "nlst_tree"
    marker = tree / ".complete"
    rng = np.random.default_rng(0)
    if not marker.exists():
        shutil.rmtree(tree, ignore_errors=True)
        started = time.perf_counter()
        for p in range(n_participants):
            pid = str(100000 + p)
            for year, date in enumerate(("19990102", "20000102", "20010102")[: 1 + int(rng.integers(0, 2)) + 1]):
                study = generate_uid()
                write_series(tree / pid / f"T{year}" / "a", pid, study, date, n_slices=slices, thickness=2.5,
                             kernel="STANDARD")
                write_series(tree / pid / f"T{year}" / "b", pid, study, date, n_slices=slices, thickness=1.25,
                             kernel="LUNG")
        marker.write_text("")
        print(f"  wrote the tree in {time.perf_counter() - started:.0f} s", flush=True)
    files = sorted(tree.rglob("*.dcm"))
    # one header, as the baseline: median of 200 reads of different files (cold metadata per file)
    times = []
    for f in files[:200]:
        t = time.perf_counter()
        pydicom.dcmread(f, stop_before_pixels=True)
        times.append(time.perf_counter() - t)
    one_header = float(np.median(times))
    results = {}
    for workers in (1, 2):
        t = time.perf_counter()
        series = ingest.index_dicom_tree(tree, workers=workers)
        elapsed = time.perf_counter() - t
        results[workers] = elapsed
    exams = ingest.select_series(series, cfgmod.default_config()["series_rule"])
    per_series = results[2] / len(series)
    return {"series": int(len(series)), "slices": int(len(files)), "exams": int(len(exams)),
            "slices_per_series": slices, "index_seconds_1_process": round(results[1], 2),
            "index_seconds_2_processes": round(results[2], 2), "seconds_per_series": per_series,
            "one_header_seconds": one_header, "ratio_series_to_one_header": round(per_series / one_header, 2),
            "ratio_per_slice_to_one_header": round(results[2] / len(files) / one_header, 2)}


def bench_plan(out: Path, n_exams: int = 75_000, n_series: int = 200_000) -> dict:
    from LungAtlasLib.cohort import config as cfgmod
    from LungAtlasLib.cohort import ingest, pipeline

    rng = np.random.default_rng(1)
    exam_of_series = np.sort(np.concatenate([np.arange(n_exams), rng.integers(0, n_exams, n_series - n_exams)]))
    pid = 100000 + exam_of_series // 3
    year = exam_of_series % 3
    kernels = np.array(["STANDARD", "LUNG", "BONE", "B30f", "B50f", "C", "D"])
    series = pd.DataFrame({
        "participant_id": pid.astype(str), "study_uid": [f"1.2.{e}" for e in exam_of_series],
        "study_date": np.array(["19990102", "20000102", "20010102"])[year], "study_yr": year,
        "timepoint": np.array(["T0", "T1", "T2"])[year], "series_uid": [f"1.2.{e}.{i}" for i, e in
                                                                       enumerate(exam_of_series)],
        "modality": "CT", "description": "", "manufacturer": "", "kernel": kernels[rng.integers(0, 7, n_series)],
        "slice_thickness_mm": rng.choice([1.0, 1.25, 2.0, 2.5, 3.2, 5.0], n_series), "slice_gap_mm": 2.0,
        "n_slices": rng.integers(100, 400, n_series), "orientation": "axial", "complete": rng.random(n_series) > 0.02,
        "problem": None, "path": [f"/nlst/{p}/{e}/{i}" for i, (p, e) in enumerate(zip(pid, exam_of_series))]})
    config = cfgmod.default_config()
    run = out / "plan_run"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    exams = ingest.select_series(series, config["series_rule"])
    t1 = time.perf_counter()
    cases, problems = ingest.exams_to_cases(exams)
    t2 = time.perf_counter()
    case_dicts = [{k: pipeline._clean(v) for k, v in row.items()} for row in cases.to_dict("records")]
    table = pipeline.plan(run, config, case_dicts, None)
    t3 = time.perf_counter()
    return {"series": n_series, "exams": int(len(exams)), "cases": int(len(cases)), "problems": len(problems),
            "select_seconds": round(t1 - t0, 2), "cases_seconds": round(t2 - t1, 2),
            "plan_seconds": round(t3 - t2, 2), "total_seconds": round(t3 - t0, 2),
            "to_run": int((table["segment"] == "todo").sum())}


def _warm_up():
    import ants  # noqa: F401  (antspyx: seconds to import, once per worker)

    import LungAtlasLib.registration.classical  # noqa: F401
    import LungAtlasLib.segmentation.classical  # noqa: F401


def bench_workers(out: Path, subjects: int = 8, spacing: float = 4.0) -> dict:
    from LungAtlasLib import demo
    from LungAtlasLib.cohort import pipeline
    from LungAtlasLib.cohort.executor import Executor

    manifest = demo.ensure_demo_cohort(out / "workers_data", subjects, spacing)
    cases = manifest[~manifest.is_atlas].drop(columns="is_atlas")
    path = out / "workers_manifest.csv"
    cases.to_csv(path, index=False)
    seconds = {}
    for workers in (1, 2):
        run = out / f"workers_{workers}"
        shutil.rmtree(run, ignore_errors=True)
        config = demo.demo_config(out / "workers_data", manifest, "precomputed", "classical", workers,
                                  registration_spacing=6.0, template="phantom")
        config["execution"]["workers"] = workers
        # case throughput: the cohort statistics (the same for both) kept small
        config["aggregate"] = {"permutations": 9, "report": False}
        # one thread per worker (ITK/ANTs): the comparison is of workers, not of threads
        config["registration"]["options"]["threads"] = 1
        pipeline.index_cohort(run, manifest=path, config=config)
        # the cluster starts before the clock: throughput of cases, not start-up time
        # both runs in worker processes, imports done before the clock starts
        with Executor(progress=False, processes=True, **config["execution"]) as executor:
            executor.client.run(_warm_up)
            t = time.perf_counter()
            summary = pipeline.run_cohort(run, config, executor=executor)
            seconds[workers] = time.perf_counter() - t
        if summary["failed"]:
            raise RuntimeError(f"benchmark run with {workers} workers had failures: {summary['failed_cases']}")
    return {"subjects": subjects, "spacing_mm": spacing, "seconds_1_worker": round(seconds[1], 1),
            "seconds_2_workers": round(seconds[2], 1), "speedup": round(seconds[1] / seconds[2], 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "cohort")
    parser.add_argument("--only", default="index,workers,plan")
    args = parser.parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.only.split(","):
        print(f"{name} ...", flush=True)
        results[name] = {"index": bench_index, "workers": bench_workers, "plan": bench_plan}[name](args.out)
        print(json.dumps(results[name], indent=1), flush=True)
        results_path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
