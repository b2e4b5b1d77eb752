"""`segment` on several ranks (issue 23): the shares and the merge of the run-level export files in
process (fast), and end to end with two CPU ranks over gloo (slow: `tests/conftest.py` SLOW_TESTS) —
two ranks write exactly what one writes, a rerun with another number of ranks skips what is done
and rebuilds the same files, a killed rank stops the other within seconds and one rank finishes."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from segment_helpers import save_image
from test_segment_inputs import write_video

from s2clip_cli.commands.segment_ranks import split_inputs
from s2clip_cli.distributed import DistContext, cuda_index
from s2clip_cli.errors import S2ClipError
from s2clip_cli.io.export import ExportSession, RunRecord
from s2clip_cli.io.sources import Source

WORKER = Path(__file__).with_name("dist_segment_worker.py")
RUN_FORMATS = ["coco", "polygons", "masks", "yolo", "labelstudio", "cvat"]
CLASSES = ["background", "cat", "dog", "tree"]
TINY = ["--models", "tiny", "--device", "cpu", "--no-sam", "--short-side", "64"]


# ------------------------------------------------------------------------------------ in process (fast)


def _sources(count: int) -> list[Source]:
    return [Source(Path(f"in/{k:02d}.png"), f"{k:02d}", "image", False) for k in range(count)]


def test_shares_are_strided_and_cover_every_input_once() -> None:
    todo, skipped = _sources(7), _sources(3)
    for world in (1, 2, 3, 4):
        shares = [split_inputs(todo, skipped, rank, world) for rank in range(world)]
        assert sorted(s.name for share in shares for s in share.todo) == [s.name for s in todo]
        assert sorted(s.name for share in shares for s in share.skipped) == [s.name for s in skipped]
        assert [s.name for s in shares[0].todo] == [s.name for s in todo[::world]]  # eval's rule: items[rank::world]
    assert [s.name for s in split_inputs(todo, skipped, 1, 3).todo] == ["01", "04"]
    with pytest.raises(ValueError, match="outside"):
        split_inputs(todo, skipped, 2, 2)


def _labels(seed: int, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((rows // (5 + seed % 3) + cols // (7 + seed % 4) + seed) % len(CLASSES)).astype(np.int64)


def _run_files(session: ExportSession) -> dict[str, bytes]:
    return {key: path.read_bytes() for key, path in session.finish().items()}


def test_ranks_run_records_merge_into_the_files_one_process_writes(tmp_path: Path) -> None:
    """Each rank's session keeps its share (written or skipped images); rank 0's takes the others'
    records (pickled, as they travel) and writes coco.json, cvat.xml, labelstudio.json and
    yolo/data.yaml byte for byte as one session holding every image."""
    names = ["street.png", "trip/street.png", "a.png", "trip/day2/c.jpg", "b.png", "z/y.png", "trip.png"]
    images = {name: _labels(k, (20 + k, 30 - k)) for k, name in enumerate(names)}
    out = tmp_path / "out"

    def session() -> ExportSession:
        return ExportSession(out, RUN_FORMATS, CLASSES, True, polygon_tolerance=0)

    one = session()
    for k, name in enumerate(names):
        (one.write_image if k % 3 else one.add_existing)(Path("in") / name, name, images[name])
    one.write_image(Path("in/gone.png"), "gone.png", _labels(9, (8, 8)))
    one.discard("gone.png")  # a set that failed: left out of the run-level files
    expected = _run_files(one)
    for path in out.iterdir():  # the merged run writes into the same folder (data.yaml names it)
        if path.is_file():
            path.unlink()

    world = 3
    ranks = [session() for _ in range(world)]
    for k, name in enumerate(names):
        rank = ranks[k % world]  # the strided shares
        (rank.write_image if k % 3 else rank.add_existing)(Path("in") / name, name, images[name])
    ranks[1].write_image(Path("in/gone.png"), "gone.png", _labels(9, (8, 8)))
    ranks[1].discard("gone.png")
    travelled = [pickle.loads(pickle.dumps(rank.run_records())) for rank in ranks[1:]]
    assert {r.name for records in travelled for r in records} == set(names[1::3] + names[2::3])
    assert all(set(r.payloads) == {"coco", "labelstudio", "cvat"} for records in travelled for r in records)
    chunks: list[list[RunRecord]] = []
    DistContext().gather_to_main([r for records in travelled for r in records], chunks.append, chunk=3)
    assert [len(c) for c in chunks] == [3, 1]  # one process: its own items, in chunks
    for chunk in chunks:
        for record in chunk:
            ranks[0].add_record(record)
    assert _run_files(ranks[0]) == expected


def test_a_record_from_another_kind_of_session_is_refused(tmp_path: Path) -> None:
    coco_only = ExportSession(tmp_path, ["coco"], CLASSES, True)
    coco_only.write_image(Path("a.png"), "a.png", _labels(1, (10, 10)))
    record = coco_only.run_records()[0]
    every = ExportSession(tmp_path, RUN_FORMATS, CLASSES, True)
    with pytest.raises(ValueError, match=r"holds \['coco'\], this session keeps \['coco', 'cvat', 'labelstudio'\]"):
        every.add_record(record)
    with pytest.raises(S2ClipError, match="not a relative path inside the output folder"):
        coco_only.add_record(RunRecord("x", "../x.png", 10, 10, record.payloads))


def test_run_files_are_written_an_item_a_line_as_json_writes_them(tmp_path: Path) -> None:
    """coco.json (an image, an annotation a line) and labelstudio.json (a task a line) are streamed
    with json's C encoder: the same values, and fully expanded the same text as ``json.dumps``."""
    from s2clip_cli.io.export._common import ClassTable
    from s2clip_cli.io.export.labelstudio import brush_encoder, brush_results, encode_results, tasks_document
    from s2clip_cli.io.files import JsonText, json_text, write_json_items

    document = {"images": [{"id": 1, "file_name": "é/a.png"}, {"id": 2}], "info": {"v": 1.5, "x": None},
                "empty": [], "nested": [[1, [2, 3]], {"k": {}}]}
    for depth in range(5):
        path = write_json_items(tmp_path / f"d{depth}.json", document, depth)
        assert json.loads(path.read_text(encoding="utf-8")) == document
    assert path.read_text(encoding="utf-8") == json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    lines = (tmp_path / "d2.json").read_text(encoding="utf-8").splitlines()
    assert lines[:4] == ["{", '  "images": [', '    {"id": 1, "file_name": "é/a.png"},', '    {"id": 2}']
    assert write_json_items(tmp_path / "t.json", [JsonText('{"a": 1}')], 1).read_text() == '[\n  {"a": 1}\n]\n'
    with pytest.raises(ValueError):
        write_json_items(tmp_path / "nan.json", {"a": [float("nan")]}, 1)
    assert not (tmp_path / "nan.json").exists() and not list(tmp_path.glob(".*"))

    classes = ClassTable(tuple(CLASSES), True)
    results = brush_results(_labels(3, (20, 30)), classes, brush_encoder())
    line = tasks_document({"trip/a.png": encode_results(results), "b.png": []})[1]
    expected = {"data": {"image": "trip/a.png"},
                "predictions": [{"model_version": "s2clip", "result": [r | {"id": f"i1{r['id']}"} for r in results]}]}
    assert line == json_text(expected) and len(results) == 3


