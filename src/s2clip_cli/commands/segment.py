"""Driver of `s2clip segment`: segment images and videos, writing each input's outputs as one set.

Per image ``NAME`` (see `io.sources` for how names mirror sub-folders) under the output folder:
``NAME_mask.png``, ``NAME_overlay.png`` (format ``png``), the files of the other export formats, and
``NAME.json`` last — the record whose presence marks the set complete. Per video: the frame masks in
``NAME_frames/``, ``NAME_overlay.mp4`` and ``NAME.json``. A rerun skips inputs whose set is
complete (``--overwrite`` redoes them); an input whose outputs exist only in part is refused
without ``--overwrite``; an output that would replace an input is refused always. A bad input is
reported on one line and the others still run.

Under ``torchrun`` (or any launcher exporting its variables) each rank segments its share of the
inputs on its own device and rank 0 writes the run-level export files of all (`segment_ranks`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from ..config import DEFAULT_BACKGROUND
from ..distributed import ClockWatch, DistContext, LostContact, PeerFailure, agreed
from ..errors import S2ClipError, noted_on_interrupt, one_line
from ..io.files import write_json
from ..io.images import read_image
from ..io.outputs import (
    OutputSet,
    blend_labels,
    class_shares,
    make_palette,
    mask_png_kind,
    read_mask_png,
    save_mask_png,
    save_overlay,
)
from ..io.sources import Source, check_unique_names
from ..methods import get_method
from ..models.factory import prefetch_weights, resolve_device
from ..models.precision import dtype_name
from ..pipeline.segmenter import SD_MODEL, SegmentationResult, Segmenter, SegmenterConfig
from ..pipeline.text import ClassQueries, build_queries
from .inputs import progress_bar
from .methods import method_config
from .segment_ranks import RESUME_HINT, Share, merge_run_files, split_inputs, sum_counts

State = Literal["new", "complete", "partial"]


def background_names(spec: str | None, classes: list[list[str]]) -> list[str]:
    """Background names from `--background` ('; '-separated; default: the built-in stuff list),
    minus any name the user asked for as a class (a named class wins over background)."""
    text = DEFAULT_BACKGROUND if spec is None else spec
    names = [name.strip() for name in text.split(";") if name.strip()]
    if not names:
        raise S2ClipError("--background is empty: give names separated by '; ' or use --no-background")
    wanted = {n.lower() for names_ in classes for n in names_}
    return [name for name in names if name.lower() not in wanted]


@dataclass(frozen=True)
class SegmentOptions:
    """What `segment` writes and how it goes through its inputs."""

    overwrite: bool = False  # redo inputs whose outputs exist (complete or not)
    batch: int = 1  # images (or video frames) whose windows share the forward passes
    every: int = 1  # videos: segment every N-th frame
    formats: tuple[str, ...] = ("png",)  # export formats (io.export); "png": mask + overlay + JSON
    polygon_tolerance: float = 1.0


@dataclass
class RunCounts:
    """Inputs segmented, skipped (complete outputs found) and failed in one run."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)  # this process's messages
    ranks: int = 1  # processes of the run (the counts cover them all)
    seconds: float = 0.0  # segmenting (models built to every rank done)
    merge_seconds: float = 0.0  # the run-level export files (rank 0)

    def summary(self) -> str:
        skipped = f"skipped {self.skipped}" + (" (outputs exist; --overwrite redoes them)" if self.skipped else "")
        ranks = f" on {self.ranks} ranks in {self.seconds:.1f} s" if self.ranks > 1 else ""
        return f"done {self.done}, {skipped}, failed {self.failed}{ranks}"


def output_paths(out_dir: Path, name: str) -> dict[str, Path]:
    """An image's ``png`` outputs: mask, overlay and the JSON record."""
    base = out_dir / name
    return {
        "mask": base.with_name(f"{base.name}_mask.png"),
        "overlay": base.with_name(f"{base.name}_overlay.png"),
        "json": base.with_name(f"{base.name}.json"),
    }


