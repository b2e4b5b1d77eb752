"""The evaluation runner: results, resume after interruption, corrupt record tails, signatures,
saved predictions, and a 2-process gloo run equal to the single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import CONFIG, colour_predict
from PIL import Image

from s2clip_cli.data.datasets import open_dataset
from s2clip_cli.data.synthetic import write_synthetic_dataset
from s2clip_cli.distributed import DistContext
from s2clip_cli.errors import S2ClipError
from s2clip_cli.evaluation.metrics import confusion_matrix, summarize
from s2clip_cli.evaluation.records import RecordLog, RunSignature, rank_log_path
from s2clip_cli.evaluation.runner import evaluate

N_IMAGES = 7


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset("voc21", tmp_path_factory.mktemp("data") / "VOC2012", n_images=N_IMAGES,
                                   size=(48, 72), seed=3)


@pytest.fixture(scope="module")
def expected_conf(voc_root: Path) -> np.ndarray:
    ds = open_dataset("voc21", voc_root)
    return sum(confusion_matrix(colour_predict(ds.load_image(i), ds.sample_ids[i]), ds.load_label(i), 21)
               for i in range(len(ds)))


def _records(work_dir: Path) -> list[str]:
    return (rank_log_path(work_dir, 0)).read_text().splitlines()


def _stop_after(k: int):
    calls = {"n": 0}

    def predict(image: np.ndarray, image_id: str) -> np.ndarray:
        if calls["n"] == k:
            raise KeyboardInterrupt
        calls["n"] += 1
        return colour_predict(image, image_id)

    return predict


def test_full_run_writes_results(voc_root: Path, expected_conf: np.ndarray, tmp_path: Path) -> None:
    ds = open_dataset("voc21", voc_root)
    res = evaluate(ds, colour_predict, work_dir=tmp_path / "run", config=CONFIG, num_workers=2, save_preds=True)
    ref = summarize(expected_conf, ds.labels)
    assert 0 < ref["mIoU"] < 100 and res["summary"]["mIoU"] == ref["mIoU"]
    assert res["per_class"]["IoU"] == ref["IoU"] and res["per_class"]["Acc"] == ref["Acc"]
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["summary"] == res["summary"] and on_disk["config"] == CONFIG and on_disk["num_images"] == N_IMAGES
    assert on_disk["timings"]["images_this_run"] == N_IMAGES and on_disk["versions"]["torch"]
    assert set(on_disk["versions"]) >= {"python", "torch", "open_clip", "timm"}
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "confusion.npy"), expected_conf)
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| background |" in md and f"{ref['mIoU']:.2f}" in md and '"model": "colour-lookup"' in md
    assert len(_records(tmp_path / "run")) == 1 + N_IMAGES
    # --save-preds: palette PNGs holding the predictions
    png = Image.open(tmp_path / "run" / "preds" / f"{ds.sample_ids[2]}.png")
    assert png.mode == "P"
    np.testing.assert_array_equal(np.asarray(png), colour_predict(ds.load_image(2), ds.sample_ids[2]))
    assert not list((tmp_path / "run").rglob("*.tmp*"))


def test_resume_after_interrupt_and_corrupt_tail(voc_root: Path, expected_conf: np.ndarray, tmp_path: Path) -> None:
    ds = open_dataset("voc21", voc_root)
    work = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        evaluate(ds, _stop_after(3), work_dir=work, config=CONFIG, num_workers=2)
    assert len(_records(work)) == 1 + 3 and not (work / "results.json").exists()
    # a crash in the middle of the 4th record: half a line at the end of the file
    with open(rank_log_path(work, 0), "ab") as fh:
        fh.write(b'0badc0de {"id":"2008_000003","i":[1,2')
    seen: list[str] = []

    def predict(image: np.ndarray, image_id: str) -> np.ndarray:
        seen.append(image_id)
        return colour_predict(image, image_id)

    res = evaluate(ds, predict, work_dir=work, config=CONFIG, num_workers=2)
    assert seen == ds.sample_ids[3:]  # finished images are skipped, the damaged one is redone
    assert res["timings"]["images_this_run"] == N_IMAGES - 3 and res["timings"]["images_resumed"] == 3
    np.testing.assert_array_equal(np.load(work / "confusion.npy"), expected_conf)
    ref = summarize(expected_conf, ds.labels)
    assert res["summary"] == {key: ref[key] for key in ("mIoU", "mAcc", "aAcc", "num_pixels")}
    lines = _records(work)
    assert len(lines) == 1 + N_IMAGES and all(line[8] == " " for line in lines)
    # a corrupt (checksum-failing) tail after a complete run: ignored, then truncated on the next open
    good = rank_log_path(work, 0).read_bytes()
    with open(rank_log_path(work, 0), "ab") as fh:
        fh.write(b'00000000 {"id":"bogus","i":[0],"c":[99999]}\n')
    res2 = evaluate(ds, predict, work_dir=work, config=CONFIG, num_workers=0)
    assert res2["summary"] == res["summary"] and res2["timings"]["images_this_run"] == 0
    assert rank_log_path(work, 0).read_bytes() == good


def test_limit_then_full_run_extends(voc_root: Path, expected_conf: np.ndarray, tmp_path: Path) -> None:
    ds = open_dataset("voc21", voc_root)
    part = evaluate(ds, colour_predict, work_dir=tmp_path / "w", config=CONFIG, limit=2, num_workers=0)
    assert part["num_images"] == 2 and part["limit"] == 2
    full = evaluate(ds, colour_predict, work_dir=tmp_path / "w", config=CONFIG, num_workers=0)
    assert full["timings"]["images_this_run"] == N_IMAGES - 2
    np.testing.assert_array_equal(np.load(tmp_path / "w" / "confusion.npy"), expected_conf)


def test_other_configuration_is_refused(voc_root: Path, tmp_path: Path) -> None:
    ds = open_dataset("voc21", voc_root)
    evaluate(ds, colour_predict, work_dir=tmp_path / "w", config=CONFIG, limit=1, num_workers=0)
    with pytest.raises(S2ClipError, match="another configuration.*new --work-dir") as info:
        evaluate(ds, colour_predict, work_dir=tmp_path / "w", config=CONFIG | {"short_side": 336}, num_workers=0)
    assert "\n" not in str(info.value)
    voc20 = open_dataset("voc20", voc_root)
    with pytest.raises(S2ClipError, match="dataset voc21, 21 classes"):
        evaluate(voc20, colour_predict, work_dir=tmp_path / "w", config=CONFIG, num_workers=0)


def test_prediction_size_and_decode_errors(voc_root: Path, tmp_path: Path) -> None:
    ds = open_dataset("voc21", voc_root)
    with pytest.raises(S2ClipError, match="prediction is .* label's size"):
        evaluate(ds, lambda img, _id: np.zeros((5, 5), int), work_dir=tmp_path / "a", config=CONFIG, num_workers=0)

    def broken_reader(path: Path) -> np.ndarray:
        raise OSError("truncated file")

    with pytest.raises(S2ClipError, match="2008_000000: OSError: truncated file"):
        evaluate(ds, colour_predict, work_dir=tmp_path / "b", config=CONFIG, num_workers=1, reader=broken_reader)


def test_record_log_roundtrip_and_header(tmp_path: Path) -> None:
    sig = RunSignature.create("x", 3, {"a": 1})
    conf = np.array([[1, 0, 2], [0, 0, 0], [5, 0, 7]])
    path = tmp_path / "r.jsonl"
    with RecordLog(path, sig) as log:
        log.append("a", conf)
        log.append("b", conf * 2)
    log = RecordLog(path, sig, writable=False)
    assert log.done_ids() == {"a", "b"}
    np.testing.assert_array_equal(log.total(), conf * 3)
    np.testing.assert_array_equal(log.total(["b", "zz"]), conf * 2)
    path.write_bytes(b'{"half a header')  # a header cut short: the file starts over
    with RecordLog(path, sig) as log:
        assert log.done_ids() == set()
    assert RecordLog(path, sig, writable=False).done_ids() == set()
    with pytest.raises(S2ClipError, match="another configuration"):
        RecordLog(path, RunSignature.create("x", 3, {"a": 2}))


def test_dist_context_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = DistContext.from_env("cpu")
    assert not ctx.is_distributed and ctx.is_main and ctx.shard([1, 2, 3]) == [1, 2, 3]
    arr = np.arange(4)
    out = ctx.all_reduce_sum(arr)
    assert out.dtype == np.int64 and out is not arr and (out == arr).all()
    ctx.barrier()
    ctx.close()
    assert DistContext(rank=1, world_size=3).shard(list(range(8))) == [1, 4, 7]


def test_two_process_gloo_equals_single_process(voc_root: Path, expected_conf: np.ndarray, tmp_path: Path) -> None:
    ds = open_dataset("voc21", voc_root)
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):  # resumed: 3 images done by a single process first
        evaluate(ds, _stop_after(3), work_dir=resumed, config=CONFIG, num_workers=0)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    worker = Path(__file__).with_name("dist_eval_worker.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), str(voc_root), str(fresh), str(resumed)],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for work, n_run in ((fresh, N_IMAGES), (resumed, N_IMAGES - 3)):
        np.testing.assert_array_equal(np.load(work / "confusion.npy"), expected_conf)
        res = json.loads((work / "results.json").read_text())
        assert res["timings"]["world_size"] == 2 and res["timings"]["images_this_run"] == n_run
        assert res["summary"]["mIoU"] == summarize(expected_conf, ds.labels)["mIoU"]
    assert rank_log_path(fresh, 1).is_file()  # each rank kept its own record file
    assert "rank 1 fresh" in proc.stdout and "rank 0 resumed" in proc.stdout


def test_custom_dataset_run_and_folder_identity(tmp_path: Path) -> None:
    from s2clip_cli.data.synthetic import write_synthetic_generic

    a = write_synthetic_generic(tmp_path / "a", n_images=2, num_classes=4)
    b = write_synthetic_generic(tmp_path / "b", n_images=2, num_classes=4, seed=1)
    ds_a = open_dataset("custom", None, images=a.images, masks=a.masks, class_names=a.class_names)
    ds_b = open_dataset("custom", None, images=b.images, masks=b.masks, class_names=b.class_names)
    res = evaluate(ds_a, lambda img, _id: np.zeros(img.shape[:2], int), work_dir=tmp_path / "w", config={},
                   num_workers=0)
    assert res["num_classes"] == 4 and list(res["per_class"]["IoU"]) == ["sky", "tree", "road", "car"]
    with pytest.raises(S2ClipError, match="another configuration"):  # same stems, other folders
        evaluate(ds_b, lambda img, _id: np.zeros(img.shape[:2], int), work_dir=tmp_path / "w", config={},
                 num_workers=0)


# ------------------------------------------------------------------------------------ hostile work dirs


def _line(obj: dict) -> bytes:
    """A record line with a valid checksum (what a hostile or buggy writer could produce)."""
    payload = json.dumps(obj, separators=(",", ":")).encode()
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


@pytest.mark.parametrize("signature", [["voc21", 21], "x", None, {"dataset": "voc21", "num_classes": "many"}])
def test_a_damaged_header_with_a_valid_checksum_is_one_line(tmp_path: Path, signature: object) -> None:
    sig = RunSignature.create("voc21", 21, {"a": 1})
    path = tmp_path / "records" / "rank-00000.jsonl"
    path.parent.mkdir()
    path.write_bytes(_line({"kind": "s2clip-eval-records", "version": 1, "signature": signature}))
    with pytest.raises(S2ClipError, match="new --work-dir") as info:
        RecordLog(path, sig)
    assert str(path.parent.parent) in str(info.value) or str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_records_with_lying_values_are_treated_as_damaged(voc_root: Path, expected_conf: np.ndarray,
                                                          tmp_path: Path) -> None:
    ds = open_dataset("voc21", voc_root)
    work = tmp_path / "run"
    evaluate(ds, colour_predict, work_dir=work, config=CONFIG, limit=1, num_workers=0)
    first = ds.sample_ids[1]
    with open(rank_log_path(work, 0), "ab") as fh:  # checksums are right, the values are not
        fh.write(_line({"id": first, "i": [0], "c": [1 << 62]}))  # would overflow the sums
    res = evaluate(ds, colour_predict, work_dir=work, config=CONFIG, num_workers=0)
    assert res["timings"]["images_this_run"] == N_IMAGES - 1  # the lying record was redone
    np.testing.assert_array_equal(np.load(work / "confusion.npy"), expected_conf)
    for bogus in ({"id": "x", "i": [0.5], "c": [1]}, {"id": "x", "i": ["0"], "c": [1]}, {"id": "x", "i": [0], "c": [True]}):
        path = tmp_path / f"r{len(bogus)}.jsonl"
        sig = RunSignature.create("voc21", 21, CONFIG)
        with RecordLog(path, sig) as log:
            log.append("good", np.eye(21, dtype=np.int64))
        with open(path, "ab") as fh:
            fh.write(_line(bogus))
        assert RecordLog(path, sig, writable=False).done_ids() == {"good"}


def test_record_files_that_are_not_regular_files_are_refused(voc_root: Path, tmp_path: Path) -> None:
    ds = open_dataset("voc21", voc_root)
    work = tmp_path / "run"
    rank_log_path(work, 0).parent.mkdir(parents=True)
    os.mkfifo(rank_log_path(work, 0))  # reading it would block forever
    with pytest.raises(S2ClipError, match="is not a regular file") as info:
        evaluate(ds, colour_predict, work_dir=work, config=CONFIG, limit=1, num_workers=0)
    assert "rank-00000.jsonl" in str(info.value)
    rank_log_path(work, 0).unlink()
    rank_log_path(work, 0).symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(S2ClipError, match="is not a regular file"):
        evaluate(ds, colour_predict, work_dir=work, config=CONFIG, limit=1, num_workers=0)
    other = tmp_path / "other"
    other.mkdir()
    (other / "records").write_text("not a folder")
    with pytest.raises(S2ClipError, match="records") as info:
        evaluate(ds, colour_predict, work_dir=other, config=CONFIG, limit=1, num_workers=0)
    assert "\n" not in str(info.value) and (other / "records").read_text() == "not a folder"


@pytest.mark.parametrize("name", [".lock", "records", "preds"])
def test_links_planted_in_a_work_dir_are_refused_and_their_targets_untouched(voc_root: Path, tmp_path: Path,
                                                                            name: str) -> None:
    ds = open_dataset("voc21", voc_root)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("precious")
    work = tmp_path / "run"
    work.mkdir()
    (work / name).symlink_to(victim / "notes.txt" if name == ".lock" else victim)
    with pytest.raises(S2ClipError, match=f"holds {name} as a symbolic link") as info:
        evaluate(ds, colour_predict, work_dir=work, config=CONFIG, limit=1, num_workers=0, save_preds=True)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in victim.iterdir()) == ["notes.txt"] and (victim / "notes.txt").read_text() == "precious"


def test_a_class_count_too_large_for_the_confusion_matrix_is_refused_first(voc_root: Path, tmp_path: Path) -> None:
    import dataclasses

    from s2clip_cli.data.datasets import MAX_EVAL_CLASSES

    ds = open_dataset("voc21", voc_root)
    huge = dataclasses.replace(ds, class_names=[[f"c{i}"] for i in range(MAX_EVAL_CLASSES + 1)])
    with pytest.raises(S2ClipError, match=f"{MAX_EVAL_CLASSES + 1} classes; evaluation takes 1 to"):
        evaluate(huge, colour_predict, work_dir=tmp_path / "w", config=CONFIG, num_workers=0)
    assert not (tmp_path / "w").exists()
