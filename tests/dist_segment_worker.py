"""One process of the multi-rank `segment` tests (tests/test_segment_dist.py): the `s2clip` command
line, with two test hooks on `Segmenter.finish`.

Launched under ``torchrun``, as plain processes with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT`` set (as ``srun`` or ``mpirun`` would), or alone (one process).

Usage:
  dist_segment_worker.py [--ramp] [--delay SECONDS] [--interrupt-at N] segment INPUTS ... -o OUT ...
      --ramp: labels that cover every class (a ramp that depends on the image), so that every export
      format has regions to write (random tiny models often give one class only);
      --delay: sleep this long per image or frame (so a test can kill a rank mid-run);
      --interrupt-at N: rank 1 raises KeyboardInterrupt (as at Ctrl-C) at its N-th image, a failure
      of the process rather than of an input.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def main() -> None:
    args = sys.argv[1:]
    ramp, delay, interrupt_at = False, 0.0, 0
    while args and args[0].startswith("--"):
        if args[0] == "--ramp":
            ramp, args = True, args[1:]
        elif args[0] == "--delay":
            delay, args = float(args[1]), args[2:]
        elif args[0] == "--interrupt-at":
            interrupt_at, args = int(args[1]), args[2:]
        else:
            raise SystemExit(f"unknown worker option {args[0]}")
    from s2clip_cli.cli import app
    from s2clip_cli.pipeline.segmenter import Segmenter

    real_finish = Segmenter.finish
    calls = 0

    def finish(self: Segmenter, image: np.ndarray, *a: object, **k: object) -> object:
        nonlocal calls
        calls += 1
        if calls == interrupt_at and os.environ.get("RANK") == "1":
            raise KeyboardInterrupt
        result = real_finish(self, image, *a, **k)
        if ramp:  # the same labels as tests/test_segment_exports.py's fake_ramp
            h, w = result.labels.shape
            rows, cols = np.mgrid[0:h, 0:w]
            result.labels = ((rows // 7 + cols // 9 + int(image.sum()) % 3) % self.queries.num_classes).astype(np.int64)
        if delay:
            time.sleep(delay)
        return result

    Segmenter.finish = finish  # type: ignore[method-assign]
    app(args=args, prog_name="s2clip")


if __name__ == "__main__":
    main()
