"""The web page of `s2clip serve` (Gradio): upload an image, type classes, choose method, SAM, SD,
background and precision; see the overlay with its legend and the pixel share of each class;
download the mask PNG and a COCO JSON. It runs through the same `SegmentService` (and its single
worker) as the HTTP API, and checks the upload itself (`decode_image`): a bad file is s2clip's one
line in the status, never Gradio's message with the server's paths. Needs the ``serve`` extra.
"""

from __future__ import annotations

import html
import json
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from ..config import PRECISIONS
from ..errors import S2ClipError, one_line
from ..io.files import atomic_write_bytes, atomic_write_text
from ..io.outputs import render_overlay
from .serve_service import (
    RequestError,
    SegmentOutcome,
    SegmentService,
    coco_document,
    decode_image,
    format_share,
    mask_png,
)

KEEP_DOWNLOADS = 32  # result folders kept for download (the oldest is removed first)

CSS = """
#s2clip-header h1 { margin-bottom: 0.1em; }
#s2clip-header p { margin-top: 0; opacity: 0.8; }
#s2clip-run { min-height: 44px; }
#s2clip-status { min-height: 1.5em; }
#s2clip-status .s2clip-error { color: #c62828; font-weight: 600; }
.s2clip-shares { width: 100%; border-collapse: collapse; border: none !important; margin: 0 !important; }
.s2clip-shares tr, .s2clip-shares td { border: none !important; background: none !important; }
.s2clip-shares td { padding: 2px 6px !important; }
.s2clip-shares .swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em;
                         vertical-align: -0.1em; border: 1px solid #8888; }
.s2clip-shares .bar { width: 55%; }
.s2clip-shares .bar div { height: 0.7em; background: var(--color-accent, #f97316); border-radius: 2px; }
.s2clip-shares .share { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
"""

INTRO = """# s2clip
Training-free open-vocabulary segmentation (CLIP + DINO + SAM). Upload an image, name the classes
(comma-separated; synonyms with `;`, e.g. `cat, floor; carpet, wall`) and press **Segment**.
The same models answer `POST /segment` (see `GET /health`, `GET /methods`)."""


class Downloads:
    """One folder per result for the page's download files: removed once older than `keep_s`
    (`prune`: on every new result, and every `prune_every_s` by the server) or past
    `KEEP_DOWNLOADS`, and all of them at `close`."""

    def __init__(self, keep_s: float) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="s2clip-page-"))
        self.keep_s = keep_s
        self.folders: list[tuple[float, Path]] = []  # (created, folder), oldest first
        self._lock = threading.Lock()  # Gradio runs the page's function on its own threads

    @property
    def prune_every_s(self) -> float:
        return min(60.0, max(1.0, self.keep_s / 2))

    def new_folder(self) -> Path:
        self.prune()
        folder = self.root / secrets.token_hex(8)
        folder.mkdir()
        with self._lock:
            self.folders.append((time.monotonic(), folder))
            old = self.folders[:-KEEP_DOWNLOADS]
            del self.folders[:-KEEP_DOWNLOADS]
        for _, path in old:
            shutil.rmtree(path, ignore_errors=True)
        return folder

    def prune(self) -> None:
        """Remove the folders older than `keep_s`."""
        cutoff = time.monotonic() - self.keep_s
        with self._lock:
            old = [path for created, path in self.folders if created <= cutoff]
            self.folders = [(created, path) for created, path in self.folders if created > cutoff]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self.folders.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def uploaded_image(**options: Any) -> gr.Image:
    """A `gr.Image` (type ``filepath``) that hands the uploaded file on unopened: Gradio's own
    decoding would answer a bad file with its message, the server's upload path and a Python
    exception name; the page's function checks it with `decode_image` instead. (Its `preprocess` is
    replaced on the instance: a subclass of a Gradio component makes Gradio write a .pyi stub beside
    this module.)"""
    image = gr.Image(type="filepath", **options)

    def upload_path(payload: Any) -> str | None:
        if payload is None:
            return None
        if getattr(payload, "path", None):
            return str(payload.path)
        raise gr.Error("image: upload an image file", print_exception=False)

    image.preprocess = upload_path  # type: ignore[method-assign]
    return image


def shares_html(outcome: SegmentOutcome) -> str:
    """The classes present, largest first, each with its overlay colour, a bar and its share
    ("41.2%", "0.2%", "<0.1%": never a present class shown as 0%)."""
    counts = np.bincount(outcome.labels.ravel(), minlength=len(outcome.classes))
    total = max(1, outcome.labels.size)
    rows = []
    for index in sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i)):
        share = counts[index] / total
        colour = "#" + "".join(f"{int(c):02x}" for c in outcome.palette[index])
        rows.append(f'<tr><td><span class="swatch" style="background:{colour}"></span>'
                    f"{html.escape(outcome.classes[index])}</td>"
                    f'<td class="bar"><div style="width:{100 * share:.2f}%"></div></td>'
                    f'<td class="share">{format_share(share)}</td></tr>')
    return f'<table class="s2clip-shares">{"".join(rows)}</table>'


def status_html(text: str, *, error: bool = False) -> str:
    """The status line (escaped: it may quote the user's class names)."""
    if error:
        return f'<p class="s2clip-error">error: {html.escape(text)}</p>'
    return f"<p>{html.escape(text)}</p>"