def test_each_rank_takes_its_own_gpu() -> None:
    assert [cuda_index(r, 4) for r in range(4)] == [0, 1, 2, 3]  # torchrun: every process sees every GPU
    assert cuda_index(3, 1) == 0  # the launcher shows each process its own GPU (srun --gpus-per-task=1)
    with pytest.raises(S2ClipError, match="LOCAL_RANK=4 but this process sees 2 CUDA devices"):
        cuda_index(4, 2)


# ------------------------------------------------------------------------------------ two CPU ranks (slow)


def _tree(root: Path) -> None:
    """Images with one file name in two folders, a video, and a file that is no image."""
    save_image(root / "street.png", (40, 50), seed=1)
    save_image(root / "trip" / "street.png", (36, 44), seed=2)
    for k in range(4):
        save_image(root / f"im{k}.png", (30 + 2 * k, 40), seed=10 + k)
    write_video(root / "trip" / "clip.mp4", 3)
    (root / "broken.png").write_bytes(b"not a png at all")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def _worker(args: list[str], ranks: int, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """The worker on ``ranks`` processes: under torchrun for several, alone for one."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    return subprocess.run([*launch, str(WORKER), *args], capture_output=True, text=True, timeout=timeout,
                          env=_env())


def _snapshot(out: Path) -> dict[str, object]:
    """Every file under ``out`` (hidden ones aside: a killed writer's temporary file): its bytes, or
    for a JSON record its content without the timings."""
    files: dict[str, object] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")):
        key = path.relative_to(out).as_posix()
        if path.suffix == ".json":
            document = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(document, dict):
                document.pop("timings_s", None)
            files[key] = document
        else:
            files[key] = path.read_bytes()
    return files


def _kill_running(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_two_ranks_write_exactly_what_one_writes(tmp_path: Path) -> None:
    photos, out = tmp_path / "photos", tmp_path / "out"
    _tree(photos)
    args = ["--ramp", "segment", str(photos), "-r", "--classes", "cat,dog,tree", "--format",
            "png," + ",".join(RUN_FORMATS), "--polygon-tolerance", "0", "-o", str(out), *TINY]
    one = _worker(args, 1)
    assert one.returncode == 1, one.stderr[-3000:]  # broken.png
    assert "done 7, skipped 0, failed 1" in one.stderr
    reference = _snapshot(out)
    out.rename(tmp_path / "one")  # the two-rank run writes into the same folder (records name it)

    two = _worker(args, 2)
    assert two.returncode != 0, two.stderr[-3000:]  # each rank exits 1: one input failed
    assert "done 7, skipped 0, failed 1 on 2 ranks" in two.stderr, two.stderr[-3000:]
    assert two.stderr.count("done 7") == 1  # rank 0 alone sums up
    assert len([e for e in _errors(two.stderr) if "broken.png" in e]) == 1  # the rank that had it reports it
    assert two.stdout == ""  # no per-image lines under several ranks
    merged = _snapshot(out)
    assert not list(out.rglob(".*"))  # no temporary file, no hidden folder of parts
    assert sorted(merged) == sorted(reference)
    for key in reference:
        assert merged[key] == reference[key], key
    for name in ("coco.json", "cvat.xml", "labelstudio.json", "yolo/data.yaml"):  # byte for byte
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    coco = json.loads((out / "coco.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == ["im0.png", "im1.png", "im2.png", "im3.png", "street.png",
                                                        "trip/street.png"]
    assert len(coco["annotations"]) > 12

    # A rerun on two ranks: everything done is skipped, and the run files are rebuilt the same
    again = _worker(args, 2)
    assert "done 0, skipped 7 (outputs exist; --overwrite redoes them), failed 1 on 2 ranks" in again.stderr, \
        again.stderr[-3000:]
    assert _snapshot(out) == merged


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_killed_rank_stops_the_other_and_one_rank_finishes_the_run(tmp_path: Path) -> None:
    photos, out = tmp_path / "photos", tmp_path / "out"
    for k in range(12):
        save_image(photos / f"im{k:02d}.png", (32, 40), seed=k)
    args = ["--ramp", "segment", str(photos), "--classes", "cat,dog,tree", "--format", "png,coco,cvat,labelstudio,yolo",
            "-o", str(out), *TINY]
    reference = _worker(args, 1)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _snapshot(out)
    out.rename(tmp_path / "uninterrupted")

    # Two ranks as srun or mpirun starts them (no torchrun agent to stop the survivor): rank 1 is
    # killed once it has written a set; rank 0 must notice and stop by itself.
    env = _env() | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--delay", "0.4", *args], env=env | {
        "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True) for r in range(2)]
    try:
        deadline = time.monotonic() + 300
        while not (out / "im01.json").exists():  # rank 1's first image (its share: im01, im03, ...)
            assert time.monotonic() < deadline and procs[1].poll() is None, procs[1].communicate()[1][-3000:]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err0 = procs[0].communicate(timeout=60)
        stopped_after = time.monotonic() - killed
    finally:
        _kill_running(procs)
    assert procs[0].returncode == 2 and procs[1].returncode == -signal.SIGKILL, err0[-3000:]
    assert stopped_after < 10, (stopped_after, err0[-3000:])
    errors = _errors(err0)
    assert len(errors) == 1 and errors[0].startswith(f"error: lost contact with rank 1 (pid {procs[1].pid})"), err0
    assert "Traceback" not in err0
    finished = sorted(p.stem for p in out.glob("*.json"))
    assert 2 <= len(finished) < 12 and not (out / "coco.json").exists()
    # the survivor leaves no temporary file (a SIGKILLed writer cannot clean up: its pid names its own)
    assert not [p for p in out.rglob(".*") if f"-{procs[1].pid}-" not in p.name], list(out.rglob(".*"))

    # One rank finishes the rest; the run files equal the uninterrupted run's
    rerun = _worker(args, 1)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"done {12 - len(finished)}, skipped {len(finished)}" in rerun.stderr
    assert _snapshot(out) == expected



def test_a_rank_that_fails_stops_the_other_within_seconds(tmp_path: Path) -> None:
    """Rank 1 fails as a process (interrupted at its 2nd image, not an input's error): rank 0, busy
    with its own images, stops within seconds, naming rank 1 and how to continue."""
    photos = tmp_path / "photos"
    for k in range(16):
        save_image(photos / f"im{k:02d}.png", (32, 40), seed=k)
    env = _env() | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    args = ["--delay", "0.4", "--interrupt-at", "2", "segment", str(photos), "--classes", "cat,dog", "-o",
            str(tmp_path / "out"), *TINY]
    procs = [subprocess.Popen([sys.executable, str(WORKER), *args], env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r in range(2)]
    try:
        err1 = procs[1].communicate(timeout=300)[1]
        failed = time.monotonic()
        err0 = procs[0].communicate(timeout=60)[1]
        stopped_after = time.monotonic() - failed
    finally:
        _kill_running(procs)
    assert procs[1].returncode != 0 and _errors(err1) == [
        "error: interrupted; done 1, skipped 0, failed 0; rerun the same command to continue (finished inputs are "
        "skipped)"], err1[-3000:]
    assert procs[0].returncode == 2 and stopped_after < 10, (stopped_after, err0[-3000:])
    assert _errors(err0) == ["error: stopped because rank 1 failed (its error is in its own output); finished inputs "
                             "are kept: rerun the same command (with any number of ranks) to continue"], err0
    done0 = [p for p in (tmp_path / "out").glob("*.json") if int(p.stem[2:]) % 2 == 0]  # rank 0's: im00, im02, ...
    assert len(done0) < 8, done0  # it stopped before the end of its share
