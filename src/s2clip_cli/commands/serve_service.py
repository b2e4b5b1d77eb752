"""The model side of `s2clip serve`, free of any web dependency: models loaded once, one segmenter
per (method, options, classes) kept in a small LRU cache (the text embedding is the costly part of a
new class set), every segmentation run by one worker thread (the models are never used by two
requests at once), and the request checks that turn bad input into one-line `RequestError`s.

The web layers (`serve_api`, `serve_page`) call `SegmentService.segment` (blocking) or
`SegmentService.submit` (a future), and format `SegmentOutcome`s with `outcome_json` / `mask_png`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
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

T = TypeVar("T")

MAX_NAME_CHARS = 100  # one class name
NAMES_PER_CLASS = 8  # synonyms of one class
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


class RequestError(S2ClipError):
    """A request the server refuses: an HTTP status (4xx, or 503 when busy) and one line."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(one_line(message))
        self.status = status


class _Cancelled(BaseException):
    """Raised on the model worker, from inside a module call, when the server stops and the running
    request's grace time is over (a BaseException: no `except Exception` on the way swallows it)."""


STOPPING = "the server is stopping; try again once it is back"


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and how long the server waits for clients and for itself."""

    max_upload_bytes: int = 20 * 2**20
    max_classes: int = 50
    max_pixels: int = 40_000_000  # decoded image size (width × height)
    max_queue: int = 16  # requests waiting for or holding the model; more get 503
    cache_size: int = 16  # segmenters (method, options, class set) kept
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


class SegmentService:
    """Models loaded once; `segment` runs requests one at a time on a worker thread."""

    def __init__(self, settings: ServeSettings) -> None:
        unknown = [m for m in settings.methods if m not in METHODS]
        if unknown or not settings.methods:
            raise S2ClipError(f"unknown method {', '.join(unknown) or '(none)'}; choose from: {', '.join(METHODS)}")
        self.settings = settings
        self.limits = settings.limits
        self.default_method = settings.methods[0]
        self.started = time.time()
        self.models: dict[str, LoadedModels] = {}
        self._segmenters: OrderedDict[tuple, Segmenter] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s2clip-model")
        self._slots = threading.BoundedSemaphore(self.limits.max_queue)
        self._pending = 0
        self._pending_lock = threading.Lock()
        # Stopping: new and queued requests get 503; the running one is cancelled at its next module
        # call once `_cancel` is set (`stop`: after the grace time).
        self._stopping = threading.Event()
        self._cancel = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._worker: int | None = None  # the model worker's thread id
        self._cancel_timer: threading.Timer | None = None
        self._load_models()
        import torch

        self._cancel_hook = torch.nn.modules.module.register_module_forward_pre_hook(self._check_cancel)

    # ------------------------------------------------------------------ start-up
    def _method_config(self, method: str, *, background: bool, sam: bool | None = None, sd: bool = False,
                       precision: str | None = None) -> SegmenterConfig:
        """`segment`'s configuration for `method` (its defaults, the explicit options on top)."""
        s = self.settings
        base = dataclasses.replace(s.base, prob_thd=0.2 if background else 0.0, sd=sd,
                                   precision=precision or s.base.precision)
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

    def _load_models(self) -> None:
        """Every served method's models, each model loaded once (`commands.evaluate.ModelPool`),
        with SAM (unless --no-sam) and SD (when --sd) so that a request may switch them on."""
        pool = ModelPool()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for method in self.settings.methods:
                cfg = self._method_config(method, background=True, sd=self.settings.base.sd)
                if cfg.sam is None and self.settings.sam_name is not None:
                    cfg = dataclasses.replace(cfg, sam=self.settings.sam_name)
                self.models[method] = pool.get(cfg)

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
        first = self.models[self.default_method]
        return {"status": "ok", "models": first.mode, "device": str(self._device()), "clip": first.clip.name,
                "methods": list(self.settings.methods), "default_method": self.default_method,
                "sam": self.sam_loaded, "sd": self.sd_loaded, "precision": self.settings.base.precision,
                "queued": self._pending, "max_queue": self.limits.max_queue,
                "max_upload_mb": round(self.limits.max_upload_bytes / 2**20, 3),
                "max_classes": self.limits.max_classes, "uptime_s": round(time.time() - self.started, 1)}

    def _device(self) -> Any:
        from ..models.factory import resolve_device

        return resolve_device(self.settings.base.device)

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

    def segmenter(self, request: SegmentRequest) -> Segmenter:
        """The segmenter of `request` (method, options, classes), built on the loaded models and
        kept in an LRU cache. Runs on the worker thread only."""
        key = (request.method, request.sam, request.sd, request.precision, request.classes, request.background)
        seg = self._segmenters.get(key)
        if seg is not None:
            self._segmenters.move_to_end(key)
            return seg
        cfg = self._method_config(request.method, background=request.background is not None, sam=request.sam,
                                  sd=request.sd, precision=request.precision)
        seg = Segmenter.build(cfg, [list(c) for c in request.classes],
                              list(request.background) if request.background else None,
                              models=self.models[request.method])
        self._segmenters[key] = seg
        while len(self._segmenters) > self.limits.cache_size:
            self._segmenters.popitem(last=False)
        return seg

    def _run(self, image: np.ndarray, request: SegmentRequest, queued_at: float) -> SegmentOutcome:
        waited = time.perf_counter() - queued_at
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            seg = self.segmenter(request)
            result = seg(image)
        timings = {k: round(v, 4) for k, v in result.timings.items()}
        timings["queue"] = round(waited, 4)
        return SegmentOutcome(image=image, labels=result.labels, classes=seg.queries.labels,
                              class_names=seg.queries.class_names, has_background=seg.queries.has_background,
                              run=run_record(seg), timings=timings, random_models=seg.models.is_random)

    def submit(self, image: np.ndarray, request: SegmentRequest) -> Future[SegmentOutcome]:
        """Queue a segmentation on the worker thread; `RequestError` 503 when the queue is full."""
        return self._submit(self._run, image, request, time.perf_counter())

    def submit_upload(self, data: bytes, filename: str | None, request: SegmentRequest,
                      answer: Callable[[SegmentOutcome], T]) -> Future[T]:
        """Queue an uploaded image: decoded (`decode_image`), segmented and turned into `answer`'s
        result on the worker thread, one hand-off per request; `RequestError` 503 when the queue
        is full, and the future raises `decode_image`'s `RequestError`s."""
        return self._submit(self._run_upload, data, filename, request, answer, time.perf_counter())

    def _run_upload(self, data: bytes, filename: str | None, request: SegmentRequest,
                    answer: Callable[[SegmentOutcome], T], queued_at: float) -> T:
        waited = time.perf_counter() - queued_at
        image = decode_image(data, filename, self.limits.max_pixels)
        outcome = self._run(image, request, time.perf_counter() - waited)
        return answer(outcome)

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self._stopping.is_set():
            raise RequestError(STOPPING, 503)
        if not self._slots.acquire(blocking=False):
            raise RequestError(f"server busy: {self.limits.max_queue} requests are queued; try again later", 503)
        with self._pending_lock:
            self._pending += 1
        try:
            future = self._executor.submit(self._guarded, fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())
        return future

    def _release(self) -> None:
        with self._pending_lock:
            self._pending -= 1
        self._slots.release()

    def segment(self, image: np.ndarray, request: SegmentRequest) -> SegmentOutcome:
        """Segment `image` for `request` (waits for its turn)."""
        started = time.perf_counter()
        outcome = self.submit(image, request).result()
        outcome.timings["total"] = round(time.perf_counter() - started, 4)
        return outcome

    # ------------------------------------------------------------------ stopping
    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs on the worker: `fn`, unless the server is stopping; a cancelled run is a 503."""
        if self._stopping.is_set():
            raise RequestError(STOPPING, 503)
        self._worker = threading.get_ident()
        self._idle.clear()
        try:
            return fn(*args)
        except _Cancelled:
            raise RequestError("the server is stopping: this request was cancelled", 503) from None
        finally:
            self._idle.set()

    def _check_cancel(self, module: Any, args: Any) -> None:
        """A forward pre-hook on every torch module: the worker's run stops at its next module call
        once it is cancelled."""
        if self._cancel.is_set() and threading.get_ident() == self._worker:
            raise _Cancelled

    def stop(self, grace_s: float | None = None) -> None:
        """Stop taking requests: new and queued ones get 503; the running one may finish within
        `grace_s` (default: the limit's), then is cancelled (503). A second call cancels it now."""
        if self._stopping.is_set():
            self._cancel.set()
            return
        self._stopping.set()
        grace = self.limits.grace_s if grace_s is None else grace_s
        self._cancel_timer = threading.Timer(grace, self._cancel.set)
        self._cancel_timer.daemon = True
        self._cancel_timer.start()

    def close(self, timeout_s: float = 2.0) -> bool:
        """Stop at once (cancel what runs, drop what waits) and wait up to `timeout_s` for the worker;
        True once it is idle (False: a run is stuck outside any module call)."""
        self._stopping.set()
        self._cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        idle = self._idle.wait(timeout_s)
        if self._cancel_timer is not None:
            self._cancel_timer.cancel()
        self._cancel_hook.remove()
        return idle


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
