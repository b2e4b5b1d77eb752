"""`s2clip serve`'s HTTP API in-process (FastAPI's TestClient) on tiny models: answers equal to
`segment`'s, PNG and JSON, every bad request refused with a one-line 4xx, upload/class/pixel limits,
concurrent requests served one at a time with the sequential answers, /health, /methods."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 's2clip[serve]')")
pytest.importorskip("multipart", reason="the serve extra is not installed (pip install 's2clip[serve]')")
from fastapi.testclient import TestClient  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from s2clip_cli.cli import app as cli_app  # noqa: E402
from s2clip_cli.commands import serve as serve_driver  # noqa: E402
from s2clip_cli.commands.serve import build_app  # noqa: E402
from s2clip_cli.commands.serve_service import RequestError, SegmentService, ServeSettings  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The server and `segment` run the same options: tiny models, one small window per image.
MODEL_OPTIONS = ["--models", "tiny", "--device", "cpu", "--short-side", "112"]
LIMITS = ["--max-upload-mb", "0.25", "--max-classes", "5", "--max-megapixels", "1", "--max-queue", "4"]
runner = CliRunner()


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def settings_from_cli(*args: str) -> ServeSettings:
    """The settings `s2clip serve ARGS` would serve with (run_serve captured instead of run)."""
    captured: dict[str, Any] = {}

    def fake_run_serve(settings: ServeSettings, **kwargs: Any) -> None:
        captured.update(settings=settings, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serve_driver, "run_serve", fake_run_serve)
        result = runner.invoke(cli_app, ["serve", *args])
    assert result.exit_code == 0, result.output
    assert captured["host"] == "127.0.0.1"
    return captured["settings"]


@pytest.fixture(scope="module")
def service() -> Iterator[SegmentService]:
    svc = SegmentService(settings_from_cli(*MODEL_OPTIONS, *LIMITS))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service: SegmentService) -> Iterator[TestClient]:
    with TestClient(build_app(service, page=False)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def photo() -> bytes:
    """The cat example, shrunk (a real photo: the tiny models give it several classes)."""
    with Image.open(EXAMPLES / "cat.jpg") as image:
        small = image.convert("RGB").resize((150, 100))
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    return buf.getvalue()


def post(client: TestClient, image: bytes | None, params: str = "", headers: dict | None = None,
         **fields: str) -> Any:
    files = {"image": ("photo.png", image, "image/png")} if image is not None else None
    return client.post(f"/segment{params}", files=files, data=fields, headers=headers or {})


def decode_labels(record: dict) -> np.ndarray:
    """The label map of a JSON answer, from its RLE masks (pycocotools)."""
    h, w = record["size"]
    labels = np.full((h, w), -1, dtype=np.int64)
    for mask in record["masks"]:
        rle = {"size": mask["rle"]["size"], "counts": mask["rle"]["counts"].encode()}
        binary = mask_utils.decode(rle).astype(bool)
        assert not (labels[binary] >= 0).any(), "masks overlap"
        assert int(binary.sum()) == mask["area"]
        labels[binary] = mask["label"]
    assert (labels >= 0).all(), "masks do not cover the image"
    return labels


def segment_cli_labels(tmp_path: Path, image: bytes, *args: str) -> tuple[np.ndarray, dict]:
    src = tmp_path / "photo.png"
    src.write_bytes(image)
    out = tmp_path / "out"
    result = runner.invoke(cli_app, ["segment", str(src), "-o", str(out), *MODEL_OPTIONS, *args])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "photo.json").read_text())
    return np.array(Image.open(out / "photo_mask.png")).astype(np.int64), record


# ------------------------------------------------------------------------------ answers
@pytest.mark.parametrize("fields, cli_args", [
    ({"classes": "cat,floor; carpet,wall", "no_background": "true"}, ["--no-background"]),
    ({"classes": "cat,sofa", "sam": "false"}, ["--no-sam"]),
])
def test_json_decodes_to_the_labels_segment_writes(client: TestClient, photo: bytes, tmp_path: Path,
                                                   fields: dict, cli_args: list[str]) -> None:
    response = post(client, photo, **fields)
    assert response.status_code == 200, response.text
    record = response.json()
    labels = decode_labels(record)
    expected, cli_record = segment_cli_labels(tmp_path, photo, "--classes", fields["classes"], *cli_args)
    assert labels.shape == expected.shape == (100, 150)
    np.testing.assert_array_equal(labels, expected)
    assert record["classes"] == cli_record["classes"]
    assert record["class_names"] == cli_record["class_names"]
    assert record["pixel_share"] == pytest.approx(cli_record["pixel_share"], abs=1e-6)
    assert record["run"]["sam"] == ("vit_b" if "--no-sam" not in cli_args else None)
    assert "meaningless" in record["warning"]
    assert {"queue", "total"} <= set(record["timings_s"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_request_under_low_precision_matches_segment(client: TestClient, photo: bytes, tmp_path: Path,
                                                     precision: str) -> None:
    """What CUDA users run (fp16/bf16 autocast), on the CPU, SAM on: the answer is segment's."""
    response = post(client, photo, classes="cat,sofa", precision=precision)
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["run"]["precision"] == precision and record["run"]["sam"] == "vit_b"
    expected, _ = segment_cli_labels(tmp_path, photo, "--classes", "cat,sofa", "--precision", precision)
    np.testing.assert_array_equal(decode_labels(record), expected)


