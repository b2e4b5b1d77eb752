"""One rank of the multi-process tests (tests/test_eval_runner.py, tests/test_cluster.py).

Launched under ``torchrun`` or, as ``srun``/``mpirun`` would, as plain processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set (gloo backend).

Usage:
  dist_eval_worker.py DATA_ROOT WORK_DIR [WORK_DIR ...]
      evaluate voc21 under DATA_ROOT with the deterministic colour predictor into each work dir.
  dist_eval_worker.py --fail raise|exit DATA_ROOT WORK_DIR
      first with WORK_DIR locked by another holder (rank 0 is refused, rank 1 must stop too); then
      rank 1 fails at its 2nd image (raises, or dies with os._exit(3)); rank 0 predicts slowly
      (0.3 s per image); both print how many images they predicted.
  dist_eval_worker.py --prefetch COUNTER_FILE [--fail-download]
      resolve CLIP ViT-B/16 + DINO ViT-S/16 weights collectively with a fake downloader that appends the name
      of each model it fetches to COUNTER_FILE (or fails on rank 0); then every rank resolves them
      offline and prints their identities.
An `S2ClipError` is printed as ``rank R error: <message>`` with exit status 2.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_helpers import CONFIG, colour_predict  # noqa: E402

from s2clip_cli.data.datasets import open_dataset  # noqa: E402
from s2clip_cli.distributed import DistContext  # noqa: E402
from s2clip_cli.errors import S2ClipError  # noqa: E402
from s2clip_cli.evaluation.runner import evaluate  # noqa: E402


def run_eval(root: Path, work_dirs: list[Path]) -> None:
    dataset = open_dataset("voc21", root)
    with DistContext.from_env("cpu") as ctx:
        assert ctx.world_size == 2 and ctx.backend == "gloo", (ctx.world_size, ctx.backend)
        for work_dir in work_dirs:
            res = evaluate(dataset, colour_predict, work_dir=work_dir, config=CONFIG, num_workers=1, dist=ctx)
            print(f"rank {ctx.rank} {work_dir.name}: images_this_run={res['timings']['images_this_run']}")


def run_failing(mode: str, root: Path, work_dir: Path) -> None:
    dataset = open_dataset("voc21", root)
    work_dir.mkdir(parents=True, exist_ok=True)
    predicted = 0
    with DistContext.from_env("cpu") as ctx:

        def predict(image: np.ndarray, image_id: str) -> np.ndarray:
            nonlocal predicted
            if ctx.rank == 1 and predicted == 1:
                if mode == "exit":
                    os._exit(3)
                raise RuntimeError(f"rank 1 fails on {image_id} on purpose")
            if ctx.rank == 0:
                time.sleep(0.3)
            predicted += 1
            return colour_predict(image, image_id)

        # First, the work dir is held by another run: rank 0 is refused, and rank 1 stops with it.
        held = os.open(work_dir / ".lock", os.O_RDWR | os.O_CREAT) if ctx.rank == 0 else None
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            evaluate(dataset, predict, work_dir=work_dir, config=CONFIG, num_workers=0, dist=ctx)
        except S2ClipError as exc:
            print(f"rank {ctx.rank} while held: {exc}", flush=True)
        finally:
            if held is not None:
                os.close(held)
        try:
            evaluate(dataset, predict, work_dir=work_dir, config=CONFIG, num_workers=0, dist=ctx,
                     check_every=2)
        finally:
            print(f"rank {ctx.rank} predicted {predicted} of {len(ctx.shard(dataset.sample_ids))}", flush=True)


def run_prefetch(counter: Path, fail: bool) -> None:
    from safetensors.torch import save_file
    from torch import zeros

    from s2clip_cli.models import registry, weights

    def fake_download(spec: weights.ModelSpec) -> Path:
        if fail:
            raise S2ClipError(f"could not download {spec.name} (no network in this test)")
        time.sleep(1.0)  # the other rank must be waiting, not downloading too
        with open(counter, "a") as fh:
            fh.write(f"{os.environ['RANK']} {spec.name}\n")
        target = weights.weights_dir() / spec.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({"w": zeros(3) + len(spec.name)}, str(target))
        return target

    weights.download = fake_download  # type: ignore[assignment]
    # What `factory.prefetch_weights` does for these models (without importing open_clip and timm).
    requests = [(registry.clip_spec("ViT-B/16"), None), (registry.vfm_spec("dino_vits16"), None)]
    with DistContext.from_env("cpu") as ctx:
        weights.resolve_collectively(requests, group=ctx)
        paths = weights.resolve_all(requests, offline=True)
        ids = " ".join(weights.content_identity(p) for p in paths)
        print(f"rank {ctx.rank} identities {ids}", flush=True)


def main() -> None:
    args = sys.argv[1:]
    try:
        if args[0] == "--fail":
            run_failing(args[1], Path(args[2]), Path(args[3]))
        elif args[0] == "--prefetch":
            run_prefetch(Path(args[1]), "--fail-download" in args)
        else:
            run_eval(Path(args[0]), [Path(p) for p in args[1:]])
    except S2ClipError as exc:
        print(f"rank {os.environ.get('RANK')} error: {exc}", flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