def video_output_paths(out_dir: Path, name: str) -> dict[str, Path]:
    """A video's outputs: the folder of frame masks, the overlay video and the JSON record."""
    base = out_dir / name
    return {
        "frames": base.with_name(f"{base.name}_frames"),
        "overlay": base.with_name(f"{base.name}_overlay.mp4"),
        "json": base.with_name(f"{base.name}.json"),
    }


def check_export_classes(formats: tuple[str, ...] | list[str], classes: list[list[str]],
                         background: list[str] | None) -> None:
    """The chosen export formats' limits on class names (`io.export.check_class_names`), as a
    one-line `S2ClipError` before anything is written or loaded."""
    if any(f != "png" for f in formats):
        from ..io.export import check_class_names

        queries = build_queries(classes, background)
        check_class_names(formats, queries.labels, queries.has_background)


def _summary(record: dict, top: int = 4) -> str:
    shares = sorted(record["pixel_share"].items(), key=lambda kv: -kv[1])
    parts = [f"{name} {100 * s:.1f}%" for name, s in shares[:top] if s > 0]
    return ", ".join(parts)


def _run_record(seg: Segmenter) -> dict[str, Any]:
    """The resolved settings of the run, as every JSON record keeps them."""
    masks = {"instance_masks": seg.mask_source.identity} if seg.mask_source is not None else {}
    return {**masks,
        "method": seg.config.method, "clip": seg.config.clip,
        "vfm": seg.config.vfm if seg.method.vfm is not None else None,
        "sam": seg.config.sam if seg.models.sam is not None else None, "sam_prompts": seg.uses_sam_prompts,
        "short_side": seg.config.short_side,
        "windows": "whole image" if seg.config.whole_image else [seg.config.crop, seg.config.stride],
        "logit_scale": seg.config.logit_scale, "pamr": seg.config.pamr,
        "layers": seg.layers, "combine": seg.config.combine, "models": seg.models.mode,
        "device": str(seg.device), "precision": dtype_name(seg.dtype),
        "sam_encoder_precision": dtype_name(seg.sam_dtype),
    }


def pixel_shares(labels: np.ndarray, names: list[str]) -> dict[str, float]:
    """Each class's share of the pixels (rounded to 6 digits), as the JSON records and `serve` give it."""
    return {name: round(float(s), 6) for name, s in zip(names, class_shares(labels, len(names)), strict=True)}


def image_record(seg: Segmenter, path: Path, image: np.ndarray, result: SegmentationResult,
                 targets: dict[str, Path], record_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON record of one segmented image."""
    labels = seg.queries.labels
    record = {
        "image": str(path),
        "size": [int(image.shape[0]), int(image.shape[1])],
        "classes": labels,
        "class_names": seg.queries.class_names,
        "has_background": seg.queries.has_background,
        "mask_png": mask_png_kind(len(labels)),
        "pixel_share": pixel_shares(result.labels, labels),
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "config": record_config or {},
        "run": _run_record(seg),
        "outputs": {k: str(v) for k, v in targets.items()},
    }
    if seg.models.is_random:
        record["warning"] = "randomly initialised models: outputs are meaningless"
    return record


def write_image_set(seg: Segmenter, path: Path, image: np.ndarray, result: SegmentationResult,
                    targets: dict[str, Path], *, palette: np.ndarray | None = None, replace: bool = False,
                    record_config: dict[str, Any] | None = None, exports: Any = None,
                    export_name: str | None = None) -> dict[str, Any]:
    """Write one image's outputs as a set (`io.outputs.OutputSet`): the mask, the overlay (when
    `targets` has one), the export files (`exports`, an `io.export.ExportSession`, for the image
    named `export_name`: `io.naming`, ``trip/cat.jpg``), then the JSON record; returns the record.
    If the set fails, the image is left out of the exports' run-level files as well."""
    labels = seg.queries.labels
    palette = make_palette(len(labels), seg.queries.has_background) if palette is None else palette
    exporting = exports is not None and export_name is not None
    try:
        with OutputSet(list(targets.values()), targets["json"], replace=replace) as staged:
            save_mask_png(staged.tmp(targets["mask"]), result.labels, palette)
            if "overlay" in targets:
                save_overlay(staged.tmp(targets["overlay"]), image, result.labels, labels, palette)
            if exporting:
                staged.adopt(exports.image_outputs(export_name).values())
                exports.write_image(path, export_name, result.labels)
            record = image_record(seg, path, image, result, targets, record_config)
            write_json(staged.tmp(targets["json"]), record)
    except BaseException:
        if exporting:  # the set is gone: the run-level files leave the image out too
            exports.discard(export_name)
        raise
    return record