def test_no_background_labels_are_not_trivial(client: TestClient, photo: bytes) -> None:
    """(The parity test above means something: the tiny models split this photo.)"""
    record = post(client, photo, classes="cat,floor; carpet,wall", no_background="true").json()
    assert sum(share > 0 for share in record["pixel_share"].values()) >= 2


def test_png_answer_is_the_mask_png(client: TestClient, photo: bytes) -> None:
    fields = {"classes": "cat,wall", "no_background": "true", "sam": "false"}
    as_json = decode_labels(post(client, photo, **fields).json())
    for params, headers in [("?format=png", None), ("", {"Accept": "image/png"})]:
        response = post(client, photo, params, headers, **fields)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert json.loads(response.headers["x-s2clip-classes"]) == ["cat", "wall"]
        mask = Image.open(io.BytesIO(response.content))
        assert mask.mode == "P"
        np.testing.assert_array_equal(np.array(mask), as_json)
    response = post(client, photo, "", {"Accept": "application/json, image/png"}, **fields)
    assert response.headers["content-type"].startswith("application/json")


def test_health_and_methods(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == "tiny" and health["device"] == "cpu"
    assert health["methods"] == ["s2clip"] and health["sam"] is True and health["sd"] is False
    assert health["max_classes"] == 5 and health["max_upload_mb"] == 0.25
    methods = client.get("/methods").json()
    assert methods["default"] == "s2clip"
    assert [m["name"] for m in methods["methods"]] == ["s2clip"]
    assert methods["methods"][0]["vfm"] == "dino_vitb8" and methods["methods"][0]["sam_default"] is True


# ------------------------------------------------------------------------------ refusals
GOOD = png_bytes(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("image, fields, status, words", [
    (None, {"classes": "cat"}, 400, "no image"),
    (b"not an image at all", {"classes": "cat"}, 400, "not a supported image"),
    (GOOD[: len(GOOD) // 2], {"classes": "cat"}, 400, "not a supported image"),
    (b"", {"classes": "cat"}, 400, "empty"),
    (GOOD, {}, 400, "no classes"),
    (GOOD, {"classes": " "}, 400, "no classes"),
    (GOOD, {"classes": "cat,,dog"}, 400, "empty class name"),
    (GOOD, {"classes": "cat,Cat"}, 400, "duplicate class name"),
    (GOOD, {"classes": "a,b,c,d,e,f"}, 400, "too many classes: 6 (this server takes at most 5)"),
    (GOOD, {"classes": "@/etc/passwd"}, 400, "not @file"),
    (GOOD, {"classes": "x" * 101}, 400, "longer than 100"),
    (GOOD, {"classes": "cat", "method": "nope"}, 400, "unknown method 'nope'"),
    (GOOD, {"classes": "cat", "method": "clearclip"}, 400, "not loaded by this server"),
    (GOOD, {"classes": "cat", "precision": "fp8"}, 400, "unknown precision"),
    (GOOD, {"classes": "cat", "sam": "maybe"}, 400, "sam must be true or false"),
    (GOOD, {"classes": "cat", "sd": "true"}, 400, "no SD model"),
    (GOOD, {"classes": "cat", "background": ";"}, 400, "background is empty"),
    (GOOD, {"classes": "cat", "colour": "red"}, 400, "unknown field 'colour'"),
])
def test_bad_requests_get_one_line_4xx(client: TestClient, image: bytes | None, fields: dict, status: int,
                                       words: str) -> None:
    response = post(client, image, **fields)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and words in body["error"], body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    assert "/tmp" not in body["error"]  # the server's temporary paths stay private


def test_an_undecodable_image_is_named_once() -> None:
    """read_image names the file it could not read; the upload is "image", said once."""
    from s2clip_cli.commands.serve_service import decode_image

    with pytest.raises(RequestError) as refused:
        decode_image(GOOD[: len(GOOD) // 2], "photo.png", 10**6)  # a header, then the pixels cut short
    message = str(refused.value)
    assert message.startswith("image: not a supported image (") and "image image" not in message, message
    assert "/" not in message and "upload" not in message, message


@pytest.mark.parametrize("share, text", [(0.0, "0%"), (0.00001, "<0.1%"), (0.0004, "<0.1%"), (0.002, "0.2%"),
                                         (0.4123, "41.2%"), (1.0, "100.0%")])
def test_shares_are_shown_to_a_tenth_of_a_percent(share: float, text: str) -> None:
    from s2clip_cli.commands.serve_service import format_share

    assert format_share(share) == text


def test_the_page_shares_table_escapes_class_names(service: SegmentService) -> None:
    pytest.importorskip("gradio")
    from s2clip_cli.commands.serve_page import shares_html, status_html
    from s2clip_cli.commands.serve_service import SegmentOutcome

    labels = np.zeros((10, 100), dtype=np.int64)
    labels[0, :2] = 1  # 0.2 % of the pixels
    outcome = SegmentOutcome(image=np.zeros((10, 100, 3), np.uint8), labels=labels,
                             classes=["background", "<img src=x onerror=alert(1)>"], class_names=[["a"], ["b"]],
                             has_background=True, run={}, timings={}, random_models=True)
    table = shares_html(outcome)
    assert "<img" not in table and "&lt;img src=x onerror=alert(1)&gt;" in table
    assert ">99.8%<" in table and ">0.2%<" in table
    assert table.index("background") < table.index("&lt;img")  # largest first
    assert status_html("class '<b>'", error=True) == '<p class="s2clip-error">error: class &#x27;&lt;b&gt;&#x27;</p>'


def test_page_downloads_go_after_their_age_and_at_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gradio")
    import tempfile

    from s2clip_cli.commands import serve_page

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    downloads = serve_page.Downloads(keep_s=0.3)
    first = downloads.new_folder()
    (first / "cat_mask.png").write_bytes(b"x")
    downloads.prune()
    assert first.is_dir()  # younger than keep_s
    time.sleep(0.5)
    downloads.prune()
    assert not first.exists()
    monkeypatch.setattr(serve_page, "KEEP_DOWNLOADS", 2)
    folders = [downloads.new_folder() for _ in range(3)]
    assert [f.exists() for f in folders] == [False, True, True]
    downloads.close()
    assert list(tmp_path.iterdir()) == []


def test_bad_format_and_not_multipart(client: TestClient) -> None:
    response = post(client, GOOD, "?format=tiff", classes="cat")
    assert response.status_code == 400 and "unknown format" in response.json()["error"]
    response = client.post("/segment", content=b'{"classes": "cat"}', headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "no image" in response.json()["error"]
    response = client.post("/segment", content=b"--xyz\r\ngarbage", headers={
        "Content-Type": "multipart/form-data; boundary=xyz"})
    assert response.status_code == 400 and set(response.json()) == {"error"}
    assert client.get("/segment").status_code == 405 and "error" in client.get("/segment").json()
    assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()


def test_oversized_upload_refused_from_its_length(client: TestClient, service: SegmentService) -> None:
    big = b"\0" * (service.limits.max_upload_bytes + 200_000)
    response = client.post("/segment", files={"image": ("big.png", big, "image/png")}, data={"classes": "cat"})
    assert response.status_code == 413, response.text
    assert response.json() == {"error": "upload too large: at most 0.25 MB"}


def test_oversized_streamed_upload_is_cut_off(client: TestClient, service: SegmentService) -> None:
    """No Content-Length (chunked): the body is counted as it arrives and refused once past the
    limit, without reading the rest. (Driven as ASGI: the test client buffers whole bodies.)"""
    import asyncio

    app = client.app
    chunk = 65536
    pulled = []

    async def receive() -> dict:
        pulled.append(1)
        if len(pulled) == 1:
            head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
            return {"type": "http.request", "body": head, "more_body": True}
        return {"type": "http.request", "body": b"\0" * chunk, "more_body": len(pulled) < 100}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/segment", "raw_path": b"/segment", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b"), (b"host", b"testserver")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert json.loads(sent[1]["body"]) == {"error": "upload too large: at most 0.25 MB"}
    assert len(pulled) <= 2 + (service.limits.max_upload_bytes + 64 * 2**10) // chunk  # not the whole 6.4 MB


def test_too_many_pixels_refused_before_decoding(client: TestClient) -> None:
    huge = png_bytes(np.zeros((1100, 1000), dtype=np.uint8))  # 1.1 MP of zeros: a few KB
    response = post(client, huge, classes="cat")
    assert response.status_code == 413
    assert response.json()["error"] == "image: 1000x1100 is too large (at most 1 megapixels)"


def test_full_queue_answers_503(client: TestClient, service: SegmentService) -> None:
    release = threading.Event()
    blockers = [service._submit(release.wait, 30) for _ in range(service.limits.max_queue)]
    try:
        response = post(client, GOOD, classes="cat")
        assert response.status_code == 503 and "server busy" in response.json()["error"]
        assert client.get("/health").json()["queued"] == service.limits.max_queue
    finally:
        release.set()
        for blocker in blockers:
            blocker.result(timeout=30)
    assert client.get("/health").json()["queued"] == 0


# ------------------------------------------------------------------------------ concurrency
def test_concurrent_requests_equal_sequential_and_never_share_the_model(
        client: TestClient, service: SegmentService, photo: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    from s2clip_cli.pipeline.segmenter import Segmenter

    images = [photo, png_bytes(np.asarray(Image.open(io.BytesIO(photo)))[::-1].copy())]
    jobs = [(images[i % 2], {"classes": classes, "sam": "false", "no_background": "true"})
            for i, classes in enumerate(["cat,wall", "dog,grass; lawn", "cat,wall", "sky,tree,road"])]
    sequential = [post(client, image, **fields).json() for image, fields in jobs]

    active, most = [0], [0]
    lock = threading.Lock()
    original = Segmenter.__call__

    def counting_call(self: Segmenter, *args: Any, **kwargs: Any) -> Any:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return original(self, *args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(Segmenter, "__call__", counting_call)
    answers: list[Any] = [None] * len(jobs)

    def worker(i: int) -> None:
        answers[i] = post(client, jobs[i][0], **jobs[i][1])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(not t.is_alive() for t in threads)
    assert most[0] == 1  # the model was never used by two requests at once
    for answer, expected in zip(answers, sequential, strict=True):
        assert answer.status_code == 200, answer.text
        record = answer.json()
        assert record["classes"] == expected["classes"]
        assert record["masks"] == expected["masks"] and record["pixel_share"] == expected["pixel_share"]


# ------------------------------------------------------------------------------ the command
def test_serve_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    result = runner.invoke(cli_app, ["serve", "--models", "tiny"])
    assert result.exit_code == 2
    assert "pip install 's2clip[serve]'" in result.stderr and "gradio" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_options_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(cli_app, ["serve", "--methods", "s2clip,nope", "--models", "tiny"])
    assert result.exit_code != 0 and "unknown method 'nope'" in result.stderr
    settings = settings_from_cli("--models", "tiny", "--methods", "clearclip,s2clip", "--method", "s2clip")
    assert settings.methods == ["s2clip", "clearclip"]
    assert settings.sam_name == "vit_b"
    assert settings_from_cli("--models", "tiny", "--no-sam").sam_name is None


def test_port_in_use_is_one_line() -> None:
    import socket

    from s2clip_cli.errors import S2ClipError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(S2ClipError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve_driver.check_port("127.0.0.1", port)


def test_help_imports_no_web_framework() -> None:
    code = ("import sys; from typer.testing import CliRunner; from s2clip_cli.cli import app; "
            "r = CliRunner().invoke(app, ['serve', '--help']); assert r.exit_code == 0, r.output; "
            "assert '--max-upload-mb' in r.output and \"pip install 's2clip[serve]'\" in r.output, r.output; "
            "print(sorted(m for m in ('fastapi', 'gradio', 'uvicorn', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_only_serve_modules_import_the_web_frameworks() -> None:
    package = Path(__file__).resolve().parents[1] / "src" / "s2clip_cli"
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if any(f"import {m}" in text or f"from {m}" in text for m in ("fastapi", "gradio", "uvicorn", "starlette")):
            assert path.name.startswith("serve") and path.parent.name == "commands", path


def test_request_error_carries_its_status() -> None:
    assert RequestError("x", 413).status == 413 and RequestError("a\nb").args[0] == "a b"


def test_page_is_mounted_beside_the_api(service: SegmentService, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gradio")
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with TestClient(build_app(service, page=True)) as page_client:
        page = page_client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert page_client.get("/health").json()["status"] == "ok"
        assert page_client.post("/segment", data={"classes": "cat"}).status_code == 400
        assert [p.name.split("-")[:2] for p in tmp_path.iterdir()] == [["s2clip", "page"]]
    assert not any(p.name.startswith("s2clip") for p in tmp_path.iterdir())  # the downloads go with the app
    # Gradio writes a .pyi stub beside a module that subclasses one of its components: the page has none.
    assert not list(Path(serve_driver.__file__).parent.glob("*.pyi"))