def _stem(path: str) -> str:
    stem = Path(path).stem
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60]
    return safe or "image"


def build_page(service: SegmentService, downloads: Downloads) -> gr.Blocks:
    """The Gradio page, bound to `service`; its result files go to `downloads`."""
    info = {row["name"]: row for row in service.method_info()}
    base = service.settings.base
    nothing = (None, "", None, None)  # overlay, shares, mask file, COCO file: cleared

    def run(image_path: str | None, classes: str, method: str, sam: bool, sd: bool, background: bool,
            precision: str) -> tuple[Any, str, str | None, str | None, str]:
        try:
            if not image_path:
                raise RequestError("upload an image first")
            fields = {"classes": classes, "method": method, "precision": precision,
                      "sam": str(bool(sam)) if service.sam_loaded else None, "sd": str(bool(sd)),
                      "no_background": str(not background)}
            request = service.parse_request(fields)
            path = Path(image_path)
            if not path.is_file():
                raise RequestError("image: the upload is gone; upload it again")
            if path.stat().st_size > service.limits.max_upload_bytes:
                raise RequestError(f"image: over {service.limits.max_upload_bytes / 2**20:g} MB")
            image = decode_image(path.read_bytes(), path.name, service.limits.max_pixels)
            outcome = service.segment(image, request)
        except S2ClipError as exc:  # RequestError included: s2clip's one line, the last run's results cleared
            return (*nothing, status_html(one_line(exc), error=True))
        overlay = render_overlay(outcome.image, outcome.labels, outcome.classes, outcome.palette)
        folder = downloads.new_folder()
        stem = _stem(image_path)
        mask_path = atomic_write_bytes(folder / f"{stem}_mask.png", mask_png(outcome))
        coco_path = atomic_write_text(folder / f"{stem}_coco.json",
                                      json.dumps(coco_document(outcome, path.name), indent=1))
        h, w = outcome.labels.shape
        status = (f"{w}×{h} px · {outcome.run['method']} · SAM {'on' if outcome.run['sam'] else 'off'} · "
                  f"SD {'on' if outcome.run['sd'] else 'off'} · {outcome.run['precision']} · "
                  f"{outcome.timings.get('total', 0.0):.2f} s")
        if outcome.random_models:
            status += " · random weights (--models " + outcome.run["models"] + "): outputs are meaningless"
        return overlay, shares_html(outcome), str(mask_path), str(coco_path), status_html(status)

    def clear() -> tuple[Any, str, str | None, str | None, str]:
        return (*nothing, "")

    def method_changed(method: str) -> Any:
        return gr.update(value=bool(info[method]["sam_default"]) and service.sam_loaded)

    # Gradio's copies of uploads and results (in its cache folder) go after the same age as ours.
    keep = max(1, round(downloads.keep_s))
    with gr.Blocks(title="s2clip", delete_cache=(max(1, round(downloads.prune_every_s)), keep),
                   analytics_enabled=False) as page:
        gr.Markdown(INTRO, elem_id="s2clip-header")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                image = uploaded_image(image_mode=None, label="Image", sources=["upload", "clipboard"], height=360,
                                       elem_id="s2clip-image")
                classes = gr.Textbox(label="Classes", placeholder="cat, floor; carpet, wall", max_lines=3,
                                     elem_id="s2clip-classes")
                with gr.Row():
                    method = gr.Dropdown(list(service.settings.methods), value=service.default_method,
                                         label="Method", elem_id="s2clip-method")
                    precision = gr.Dropdown(list(PRECISIONS), value=base.precision, label="Precision",
                                            elem_id="s2clip-precision")
                with gr.Row():
                    sam = gr.Checkbox(value=bool(info[service.default_method]["sam_default"]) and service.sam_loaded,
                                      label="SAM refinement", interactive=service.sam_loaded, elem_id="s2clip-sam")
                    sd = gr.Checkbox(value=base.sd, label="SD refinement", interactive=service.sd_loaded,
                                     elem_id="s2clip-sd")
                    background = gr.Checkbox(value=True, label="Background class", elem_id="s2clip-background")
                button = gr.Button("Segment", variant="primary", elem_id="s2clip-run")
            with gr.Column(scale=6):
                overlay = gr.Image(label="Overlay", type="pil", format="png", interactive=False, height=420,
                                   elem_id="s2clip-overlay")
                status = gr.HTML("", elem_id="s2clip-status", js_on_load=None)
                shares = gr.HTML("", label="Pixel share per class", show_label=True, container=True, padding=True,
                                 elem_id="s2clip-shares", js_on_load=None)
                with gr.Row():
                    mask_file = gr.File(label="Mask PNG", elem_id="s2clip-mask-file")
                    coco_file = gr.File(label="COCO JSON", elem_id="s2clip-coco-file")
        method.change(method_changed, inputs=method, outputs=sam, api_visibility="private")
        outputs = [overlay, shares, mask_file, coco_file, status]
        inputs = [image, classes, method, sam, sd, background, precision]
        for trigger in (button.click, classes.submit):  # the last run's results go as the new one starts
            trigger(clear, None, outputs, queue=False, api_visibility="private").then(
                run, inputs=inputs, outputs=outputs, api_visibility="private")
    # As many page runs at once as there are workers (the service's queue bounds them all).
    page.queue(default_concurrency_limit=len(service.devices), max_size=service.limits.max_queue)
    return page