# ----------------------------------------------------------------------------------- planning


def _is_record(path: Path) -> bool:
    """Whether `path` is a JSON record `segment` wrote (a complete set's marker)."""
    if not path.is_file() or path.stat().st_size > 64 * 2**20:
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("outputs"), dict) and "classes" in data


def output_state(targets: dict[str, Path]) -> tuple[State, list[Path]]:
    """("new", []) when none of `targets` exists; ("complete", all) when all do and the JSON is a
    record; ("partial", the ones that exist) otherwise."""
    existing = [p for p in targets.values() if p.exists() or p.is_symlink()]
    if not existing:
        return "new", []
    if len(existing) == len(targets) and _is_record(targets["json"]):
        return "complete", existing
    return "partial", existing


def _under(path: Path, folders: set[Path]) -> bool:
    return path in folders or any(parent in folders for parent in path.parents)


class _Plan:
    """The outputs of every input and what to do with each: segment, skip, or refuse."""

    def __init__(self, sources: list[Source], out_dir: Path, options: SegmentOptions, exports: Any) -> None:
        self.out_dir = out_dir
        self.options = options
        self.exports = exports
        check_unique_names(sources)
        targets = {s.path: self.targets(s) for s in sources}
        folders = {s.path: self.own_folders(s) for s in sources}
        resolve = _resolver()
        resolved = {s.path: [(p, resolve(p)) for p in targets[s.path].values()] for s in sources}
        resolved_folders = {s.path: [(f, resolve(f)) for f in folders[s.path]] for s in sources}
        outputs = {r for pairs in resolved.values() for _, r in pairs}
        taken = outputs | {r for pairs in resolved_folders.values() for _, r in pairs}
        # files found in folders or by patterns that are outputs of this run are not inputs
        inputs = {s.path: resolve(s.path) for s in sources}
        self.sources = [s for s in sources if s.named or not _under(inputs[s.path], taken)]
        for source in self.sources:
            if inputs[source.path] in outputs:
                raise S2ClipError(f"an output of this run would replace the input {source.path}; "
                                  "choose another output folder (-o)")
        _check_disjoint(self.sources, resolved, resolved_folders)
        self.state = {s.path: output_state(targets[s.path]) for s in self.sources}
        self._targets = targets

    def own_folders(self, source: Source) -> list[Path]:
        """Folders that hold this input's outputs only: a video's frame masks, an image's class masks."""
        if source.kind == "video":
            return [video_output_paths(self.out_dir, source.name)["frames"]]
        return [] if self.exports is None else list(self.exports.image_folders(source.image_name).values())

    def targets(self, source: Source) -> dict[str, Path]:
        if source.kind == "video":
            return video_output_paths(self.out_dir, source.name)
        paths = output_paths(self.out_dir, source.name)
        if "png" not in self.options.formats:
            del paths["overlay"]
        if self.exports is not None:
            for fmt, path in self.exports.image_outputs(source.image_name).items():
                paths[f"export:{fmt}"] = path
        paths["json"] = paths.pop("json")  # the marker last
        return paths

    def targets_of(self, source: Source) -> dict[str, Path]:
        return self._targets[source.path]

    def todo(self) -> list[Source]:
        return [s for s in self.sources if self.options.overwrite or self.state[s.path][0] == "new"]


# ----------------------------------------------------------------------------------- running


