"""One rank of the 2-process evaluation test (launched by tests/test_eval_runner.py with
``python -m torch.distributed.run --standalone --nproc-per-node 2``).

Usage: dist_eval_worker.py DATA_ROOT WORK_DIR [WORK_DIR ...] — evaluates voc21 under DATA_ROOT with
the deterministic colour predictor into each work dir (gloo backend, one decode worker).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_helpers import CONFIG, colour_predict  # noqa: E402

from s2clip_cli.data.datasets import open_dataset  # noqa: E402
from s2clip_cli.evaluation.distributed import DistContext  # noqa: E402
from s2clip_cli.evaluation.runner import evaluate  # noqa: E402


def main() -> None:
    root, work_dirs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    dataset = open_dataset("voc21", root)
    with DistContext.from_env("cpu") as ctx:
        assert ctx.world_size == 2 and ctx.backend == "gloo", (ctx.world_size, ctx.backend)
        for work_dir in work_dirs:
            res = evaluate(dataset, colour_predict, work_dir=work_dir, config=CONFIG, num_workers=1, dist=ctx)
            print(f"rank {ctx.rank} {work_dir.name}: images_this_run={res['timings']['images_this_run']}")


if __name__ == "__main__":
    main()
