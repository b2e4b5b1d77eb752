"""Driver of `s2clip segment`: segment images and videos, writing each input's outputs as one set.

Per image ``NAME`` (see `io.sources` for how names mirror sub-folders) under the output folder:
``NAME_mask.png``, ``NAME_overlay.png`` (format ``png``), the files of the other export formats, and
``NAME.json`` last — the record whose presence marks the set complete. Per video: the frame masks in
``NAME_frames/``, ``NAME_overlay.mp4`` and ``NAME.json``. A rerun skips inputs whose set is
complete (``--overwrite`` redoes them); an input whose outputs exist only in part is refused
without ``--overwrite``; an output that would replace an input is refused always. A bad input is
reported on one line and the others still run.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from ..config import DEFAULT_BACKGROUND
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
from ..models.precision import dtype_name
from ..pipeline.segmenter import SegmentationResult, Segmenter, SegmenterConfig
from ..pipeline.text import build_queries
from .inputs import progress_bar
from .methods import method_config

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
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        skipped = f"skipped {self.skipped}" + (" (outputs exist; --overwrite redoes them)" if self.skipped else "")
        return f"done {self.done}, {skipped}, failed {self.failed}"


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
    """One `segment` run: the segmenter, the outputs, the counts and the messages."""

    def __init__(self, plan: _Plan, seg: Segmenter, options: SegmentOptions, console: Console, out: Console,
                 progress: Progress, record_config: dict[str, Any] | None, exports: Any) -> None:
        self.plan = plan
        self.seg = seg
        self.options = options
        self.console = console
        self.out = out
        self.progress = progress
        self.record_config = record_config
        self.exports = exports
        self.labels = seg.queries.labels
        self.palette = make_palette(len(self.labels), seg.queries.has_background)
        self.counts = RunCounts()
        self.image_task: Any = None
        self.single = len(plan.sources) == 1  # one input: its error is raised, not reported

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
            self.progress.advance(self.image_task, len(sources))
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
        self.progress.advance(self.image_task, len(sources))

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


def _refuse_partial(plan: _Plan, counts: RunCounts, console: Console) -> None:
    """Without --overwrite, an input whose outputs exist only in part is refused (they may be
    another run's or the user's files)."""
    for source in plan.sources:
        state, existing = plan.state[source.path]
        if state == "partial" and not plan.options.overwrite:
            message = (f"{source.path}: {existing[0]} exists but the outputs of this input are not a complete "
                       "set; --overwrite replaces them")
            counts.failed += 1
            counts.failures.append(message)
            console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def run_segment(sources: list[Source], classes: list[list[str]], background: list[str] | None,
                config: SegmenterConfig, out_dir: Path, *, console: Console, out: Console,
                options: SegmentOptions = SegmentOptions(), record_config: dict[str, Any] | None = None,
                explicit: dict[str, Any] | None = None) -> RunCounts:
    """Segment every source with `config.method` (its own defaults, `explicit` options on top) and
    return the counts. With one input, its failure is raised; with several, each is reported on one
    line and the others still run. Models are built only when something is left to segment."""
    if options.batch < 1 or options.every < 1:
        raise S2ClipError("--batch and --every must be at least 1")
    queries = build_queries(classes, background)
    mask_png_kind(len(queries.labels))  # too many classes: refused before any model is built
    exports = None
    if any(f != "png" for f in options.formats):
        from ..io.export import ExportSession

        exports = ExportSession(out_dir, options.formats, queries.labels, queries.has_background,
                                polygon_tolerance=options.polygon_tolerance)
        if any(s.kind == "video" for s in sources):
            console.print("[bold yellow]warning:[/] export formats other than png cover images; videos get "
                          "their frame masks, overlay video and JSON", highlight=False, soft_wrap=True)
    plan = _Plan(sources, out_dir, options, exports)
    counts = RunCounts()
    _refuse_partial(plan, counts, console)
    if len(plan.sources) == 1 and counts.failed:
        raise S2ClipError(counts.failures[0])
    todo = set(plan.todo())
    skipped = {s for s in plan.sources if s not in todo and plan.state[s.path][0] == "complete"}
    seg = None
    if todo or (exports is not None and skipped):
        config = method_config(config, config.method, None, explicit)
        with console.status("loading models and embedding class names…"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            seg = Segmenter.build(config, classes, background)
    images = [s for s in plan.sources if s in todo and s.kind == "image"]
    show_progress = len(plan.sources) > 1 or any(s.kind == "video" for s in todo)
    with noted_on_interrupt(lambda: f"{counts.summary()}; rerun the same command to continue (finished inputs are "
                            "skipped)"), progress_bar(console, disable=not show_progress) as progress:
        run = None if seg is None else _Run(plan, seg, options, console, out, progress, record_config, exports)
        if run is not None:
            run.counts = counts
            run.image_task = progress.add_task("images", total=len(images)) if images else None
        pending: list[Source] = []
        for source in plan.sources:
            if source in skipped:
                counts.skipped += 1
                if run is not None:
                    run.add_existing(source)
            elif source in todo and run is not None:
                if source.kind == "image":
                    pending.append(source)
                if pending and (source.kind == "video" or len(pending) >= options.batch):
                    run.images(pending)
                    pending = []
                if source.kind == "video":
                    run.video(source)
        if pending and run is not None:
            run.images(pending)
    if exports is not None and (counts.done or counts.skipped):
        try:
            exports.finish()
        except S2ClipError as exc:
            counts.failed += 1
            counts.failures.append(one_line(exc))
            console.print(f"[bold red]error:[/] {escape(one_line(exc))}", highlight=False, soft_wrap=True)
    return counts