class _Run:
    """One process's part of a `segment` run: the segmenter (None on a rank with nothing to
    segment), the outputs, the counts, the messages and the progress."""

    def __init__(self, plan: _Plan, seg: Segmenter | None, queries: ClassQueries, options: SegmentOptions,
                 console: Console, out: Console, progress: Progress, record_config: dict[str, Any] | None,
                 exports: Any) -> None:
        self.plan = plan
        self._seg = seg
        self.options = options
        self.console = console
        self.out = out
        self.progress = progress
        self.record_config = record_config
        self.exports = exports
        self.labels = queries.labels
        self.palette = make_palette(len(self.labels), queries.has_background)
        self.counts = RunCounts()
        self.image_task: Any = None
        self.single = len(plan.sources) == 1  # one input: its error is raised, not reported
        self.units = 0  # inputs this process has segmented (or failed to)
        self.watch: ClockWatch | None = None  # several ranks: failures and progress of all
        self.all_task: Any = None  # several ranks: rank 0's bar over every rank's inputs

    @property
    def seg(self) -> Segmenter:
        if self._seg is None:
            raise RuntimeError("this process has no segmenter: it was given no input to segment")
        return self._seg

    def checkpoint(self) -> None:
        """Tell the other ranks how far this one is (raises `PeerFailure`/`LostContact` when one
        failed or is gone) and show every rank's progress."""
        if self.watch is not None:
            self.watch.post(self.units)
            self.show_all(self.watch.progress)

    def show_all(self, done: int) -> None:
        if self.all_task is not None:
            self.progress.update(self.all_task, completed=done)

    def advance(self, count: int, *, images: bool = True) -> None:
        """``count`` more inputs (images, or a video) are through: segmented or failed."""
        self.units += count
        if images and self.image_task is not None:
            self.progress.advance(self.image_task, count)
        self.checkpoint()

    def fail(self, source: Source, exc: BaseException) -> None:
        message = one_line(exc) if isinstance(exc, S2ClipError) else (
            f"unexpected {type(exc).__name__}: {one_line(exc)} (set S2CLIP_DEBUG=1 for the traceback)")
        if str(source.path) not in message:
            message = f"{source.path}: {message}"
        self.counts.failed += 1
        self.counts.failures.append(message)
        self.console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)

    @contextmanager
    def guarded(self, source: Source) -> Iterator[None]:
        """Report a failure of `source` on one line and carry on with the next input."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                yield
        except (PeerFailure, LostContact):
            raise  # another rank stopped the run: not this input's failure
        except S2ClipError as exc:
            if self.single:
                raise
            self.fail(source, exc)
        except Exception as exc:  # noqa: BLE001 - one bad input must not stop the others
            if self.single or os.environ.get("S2CLIP_DEBUG"):
                raise
            self.fail(source, exc)

    # ------------------------------------------------------------------ images
    def images(self, sources: list[Source]) -> None:
        loaded: list[tuple[Source, np.ndarray]] = []
        for source in sources:
            with self.guarded(source):
                loaded.append((source, read_image(source.path)))
        if not loaded:
            self.advance(len(sources))
            return
        results = self.segment([image for _, image in loaded], [s for s, _ in loaded])
        for (source, image), result in zip(loaded, results, strict=True):
            if result is None:
                continue
            with self.guarded(source):
                targets = self.plan.targets_of(source)
                record = write_image_set(self.seg, source.path, image, result, targets, palette=self.palette,
                                         replace=self.options.overwrite, record_config=self.record_config,
                                         exports=self.exports, export_name=source.image_name)
                self.counts.done += 1
                self.out.print(f"{escape(str(source.path))} → {escape(record['outputs']['mask'])}  "
                               f"({escape(_summary(record))})", highlight=False, soft_wrap=True)
        self.advance(len(sources))

    def segment(self, images: list[np.ndarray], sources: list[Source]) -> list[SegmentationResult | None]:
        """Segment a batch; when the batch fails, each image on its own (so only a bad one fails)."""
        from .segment_batch import segment_many

        by_name = self.seg.mask_source is not None and self.seg.mask_source.needs_name
        if len(images) > 1 and not by_name:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    return list(segment_many(self.seg, images))
            except Exception:  # noqa: BLE001 - retried one by one below, where the error is reported
                pass
        results: list[SegmentationResult | None] = []
        for source, image in zip(sources, images, strict=True):
            result = None
            with self.guarded(source):
                result = self.seg(image, name=source.path.stem)
            results.append(result)
        return results

    # ------------------------------------------------------------------ videos
    def video(self, source: Source) -> None:
        from ..io.video import VideoFrames, VideoWriter
        from .segment_batch import segment_many

        targets = self.plan.targets_of(source)
        leaf = Path(source.name).name
        with self.guarded(source), VideoFrames(source.path, self.options.every) as video, \
                OutputSet(list(targets.values()), targets["json"], replace=self.options.overwrite) as staged:
            frames_dir = staged.tmp(targets["frames"])
            frames_dir.mkdir()
            task = self.progress.add_task(f"{source.path.name} (frames)", total=len(video) or None)
            frames: list[dict[str, Any]] = []
            timings: dict[str, float] = {}
            with VideoWriter(staged.tmp(targets["overlay"]), video.fps / self.options.every, video.size) as writer:
                pending: list[tuple[int, np.ndarray]] = []

                def flush() -> None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        results = segment_many(self.seg, [frame for _, frame in pending])
                    for (index, frame), result in zip(pending, results, strict=True):
                        mask_name = f"{leaf}_{index:06d}_mask.png"
                        save_mask_png(frames_dir / mask_name, result.labels, self.palette)
                        writer.write(blend_labels(frame, result.labels, self.palette))
                        frames.append({"index": index, "time_s": round(index / video.fps, 4),
                                       "mask": str(targets["frames"] / mask_name),
                                       "pixel_share": pixel_shares(result.labels, self.labels)})
                        for stage, seconds in result.timings.items():
                            timings[stage] = timings.get(stage, 0.0) + seconds
                    self.progress.advance(task, len(pending))
                    pending.clear()
                    self.checkpoint()

                for index, frame in video:
                    pending.append((index, frame))
                    if len(pending) >= self.options.batch:
                        flush()
                if pending:
                    flush()
                writer.close()
            record = {
                "video": str(source.path), "size": list(video.size), "fps": video.fps, "every": self.options.every,
                "classes": self.labels, "class_names": self.seg.queries.class_names,
                "has_background": self.seg.queries.has_background, "mask_png": mask_png_kind(len(self.labels)),
                "frames": frames, "timings_s": {k: round(v, 4) for k, v in timings.items()},
                "config": self.record_config or {}, "run": _run_record(self.seg),
                "outputs": {k: str(v) for k, v in targets.items()},
            }
            if self.seg.models.is_random:
                record["warning"] = "randomly initialised models: outputs are meaningless"
            write_json(staged.tmp(targets["json"]), record)
            self.counts.done += 1
            self.out.print(f"{escape(str(source.path))} → {escape(str(targets['overlay']))}  ({len(frames)} frames)",
                           highlight=False, soft_wrap=True)
        self.advance(1, images=False)

    # ------------------------------------------------------------------ skipped inputs
    def add_existing(self, source: Source) -> None:
        """A skipped image joins the run-level export files (labels read back from its mask)."""
        if self.exports is None or source.kind == "video":
            return
        with self.guarded(source):
            labels = read_mask_png(self.plan.targets_of(source)["mask"], len(self.labels))
            self.exports.add_existing(source.path, source.image_name, labels)


def _resolver() -> Callable[[Path], Path]:
    """``Path.resolve`` for many paths in few folders: each folder resolved once, a file only when
    it is a link."""
    folders: dict[Path, Path] = {}

    def resolve(path: Path) -> Path:
        parent = folders.get(path.parent)
        if parent is None:
            parent = folders[path.parent] = path.parent.resolve()
        full = parent / path.name
        return full.resolve() if full.is_symlink() else full

    return resolve


def _check_disjoint(sources: list[Source], targets: dict[Path, list[tuple[Path, Path]]],
                    folders: dict[Path, list[tuple[Path, Path]]]) -> None:
    """`S2ClipError` naming both inputs when one would write a file another writes, or into a folder
    that holds another's outputs only (``clip_frames/clip_000000.png`` beside ``clip.mp4``).
    ``targets`` and ``folders``: each input's output files and own folders, as (path, resolved)."""
    owner: dict[Path, Source] = {}
    for source in sources:
        for path, resolved in [*targets[source.path], *folders[source.path]]:
            other = owner.setdefault(resolved, source)
            if other is not source:
                raise S2ClipError(f"{other.path} and {source.path} would write the same outputs ({path}); "
                                  "rename one of them")
    reserved = {resolved: (source, folder) for source in sources for folder, resolved in folders[source.path]}
    for source in sources:
        for path, resolved in targets[source.path]:
            for parent in resolved.parents:
                other, folder = reserved.get(parent, (source, parent))
                if other is not source:
                    raise S2ClipError(f"{source.path} would write {path} into {folder}, which holds the outputs "
                                      f"of {other.path}; rename one of them")


