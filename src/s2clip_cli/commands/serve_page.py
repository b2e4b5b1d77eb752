"""The web page of `s2clip serve` (Gradio): upload an image, type classes, choose method, SAM, SD,
background and precision; see the overlay with its legend and the pixel share of each class;
download the mask PNG and a COCO JSON. It runs through the same `SegmentService` (and its single
worker) as the HTTP API. Needs the ``serve`` extra.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from ..config import PRECISIONS
from ..errors import S2ClipError, one_line
from ..io.files import atomic_write_bytes, atomic_write_text
from ..io.outputs import render_overlay
from .serve_service import RequestError, SegmentService, coco_document, decode_image, mask_png

KEEP_DOWNLOADS = 32  # result folders kept for download (the oldest is removed first)

CSS = """
#s2clip-header h1 { margin-bottom: 0.1em; }
#s2clip-header p { margin-top: 0; opacity: 0.8; }
#s2clip-run { min-height: 44px; }
#s2clip-status { min-height: 1.5em; }
"""

INTRO = """# s2clip
Training-free open-vocabulary segmentation (CLIP + DINO + SAM). Upload an image, name the classes
(comma-separated; synonyms with `;`, e.g. `cat, floor; carpet, wall`) and press **Segment**.
The same models answer `POST /segment` (see `GET /health`, `GET /methods`)."""


class Downloads:
    """Per-result folders for the page's download files, the oldest removed past `KEEP_DOWNLOADS`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="s2clip-page-"))
        self.folders: list[Path] = []

    def new_folder(self) -> Path:
        folder = self.root / secrets.token_hex(8)
        folder.mkdir()
        self.folders.append(folder)
        while len(self.folders) > KEEP_DOWNLOADS:
            shutil.rmtree(self.folders.pop(0), ignore_errors=True)
        return folder

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _stem(path: str) -> str:
    stem = Path(path).stem
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60]
    return safe or "image"


def build_page(service: SegmentService) -> gr.Blocks:
    """The Gradio page, bound to `service`."""
    downloads = Downloads()
    info = {row["name"]: row for row in service.method_info()}
    base = service.settings.base

    def run(image_path: str | None, classes: str, method: str, sam: bool, sd: bool, background: bool,
            precision: str) -> tuple[Any, dict[str, float], str, str, str]:
        try:
            if not image_path:
                raise RequestError("upload an image first")
            fields = {"classes": classes, "method": method, "precision": precision,
                      "sam": str(bool(sam)) if service.sam_loaded else None, "sd": str(bool(sd)),
                      "no_background": str(not background)}
            request = service.parse_request(fields)
            path = Path(image_path)
            if path.stat().st_size > service.limits.max_upload_bytes:
                raise RequestError(f"image: over {service.limits.max_upload_bytes / 2**20:g} MB")
            image = decode_image(path.read_bytes(), path.name, service.limits.max_pixels)
            outcome = service.segment(image, request)
        except S2ClipError as exc:  # RequestError included: one line in the page's error toast
            raise gr.Error(one_line(exc), print_exception=False) from None
        overlay = render_overlay(outcome.image, outcome.labels, outcome.classes, outcome.palette)
        folder = downloads.new_folder()
        stem = _stem(image_path)
        mask_path = atomic_write_bytes(folder / f"{stem}_mask.png", mask_png(outcome))
        coco_path = atomic_write_text(folder / f"{stem}_coco.json",
                                      json.dumps(coco_document(outcome, path.name), indent=1))
        shares = {name: share for name, share in outcome.shares.items() if share > 0}
        h, w = outcome.labels.shape
        status = (f"{w}×{h} px · {outcome.run['method']} · SAM {'on' if outcome.run['sam'] else 'off'} · "
                  f"SD {'on' if outcome.run['sd'] else 'off'} · {outcome.run['precision']} · "
                  f"{outcome.timings.get('total', 0.0):.2f} s")
        if outcome.random_models:
            status += " · random weights (--models " + outcome.run["models"] + "): outputs are meaningless"
        return overlay, shares, str(mask_path), str(coco_path), status

    def method_changed(method: str) -> Any:
        return gr.update(value=bool(info[method]["sam_default"]) and service.sam_loaded)

    with gr.Blocks(title="s2clip", delete_cache=(3600, 3600), analytics_enabled=False) as page:
        gr.Markdown(INTRO, elem_id="s2clip-header")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                 height=360, elem_id="s2clip-image")
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
                status = gr.Markdown("", elem_id="s2clip-status")
                shares = gr.Label(label="Pixel share per class", num_top_classes=12, show_heading=False,
                                  elem_id="s2clip-shares")
                with gr.Row():
                    mask_file = gr.File(label="Mask PNG", elem_id="s2clip-mask-file")
                    coco_file = gr.File(label="COCO JSON", elem_id="s2clip-coco-file")
        method.change(method_changed, inputs=method, outputs=sam, api_visibility="private")
        button.click(run, inputs=[image, classes, method, sam, sd, background, precision],
                     outputs=[overlay, shares, mask_file, coco_file, status], api_visibility="private")
        classes.submit(run, inputs=[image, classes, method, sam, sd, background, precision],
                       outputs=[overlay, shares, mask_file, coco_file, status], api_visibility="private")
    page.queue(default_concurrency_limit=1, max_size=service.limits.max_queue)
    page.s2clip_downloads = downloads  # type: ignore[attr-defined]
    return page
