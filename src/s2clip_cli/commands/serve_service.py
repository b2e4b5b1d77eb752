"""The model side of `s2clip serve`, free of any web dependency: models loaded once per worker (one
worker per device of ``--devices``; `serve_workers` runs them over one shared bounded queue), one
segmenter per (method, options, classes) kept in a small LRU cache per worker (the text embedding is
the costly part of a new class set), every segmentation run on a worker thread (a worker's models
are never used by two requests at once), and the request checks that turn bad input into one-line
`RequestError`s.

The web layers (`serve_api`, `serve_page`) call `SegmentService.segment` (blocking) or
`SegmentService.submit` (a future), and format `SegmentOutcome`s with `outcome_json` / `mask_png`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config import PRECISIONS
from ..data.class_names import parse_class_list
from ..errors import S2ClipError, one_line
from ..io.images import read_image
from ..io.outputs import make_palette, save_mask_png
from ..methods import METHODS, get_method
from ..models.factory import LoadedModels
from ..models.precision import dtype_name
from ..pipeline.segmenter import Segmenter, SegmenterConfig
from .evaluate import ModelPool
from .methods import method_config
from .segment import background_names
from .serve_workers import RequestError, Worker, WorkerPool, cpu_threads_each

T = TypeVar("T")

MAX_NAME_CHARS = 100  # one class name
NAMES_PER_CLASS = 8  # synonyms of one class
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and how long the server waits for clients and for itself."""

    max_upload_bytes: int = 20 * 2**20
    max_classes: int = 50
    max_pixels: int = 40_000_000  # decoded image size (width × height)
    max_queue: int = 16  # requests waiting for or holding a worker (all workers together); more get 503
    cache_size: int = 16  # segmenters (method, options, class set) kept per worker
    read_timeout_s: float = 20.0  # request headers complete within this; no longer pause in a body
    grace_s: float = 1.0  # on SIGINT/SIGTERM: the running request may finish within this, then is cancelled
    keep_downloads_s: float = 600.0  # the page's result files are removed after this


@dataclass(frozen=True)
class SegmentRequest:
    """One checked request: what to segment the image into, and how."""

    classes: tuple[tuple[str, ...], ...]
    background: tuple[str, ...] | None  # None: no background class
    method: str
    sam: bool | None  # None: the method's default
    sd: bool
    precision: str


@dataclass
class SegmentOutcome:
    """One segmentation: the decoded image, its labels and what they mean."""

    image: np.ndarray  # [H, W, 3] uint8
    labels: np.ndarray  # [H, W] int64, indices into `classes`
    classes: list[str]  # display label per class ("background" first when there is one)
    class_names: list[list[str]]
    has_background: bool
    run: dict[str, Any]
    timings: dict[str, float]  # seconds: the pipeline's stages, plus "queue" and "total"
    random_models: bool

    @property
    def palette(self) -> np.ndarray:
        return make_palette(len(self.classes), self.has_background)


# ------------------------------------------------------------------------------ request checks
def parse_flag(text: str | None, name: str) -> bool | None:
    """A form's yes/no field: true/false/1/0/yes/no/on/off (any case); absent or empty → None."""
    if text is None or not text.strip():
        return None
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise RequestError(f"{name} must be true or false, got {text[:40]!r}")


def parse_classes(text: str | None, max_classes: int) -> tuple[tuple[str, ...], ...]:
    """The `classes` field, as `segment --classes` takes it (``cat,dog; puppy``), with the server's
    limits; never ``@file`` (a request does not read the server's files)."""
    if text is None or not text.strip():
        raise RequestError("no classes given: send classes=cat,dog (synonyms: 'dog; puppy')")
    if text.strip().startswith("@"):
        raise RequestError("classes must be names (cat,dog), not @file")
    count = text.count(",") + 1
    if count > max_classes:
        raise RequestError(f"too many classes: {count} (this server takes at most {max_classes})")
    try:
        classes = parse_class_list(text)
    except S2ClipError as exc:
        raise RequestError(str(exc).replace("--classes", "classes")) from None
    for names in classes:
        if len(names) > NAMES_PER_CLASS:
            raise RequestError(f"class {names[0]!r} has {len(names)} names (at most {NAMES_PER_CLASS})")
        for name in names:
            if len(name) > MAX_NAME_CHARS:
                raise RequestError(f"class name {name[:20]!r}… is longer than {MAX_NAME_CHARS} characters")
    return tuple(tuple(names) for names in classes)