def _refused(plan: _Plan) -> list[str]:
    """Without --overwrite, an input whose outputs exist only in part is refused (they may be
    another run's or the user's files): one message per such input, in input order."""
    if plan.options.overwrite:
        return []
    return [f"{source.path}: {existing[0]} exists but the outputs of this input are not a complete set; "
            "--overwrite replaces them"
            for source in plan.sources for state, existing in [plan.state[source.path]] if state == "partial"]


def run_segment(sources: list[Source], classes: list[list[str]], background: list[str] | None,
                config: SegmenterConfig, out_dir: Path, *, console: Console, out: Console,
                options: SegmentOptions = SegmentOptions(), record_config: dict[str, Any] | None = None,
                explicit: dict[str, Any] | None = None) -> RunCounts:
    """Segment every source with `config.method` (its own defaults, `explicit` options on top) and
    return the counts. With one input, its failure is raised; with several, each is reported on one
    line and the others still run. Models are built only when something is left to segment.

    Under several ranks (``WORLD_SIZE`` > 1) every rank calls this with the same arguments: each
    segments its share (`segment_ranks.split_inputs`) on ``cuda:LOCAL_RANK`` (or the CPU), prints
    its own failures; rank 0 alone shows progress (of every rank), prints nothing per input and
    writes the run-level export files; every rank returns the counts of all. A rank that fails (not an
    input: the process) stops every rank within seconds."""
    if options.batch < 1 or options.every < 1:
        raise S2ClipError("--batch and --every must be at least 1")
    queries = build_queries(classes, background)
    mask_png_kind(len(queries.labels))  # too many classes: refused before any model is built
    device = str(resolve_device(config.device))
    ctx = DistContext.from_env(device, backend="gloo")  # ranks exchange flags and small objects only
    try:
        if ctx.is_distributed and device.startswith("cuda"):
            config = dataclasses.replace(config, device=f"cuda:{ctx.cuda_index}")
        return _run_segment(ctx, sources, classes, background, queries, config, out_dir, console=console,
                            out=out if not ctx.is_distributed else Console(quiet=True), options=options,
                            record_config=record_config, explicit=explicit)
    finally:
        ctx.close()


