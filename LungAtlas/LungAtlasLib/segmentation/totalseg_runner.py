"""Runs TotalSegmentator once, in its own process: ``python -m LungAtlasLib.segmentation.totalseg_runner``.

Started by :class:`~LungAtlasLib.segmentation.totalsegmentator.TotalSegmentatorSegmenter`
with ``TOTALSEG_HOME_DIR`` / ``TOTALSEG_WEIGHTS_PATH`` already set. Kept apart from
the caller's process so that a crash, a hang or a cancel of the model cannot take
the caller down. nnU-Net starts a ``spawn`` process pool, which re-imports the
main module: the work must stay behind the ``__main__`` guard below.

Exit status: 0 success; 3 TotalSegmentator raised (message on stderr); the
status of ``sys.exit`` calls inside TotalSegmentator otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", required=True, help="CT NIfTI (HU)")
    parser.add_argument("--output", required=True, help="multi-label NIfTI to write")
    parser.add_argument("--mode", choices=("fastest", "fast", "full"), default="fast")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--roi", nargs="*", default=None, help="TotalSegmentator class names")
    parser.add_argument("--threads", type=int, default=1, help="resampling / saving threads")
    args = parser.parse_args(argv)

    start = time.time()
    print(f"lungatlas runner: TotalSegmentator mode={args.mode} device={args.device} roi={args.roi}", flush=True)
    from totalsegmentator.python_api import totalsegmentator

    try:
        totalsegmentator(args.input, args.output, ml=True, task="total",
                         fast=args.mode == "fast", fastest=args.mode == "fastest",
                         roi_subset=args.roi or None, device=args.device,
                         nr_thr_resamp=args.threads, nr_thr_saving=args.threads, quiet=False)
    except Exception as exc:  # report, and say so in the exit status
        traceback.print_exc()
        print(f"lungatlas runner: TotalSegmentator failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 3
    print(f"lungatlas runner: finished in {time.time() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