def _decode_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except UnidentifiedImageError:
        raise RequestError("image: not a supported image (unknown format)") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise RequestError(f"image: not a supported image ({one_line(exc) or type(exc).__name__})") from None


def decode_image(data: bytes, filename: str | None, max_pixels: int) -> np.ndarray:
    """An uploaded image decoded exactly as `segment` reads a file (`io.images.read_image`: EXIF
    orientation, grey/RGBA/16-bit → RGB uint8); its size is checked from the header first."""
    if not data:
        raise RequestError("image: the upload is empty (0 bytes)")
    suffix = Path(filename or "").suffix.lower()
    suffix = suffix if suffix.isascii() and suffix[1:].isalnum() and len(suffix) <= 6 else ""
    with tempfile.TemporaryDirectory(prefix="s2clip-serve-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        width, height = _decode_size(path)
        if width * height > max_pixels:
            raise RequestError(f"image: {width}x{height} is too large (at most {max_pixels / 1e6:g} megapixels)",
                               status=413)
        try:
            return read_image(path)
        except S2ClipError as exc:
            # read_image names the file ("cannot read image /tmp/…/upload.png: …"): the upload is "image"
            message = str(exc).replace(f"cannot read image {path}", "image").replace(str(path), "image")
            raise RequestError(message.replace(tmp, "")) from None


# ------------------------------------------------------------------------------ the service
@dataclass
class ServeSettings:
    """The server's start-up choices (from the `serve` command line)."""

    base: SegmenterConfig  # as `segment` builds it: models, device, precision, SAM refinement...
    explicit: dict[str, Any]  # options given explicitly (`commands.methods.method_config`)
    methods: list[str]  # methods served; the first is the default
    background: str | None = None  # `segment --background`; None: the built-in list
    sam_name: str | None = "vit_b"  # the SAM model loaded for refinement (None: --no-sam)
    limits: ServeLimits = dataclasses.field(default_factory=ServeLimits)
    devices: list[str] | None = None  # one worker per entry (`serve_workers.parse_devices`); None: base.device


class SegmentService:
    """Models loaded once per worker; requests run on whichever worker is free, one at a time each."""

    def __init__(self, settings: ServeSettings) -> None:
        unknown = [m for m in settings.methods if m not in METHODS]
        if unknown or not settings.methods:
            raise S2ClipError(f"unknown method {', '.join(unknown) or '(none)'}; choose from: {', '.join(METHODS)}")
        self.settings = settings
        self.limits = settings.limits
        self.default_method = settings.methods[0]
        self.started = time.time()
        import torch

        from ..models.factory import resolve_device

        devices = settings.devices or [str(resolve_device(settings.base.device))]
        threads = cpu_threads_each(devices, torch.get_num_threads())
        # One worker after the other: random weights are drawn from one seed, so every worker holds
        # the same models (and real weights are read from the same files).
        workers = [Worker(index, device, self._load_models(device), threads if device == "cpu" else None)
                   for index, device in enumerate(devices)]
        self.pool = WorkerPool(workers, self.limits.max_queue)

    # ------------------------------------------------------------------ start-up
    def _method_config(self, method: str, *, background: bool, sam: bool | None = None, sd: bool = False,
                       precision: str | None = None, device: str | None = None) -> SegmenterConfig:
        """`segment`'s configuration for `method` (its defaults, the explicit options on top), on
        `device` (a worker's; default: the command's --device)."""
        s = self.settings
        base = dataclasses.replace(s.base, prob_thd=0.2 if background else 0.0, sd=sd,
                                   precision=precision or s.base.precision, device=device or s.base.device)
        explicit = dict(s.explicit)
        if not background:
            explicit.pop("prob_thd", None)
        if sam is False:
            explicit["no_sam"] = True
            explicit.pop("sam", None)
        elif sam is True:
            explicit.pop("no_sam", None)
            explicit.setdefault("sam", s.sam_name)
        return method_config(base, method, None, explicit, strict=method == self.default_method)

    def _load_models(self, device: str) -> dict[str, LoadedModels]:
        """One worker's models on `device`: every served method's, each model loaded once
        (`commands.evaluate.ModelPool`), with SAM (unless --no-sam) and SD (when --sd) so that a
        request may switch them on."""
        pool = ModelPool()
        models = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for method in self.settings.methods:
                cfg = self._method_config(method, background=True, sd=self.settings.base.sd, device=device)
                if cfg.sam is None and self.settings.sam_name is not None:
                    cfg = dataclasses.replace(cfg, sam=self.settings.sam_name)
                models[method] = pool.get(cfg)
        return models

    @property
    def models(self) -> dict[str, LoadedModels]:
        """The first worker's models (every worker loads the same ones)."""
        return self.pool.workers[0].models

    @property
    def devices(self) -> list[str]:
        return [worker.device for worker in self.pool.workers]

    # ------------------------------------------------------------------ what is served
    @property
    def sam_loaded(self) -> bool:
        return any(m.sam is not None for m in self.models.values())

    @property
    def sd_loaded(self) -> bool:
        return any(m.sd is not None for m in self.models.values())

    def method_info(self) -> list[dict[str, Any]]:
        """Every method the server serves, with what it runs."""
        rows = []
        for name in self.settings.methods:
            m = get_method(name)
            cfg = self._method_config(name, background=True)
            rows.append({"name": name, "title": m.title, "strategy": m.strategy,
                         "vfm": cfg.vfm if m.vfm is not None else None, "postprocess": list(m.postprocess),
                         "sam_default": cfg.sam_refine and cfg.sam is not None, "default": name == self.default_method})
        return rows

    def health(self) -> dict[str, Any]:
        """What is loaded, the limits, and the workers and queue (`WorkerPool.health`); `device` names
        every worker's device (comma-separated), `queued` and `max_queue` repeat the queue's length
        and capacity (as a one-worker server always answered)."""
        first = self.models[self.default_method]
        workers = self.pool.health()
        return {"status": "ok", "models": first.mode, "device": ",".join(self.devices), "clip": first.clip.name,
                "methods": list(self.settings.methods), "default_method": self.default_method,
                "sam": self.sam_loaded, "sd": self.sd_loaded, "precision": self.settings.base.precision,
                **workers, "queued": workers["queue"]["length"], "max_queue": self.limits.max_queue,
                "max_upload_mb": round(self.limits.max_upload_bytes / 2**20, 3),
                "max_classes": self.limits.max_classes, "uptime_s": round(time.time() - self.started, 1)}

    # ------------------------------------------------------------------ requests
    def parse_request(self, fields: Mapping[str, str | None]) -> SegmentRequest:
        """A request's text fields (classes, background, no_background, method, sam, sd, precision)
        checked against what the server serves; `RequestError` otherwise."""
        classes = parse_classes(fields.get("classes"), self.limits.max_classes)
        method = (fields.get("method") or "").strip() or self.default_method
        if method not in METHODS:
            raise RequestError(f"unknown method {method[:40]!r}; choose one of: {', '.join(self.settings.methods)}")
        if method not in self.models:
            raise RequestError(f"method {method} is not loaded by this server; it serves: "
                               f"{', '.join(self.settings.methods)} (start it with --methods)")
        precision = (fields.get("precision") or "").strip() or self.settings.base.precision
        if precision not in PRECISIONS:
            raise RequestError(f"unknown precision {precision[:20]!r}; choose one of: {', '.join(PRECISIONS)}")
        sam = parse_flag(fields.get("sam"), "sam")
        if sam and self.models[method].sam is None:
            raise RequestError("sam=true but this server loaded no SAM model (it was started with --no-sam)")
        sd = parse_flag(fields.get("sd"), "sd")
        if sd is None:
            sd = self.settings.base.sd
        if sd and self.models[method].sd is None:
            raise RequestError("sd=true but this server loaded no SD model (start it with --sd)")
        no_background = parse_flag(fields.get("no_background"), "no_background")
        background = None
        if not no_background:
            spec = fields.get("background")
            spec = spec if spec is not None and spec.strip() else self.settings.background
            try:
                background = tuple(background_names(spec, [list(c) for c in classes]))
            except S2ClipError as exc:
                raise RequestError(str(exc).replace("--background", "background")
                                   .replace("--no-background", "no_background=true")) from None
        return SegmentRequest(classes, background or None, method, sam, sd, precision)

    def segmenter(self, request: SegmentRequest, worker: Worker) -> Segmenter:
        """The segmenter of `request` (method, options, classes), built on `worker`'s models and kept
        in its LRU cache. Runs on that worker's thread only."""
        key = (request.method, request.sam, request.sd, request.precision, request.classes, request.background)
        cache = worker.segmenters
        seg = cache.get(key)
        if seg is not None:
            cache.move_to_end(key)
            return seg
        cfg = self._method_config(request.method, background=request.background is not None, sam=request.sam,
                                  sd=request.sd, precision=request.precision, device=worker.device)
        seg = Segmenter.build(cfg, [list(c) for c in request.classes],
                              list(request.background) if request.background else None,
                              models=worker.models[request.method])
        cache[key] = seg
        while len(cache) > self.limits.cache_size:
            cache.popitem(last=False)
        return seg

    def _run(self, image: np.ndarray, request: SegmentRequest, queued_at: float) -> SegmentOutcome:
        waited = time.perf_counter() - queued_at
        worker = self.pool.current()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            seg = self.segmenter(request, worker)
            result = seg(image)
        timings = {k: round(v, 4) for k, v in result.timings.items()}
        timings["queue"] = round(waited, 4)
        return SegmentOutcome(image=image, labels=result.labels, classes=seg.queries.labels,
                              class_names=seg.queries.class_names, has_background=seg.queries.has_background,
                              run={**run_record(seg), "worker": worker.index}, timings=timings,
                              random_models=seg.models.is_random)

    def submit(self, image: np.ndarray, request: SegmentRequest) -> Future[SegmentOutcome]:
        """Queue a segmentation for the first free worker; `RequestError` 503 when the queue is full."""
        return self._submit(self._run, image, request, time.perf_counter())

    def submit_upload(self, data: bytes, filename: str | None, request: SegmentRequest,
                      answer: Callable[[SegmentOutcome], T]) -> Future[T]:
        """Queue an uploaded image: decoded (`decode_image`), segmented and turned into `answer`'s
        result on a worker thread, one hand-off per request; `RequestError` 503 when the queue
        is full, and the future raises `decode_image`'s `RequestError`s."""
        return self._submit(self._run_upload, data, filename, request, answer, time.perf_counter())

    def _run_upload(self, data: bytes, filename: str | None, request: SegmentRequest,
                    answer: Callable[[SegmentOutcome], T], queued_at: float) -> T:
        waited = time.perf_counter() - queued_at
        image = decode_image(data, filename, self.limits.max_pixels)
        outcome = self._run(image, request, time.perf_counter() - waited)
        return answer(outcome)

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self.pool.submit(fn, *args)

    def segment(self, image: np.ndarray, request: SegmentRequest) -> SegmentOutcome:
        """Segment `image` for `request` (waits for its turn)."""
        started = time.perf_counter()
        outcome = self.submit(image, request).result()
        outcome.timings["total"] = round(time.perf_counter() - started, 4)
        return outcome

    # ------------------------------------------------------------------ stopping
    def stop(self, grace_s: float | None = None) -> None:
        """Stop taking requests: new and queued ones get 503; the running ones (one per worker) may
        finish within `grace_s` (default: the limit's), then are cancelled (503). A second call
        cancels them now."""
        self.pool.stop(self.limits.grace_s if grace_s is None else grace_s)

    def close(self, timeout_s: float = 2.0) -> bool:
        """Stop at once (cancel what runs, drop what waits) and wait up to `timeout_s` for every
        worker; True once all are idle (False: a run is stuck outside any module call)."""
        return self.pool.close(timeout_s)


# ------------------------------------------------------------------------------ results
def format_share(share: float) -> str:
    """A pixel share for people: one decimal ("41.2%", "0.2%"), "<0.1%" for a class present on
    fewer pixels than that, "0%" only for none."""
    if share <= 0:
        return "0%"
    if share < 0.0005:
        return "<0.1%"
    return f"{100 * share:.1f}%"


def run_record(seg: Segmenter) -> dict[str, Any]:
    """What ran, as `segment`'s JSON records it."""
    cfg = seg.config
    return {"method": cfg.method, "clip": cfg.clip, "vfm": cfg.vfm if seg.method.vfm is not None else None,
            "sam": cfg.sam if seg.uses_sam_prompts else None, "sd": cfg.sd, "models": seg.models.mode,
            "device": str(seg.device), "precision": dtype_name(seg.dtype)}


def outcome_json(outcome: SegmentOutcome) -> dict[str, Any]:
    """The API's JSON answer: classes, pixel shares and one COCO RLE mask per class present (the
    background included), which `pycocotools.mask.decode` turns back into the label map."""
    from ..io.export.coco import encode_rle

    labels = outcome.labels
    counts = np.bincount(labels.ravel(), minlength=len(outcome.classes)) if labels.size else []
    # Column-major (as COCO RLE runs) and narrow once: each class's mask is then a uint8 view that
    # pycocotools encodes without another copy.
    narrow = np.asfortranarray(labels, dtype=np.uint8 if len(outcome.classes) <= 256 else np.int32)
    masks = [{"class": name, "label": index, "area": int(counts[index]),
              "rle": encode_rle((narrow == index).view(np.uint8))}
             for index, name in enumerate(outcome.classes) if labels.size and counts[index] > 0]
    record: dict[str, Any] = {
        "size": [int(labels.shape[0]), int(labels.shape[1])],
        "classes": outcome.classes,
        "class_names": outcome.class_names,
        "has_background": outcome.has_background,
        "pixel_share": {name: round(float(counts[i]) / labels.size, 6) if labels.size else 0.0
                        for i, name in enumerate(outcome.classes)},
        "masks": masks,
        "run": outcome.run,
        "timings_s": outcome.timings,
    }
    if outcome.random_models:
        record["warning"] = "randomly initialised models: outputs are meaningless"
    return record


def coco_document(outcome: SegmentOutcome, file_name: str = "image") -> dict[str, Any]:
    """A COCO-style document of one image (one annotation per connected region of each class), as
    `segment --format coco` writes for a run."""
    from ..io.export.coco import ClassTable, annotations_from_labels, categories

    h, w = outcome.labels.shape
    return {
        "info": {"description": "s2clip segmentation", "version": "1.0"},
        "licenses": [],
        "images": [{"id": 1, "file_name": file_name, "width": int(w), "height": int(h)}],
        "annotations": annotations_from_labels(outcome.labels, len(outcome.classes), outcome.has_background),
        "categories": categories(ClassTable(tuple(outcome.classes), outcome.has_background)),
    }


def mask_png(outcome: SegmentOutcome) -> bytes:
    """The label map as `segment`'s mask PNG (indexed, coloured by the class palette), as bytes."""
    with tempfile.TemporaryDirectory(prefix="s2clip-serve-") as tmp:
        path = Path(tmp) / "mask.png"
        save_mask_png(path, outcome.labels, outcome.palette)
        return path.read_bytes()