def _run_segment(ctx: DistContext, sources: list[Source], classes: list[list[str]], background: list[str] | None,
                 queries: ClassQueries, config: SegmenterConfig, out_dir: Path, *, console: Console, out: Console,
                 options: SegmentOptions, record_config: dict[str, Any] | None,
                 explicit: dict[str, Any] | None) -> RunCounts:
    exports = None
    if any(f != "png" for f in options.formats):
        from ..io.export import ExportSession

        exports = ExportSession(out_dir, options.formats, queries.labels, queries.has_background,
                                polygon_tolerance=options.polygon_tolerance)
        if ctx.is_main and any(s.kind == "video" for s in sources):
            console.print("[bold yellow]warning:[/] export formats other than png cover images; videos get "
                          "their frame masks, overlay video and JSON", highlight=False, soft_wrap=True)
    # Every rank plans (the same inputs, outputs and states) before any rank writes.
    plan = agreed(ctx, lambda: _Plan(sources, out_dir, options, exports))
    counts = RunCounts()
    refused = _refused(plan)
    if len(plan.sources) == 1 and refused:
        raise S2ClipError(refused[0])
    if ctx.is_main:
        for message in refused:
            counts.failed += 1
            counts.failures.append(message)
            console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    todo = plan.todo()
    skipped = [s for s in plan.sources if plan.state[s.path][0] == "complete" and not options.overwrite]
    share = split_inputs(todo, skipped, ctx.rank, ctx.world_size)
    seg = _segmenter(ctx, config, classes, background, explicit, console, todo, share)
    start = time.perf_counter()
    _segment_share(ctx, plan, share, seg, queries, options, console, out, record_config, exports, counts,
                   show_progress=len(plan.sources) > 1 or any(s.kind == "video" for s in todo), total=len(todo))
    totals = sum_counts(ctx, counts.done, counts.skipped, counts.failed, time.perf_counter() - start)
    merge_failed, merge_s = 0, 0.0
    if exports is not None and (totals.done or totals.skipped):
        message, merge_s = merge_run_files(ctx, exports, console)
        if message is not None:
            counts.failures.append(message)
        merge_failed = int(ctx.all_reduce_sum(np.array([message is not None], dtype=np.int64))[0])
    return RunCounts(totals.done, totals.skipped, totals.failed + merge_failed, counts.failures,
                     ranks=ctx.world_size, seconds=totals.seconds, merge_seconds=merge_s)


def _segmenter(ctx: DistContext, config: SegmenterConfig, classes: list[list[str]], background: list[str] | None,
               explicit: dict[str, Any] | None, console: Console, todo: list[Source], share: Share
               ) -> Segmenter | None:
    """The models of this process, when it has inputs to segment. Under several ranks, rank 0 first
    fetches any missing weights while the others wait; a rank that cannot build its models stops
    every rank."""
    if not todo:
        return None
    config = method_config(config, config.method, None, explicit)
    if ctx.is_distributed:
        prefetch_weights(config.clip, config.vfm if get_method(config.method).vfm is not None else None, config.sam,
                         sd_name=SD_MODEL if config.sd else None, mode=config.models, paths=config.weights,
                         offline=config.offline, group=ctx)

    def build() -> Segmenter | None:
        if not share.todo:
            return None
        status = console.status("loading models and embedding class names…") if ctx.is_main else nullcontext()
        with status, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return Segmenter.build(config, classes, background)

    return agreed(ctx, build, long_wait=True)


def _segment_share(ctx: DistContext, plan: _Plan, share: Share, seg: Segmenter | None, queries: ClassQueries,
                   options: SegmentOptions, console: Console, out: Console, record_config: dict[str, Any] | None,
                   exports: Any, counts: RunCounts, *, show_progress: bool, total: int) -> None:
    """This process's share, in input order: images in batches, videos, skipped images read back for
    the run-level files. Under several ranks a `ClockWatch` carries failures and progress; the
    share ends when every rank's has."""
    todo, skipped = set(share.todo), set(share.skipped)
    watch = ctx.clock_watch(RESUME_HINT).start()
    try:
        note = noted_on_interrupt(lambda: f"{counts.summary()}; rerun the same command to continue (finished "
                                  "inputs are skipped)")
        with note, progress_bar(console, disable=not (show_progress and ctx.is_main)) as progress:
            run = _Run(plan, seg, queries, options, console, out, progress, record_config, exports)
            run.counts = counts
            if ctx.is_distributed:
                run.watch = watch
                run.all_task = progress.add_task(f"inputs ({ctx.world_size} ranks)", total=total) if total else None
            elif any(s.kind == "image" for s in share.todo):
                run.image_task = progress.add_task("images", total=sum(s.kind == "image" for s in share.todo))
            pending: list[Source] = []
            for source in plan.sources:
                if source in skipped:
                    counts.skipped += 1
                    run.add_existing(source)
                    run.checkpoint()  # (reading back thousands of masks is progress too)
                elif source in todo:
                    if source.kind == "image":
                        pending.append(source)
                    if pending and (source.kind == "video" or len(pending) >= options.batch):
                        run.images(pending)
                        pending = []
                    if source.kind == "video":
                        run.video(source)
            if pending:
                run.images(pending)
            watch.finish(run.show_all)
    except (PeerFailure, LostContact):
        raise  # nothing to tell the others: they know, or they are gone
    except BaseException:
        watch.abort()  # the other ranks stop within a second or two
        raise
