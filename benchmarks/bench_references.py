"""Per-image time of s2clip's ProxyCLIP, SCLIP, NACLIP and Trident beside each method's own reference
segmentor, on the same image, with the same seeded full-size random weights, fp32, on the CPU.

Ours: `Segmenter.coarse` (resize, windows, features, stitching, PAMR where the method has it,
classification; no SAM prompts) built with `method_config(<method>)`. Reference: the repository's own
segmentor class (`ProxyCLIPSegmentation`, SCLIP's `CLIPForSegmentation`, `NACLIP`, `Trident`) and its
`predict` on the mmseg-normalised image (Trident: without `--sam_refine`, its SAM guidance included),
built by its own `__init__` with the same window/threshold settings as ours. Runs alternate (reference,
ours, reference, ours, ...) after one warm-up of each, so machine-load drift hits both; the median is
reported. A fidelity check compares the two sides' class probabilities (max |diff|) and labels
(% equal pixels; "(n cl.)": how many classes the labels hold — random weights can leave one) on the
image, so both time the same work.

The references are read from ``--refs DIR`` (nothing of theirs is in this tree): DIR/ProxyCLIP
(mc-lan/ProxyCLIP), DIR/SCLIP (wangf3014/SCLIP), DIR/NACLIP (sinahmr/NACLIP), DIR/Trident
(YuHengsss/Trident) and DIR/dino (facebookresearch/dino: the torch.hub source ProxyCLIP and Trident load
DINO from, here with ``torch.hub.load(DIR/dino, ..., source="local", pretrained=False)``). Each is
imported from its own folder (its open_clip / clip / segment_anything forks shadow ours only while its
code is imported). What the benchmark substitutes, and nothing else:
- mmseg/mmengine are not needed: ``BaseSegmentor`` (an ``nn.Module``), ``SegDataPreProcessor``,
  ``PixelData`` and the ``MODELS`` registry are tiny stubs injected into ``sys.modules``; ``openpyxl``
  (ProxyCLIP/Trident ``myutils``, unused here), ``einops`` (ProxyCLIP's MAE branch, unused here) and
  ``pkg_resources`` (``clip.py``) are stubbed when missing. The normalisation their
  ``SegDataPreProcessor`` would do is done here, in the timed call.
- Weights: their ``create_model`` / ``clip.load`` / ``torch.hub.load`` / ``sam_model_registry`` are
  wrapped to build their own model classes without downloading, then load s2clip's random state dicts
  (open_clip CLIP, timm DINO, segment-anything SAM; strict, no renames needed).
- fp32: ``Tensor.half`` and ``Module.half`` are no-ops while reference code runs (they cast to fp16 for
  the GPU; SCLIP's/NACLIP's ``clip.load`` is fp32 on the CPU anyway).
- Text: their ``__init__`` encodes the names with one template (not 80; text encoding is not per-image),
  then ``query_features`` is set to s2clip's 80-template embeddings so both sides classify alike.
- Trident's ``predict`` gets the image as the PNG file its SAM branch re-reads (written losslessly).
Their code is otherwise untouched (e.g. ProxyCLIP/Trident register one more DINO forward hook per call).

Default settings are each method's `segment` defaults (``--preset`` for a benchmark's); ``--short-side``
sets the image's short side (the image is generated at the working size, so the resize is a no-op on
both sides). A method whose warm-up pair takes more than ``--slow`` seconds per image (ProxyCLIP's DINO
ViT-B/8, Trident's SAM guidance: 20-70 s on one thread) is timed with one repeat, which keeps the
default run under 10 minutes on a 2-core CPU (8m40s, models built included); the table and JSON record
the repeats each method got.

    python benchmarks/bench_references.py --refs DIR [--methods proxyclip,sclip,naclip,trident]
        [--repeats 3] [--slow 20] [--short-side 448] [--preset voc21] [--threads 1]
        [--json bench-results/references.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from s2clip_cli.commands.methods import method_config
from s2clip_cli.data.presets import PRESETS
from s2clip_cli.models.factory import LoadedModels, load_models, load_single
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig

METHODS = ("proxyclip", "sclip", "naclip", "trident")
REPO = {"proxyclip": "ProxyCLIP", "sclip": "SCLIP", "naclip": "NACLIP", "trident": "Trident"}
SEG_MEAN, SEG_STD = (122.771, 116.746, 104.094), (68.501, 66.632, 70.323)  # their SegDataPreProcessor
# Top-level module names the references' folders provide (or we stub): removed from sys.modules while a
# reference is imported, and put back afterwards, so that s2clip keeps the installed open_clip etc.
SHADOWED = frozenset({
    "open_clip", "clip", "segment_anything", "prompts", "myutils", "mae", "pamr", "seg_utils", "hubconf",
    "vision_transformer", "utils", "mmseg", "mmengine", "openpyxl", "pkg_resources", "einops",
})
CLASSES, BACKGROUND = [["cat"], ["dog"], ["person"]], ["sky", "wall"]


class NotRunnable(Exception):
    """A reference that cannot be built here; the message is the table's one-line reason."""


# ---------------------------------------------------------------------------------------------- stubs
def _stub_modules() -> dict[str, types.ModuleType]:
    """Minimal mmseg/mmengine (and, when missing, openpyxl/pkg_resources) for the references' imports."""

    class BaseSegmentor(nn.Module):
        def __init__(self, data_preprocessor: Any = None, init_cfg: Any = None) -> None:
            super().__init__()
            self.data_preprocessor = data_preprocessor

    class SegDataPreProcessor:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

    class PixelData:
        def __init__(self, **kwargs: Any) -> None:
            self.__dict__.update(kwargs)

    class Registry:
        def register_module(self, *args: Any, **kwargs: Any) -> Callable[[type], type]:
            return lambda cls: cls

    mods: dict[str, types.ModuleType] = {}

    def module(name: str, **attrs: Any) -> None:
        mods[name] = types.ModuleType(name)
        mods[name].__dict__.update(attrs)

    module("mmseg")
    module("mmseg.models")
    module("mmseg.models.segmentors", BaseSegmentor=BaseSegmentor)
    module("mmseg.models.data_preprocessor", SegDataPreProcessor=SegDataPreProcessor)
    module("mmseg.registry", MODELS=Registry())
    module("mmengine")
    module("mmengine.structures", PixelData=PixelData)
    if importlib.util.find_spec("openpyxl") is None:
        module("openpyxl")
    if importlib.util.find_spec("einops") is None:

        def rearrange(*args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("einops is stubbed by the benchmark (ProxyCLIP uses it for MAE only)")

        module("einops", rearrange=rearrange)
    if importlib.util.find_spec("pkg_resources") is None:
        import packaging.version

        module("pkg_resources", packaging=packaging)
    return mods


@contextmanager
def isolated_imports(*folders: Path) -> Iterator[None]:
    """Import from `folders` first, with the `SHADOWED` names free for them (and the stubs in place);
    afterwards sys.path and sys.modules are as before (the imported code keeps its own modules)."""
    saved_path = list(sys.path)
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in SHADOWED}
    sys.modules.update(_stub_modules())
    sys.path[:0] = [str(f) for f in folders]
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for k in [k for k in sys.modules if k.split(".")[0] in SHADOWED]:
            del sys.modules[k]
        sys.modules.update(saved)


def load_file(path: Path, name: str) -> types.ModuleType:
    """Import one file of a reference as module `name` (call inside `isolated_imports`)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise NotRunnable(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextmanager
def fp32_only() -> Iterator[None]:
    """``Tensor.half()`` and ``Module.half()`` leave dtypes alone (the references cast to fp16 for GPUs)."""
    tensor_half, module_half = torch.Tensor.half, nn.Module.half
    torch.Tensor.half = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.half = lambda self: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.half, nn.Module.half = tensor_half, module_half  # type: ignore[method-assign]


@contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise NotRunnable(f"{what}: s2clip's state dict does not load: {str(exc).splitlines()[0]}") from None
    return model.float().eval().requires_grad_(False)


# ----------------------------------------------------------------------------------- reference models
def openclip_fork_factory(fork_create: Callable[..., nn.Module], state: dict[str, torch.Tensor]) -> Callable:
    """Their ``create_model(model_type, pretrained='openai', precision='fp16')``: their fork's model
    class, QuickGELU as open_clip builds OpenAI weights, fp32, s2clip's CLIP weights."""

    def create_model(model_type: str, *args: Any, **kwargs: Any) -> nn.Module:
        model = fork_create(model_type, pretrained=None, precision="fp32", force_quick_gelu=True)
        return load_strict(model, state, "CLIP (open_clip fork)")

    return create_model


def dino_hub_loader(dino_dir: Path, state: dict[str, torch.Tensor]) -> Callable:
    """Their ``torch.hub.load('facebookresearch/dino:main', name)``: the hub entry from the local DINO
    repository, without the download, with s2clip's timm DINO weights (same key names)."""
    hub_load = torch.hub.load

    def load(repo: str, name: str, *args: Any, **kwargs: Any) -> nn.Module:
        model = hub_load(str(dino_dir), name, source="local", pretrained=False)
        return load_strict(model, state, f"DINO {name}")

    return load


def openai_clip_loader(clip_pkg: types.ModuleType, state: dict[str, torch.Tensor]) -> Callable:
    """Their ``clip.load(path, device, jit=False)`` on the CPU: ``build_model`` + ``float()`` (as
    ``clip.load`` does for CPU), then s2clip's weights again in fp32 (build_model's fp16 copy rounds)."""

    def load(*args: Any, **kwargs: Any) -> tuple[nn.Module, None]:
        model = clip_pkg.build_model(dict(state)).float()
        return load_strict(model, state, "CLIP (OpenAI clip fork)"), None

    return load


def names_file(folder: Path, seg: Segmenter, sep: str) -> Path:
    """The class-name file their `get_cls_idx` reads: one line per class, names joined by `sep`."""
    path = folder / f"names{len(sep)}.txt"
    path.write_text("\n".join(sep.join(names) for names in seg.queries.class_names) + "\n")
    return path


def finish_reference(ref: nn.Module, seg: Segmenter) -> nn.Module:
    """Checks the reference parsed our names alike, and gives it s2clip's text embeddings."""
    words = getattr(ref, "query_words", None)
    idx = [int(i) for i in ref.query_idx.tolist()]
    if idx != list(seg.queries.name_to_class) or (words is not None and list(words) != seg.queries.names):
        raise NotRunnable("the reference parsed the class names differently")
    ref.query_features = seg.text.detach().float().clone()
    ref.dtype = torch.float32
    return ref.eval()


def build_reference(method: str, refs: Path, seg: Segmenter, models: LoadedModels, tmp: Path) -> nn.Module:
    """The reference segmentor of `method`, configured as `seg`, on s2clip's weights."""
    cfg = seg.config
    root = refs / REPO[method]
    if not root.is_dir():
        raise NotRunnable(f"{root} not found")
    clip_state = models.clip.model.state_dict()
    slide_crop = 0 if cfg.whole_image else cfg.crop
    common = {"device": torch.device("cpu"), "prob_thd": cfg.prob_thd, "logit_scale": cfg.logit_scale,
              "slide_stride": cfg.stride, "slide_crop": slide_crop}
    one_template = [lambda c: f"a photo of a {c}."]
    with isolated_imports(root), fp32_only():
        if method in ("proxyclip", "trident"):
            dino = refs / "dino"
            if not (dino / "hubconf.py").is_file():
                raise NotRunnable(f"{dino}/hubconf.py not found (facebookresearch/dino, the torch.hub source)")
            file = "proxyclip_segmentor.py" if method == "proxyclip" else "trident.py"
            mod = load_file(root / file, f"_ref_{method}")
            vfm_state = models.vfm.model.state_dict()
            mod.create_model = openclip_fork_factory(mod.create_model, clip_state)
            mod.openai_imagenet_template = one_template
            with patched(torch.hub, "load", dino_hub_loader(dino, vfm_state)):
                if method == "proxyclip":
                    ref = mod.ProxyCLIPSegmentation("openai", "ViT-B/16", "dino", str(names_file(tmp, seg, "; ")),
                                                    beta=cfg.beta, gamma=cfg.gamma, **common)
                else:
                    sam_state = models.sam.state_dict()
                    registry = mod.sam_model_registry

                    def sam_builder(checkpoint: Any = None) -> nn.Module:
                        return load_strict(registry["vit_b"](checkpoint=None), sam_state, "SAM ViT-B")

                    mod.sam_model_registry = {"vit_b": sam_builder}
                    ref = mod.Trident("openai", "ViT-B/16", "dino", str(names_file(tmp, seg, "; ")),
                                      beta=cfg.beta, gamma=cfg.gamma, sam_refinement=False, pamr_steps=0,
                                      cos_fac=cfg.cos_fac, refine_neg_cos=cfg.refine_neg_cos,
                                      dataset_type="CityscapesDataset" if cfg.sam_halves else "PascalVOCDataset",
                                      **common)
        else:
            file = "clip_segmentor.py" if method == "sclip" else "naclip.py"
            mod = load_file(root / file, f"_ref_{method}")
            mod.openai_imagenet_template = one_template
            mod.clip.load = openai_clip_loader(mod.clip, clip_state)
            pamr = {"pamr_steps": cfg.pamr_iterations if cfg.pamr else 0, "pamr_stride": tuple(cfg.pamr_dilations)}
            names = str(names_file(tmp, seg, ", "))
            if method == "sclip":
                ref = mod.CLIPForSegmentation("ViT-B/16", names, area_thd=cfg.area_thd, **pamr, **common)
            else:
                ref = mod.NACLIP("ViT-B/16", names, arch="reduced", attn_strategy="naclip",
                                 gaussian_std=cfg.sigma, **pamr, **common)
    return finish_reference(ref, seg)


class Sample:
    """The mmseg data sample their `predict` reads (metainfo, img_path) and writes (set_data)."""

    def __init__(self, shape: tuple[int, int], img_path: str) -> None:
        self.img_path = img_path
        self.metainfo = {"ori_shape": shape, "img_shape": shape, "pad_shape": shape, "padding_size": [0, 0, 0, 0],
                         "img_path": img_path}
        self.data: dict[str, Any] = {}

    def set_data(self, data: dict[str, Any]) -> None:
        self.data = data


def run_reference(ref: nn.Module, image: np.ndarray, img_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [H, W], class probabilities [C, H, W]) from the reference's `predict`, with the
    normalisation of its SegDataPreProcessor (timed with it; the image is already at the working size)."""
    mean, std = torch.tensor(SEG_MEAN).view(1, 3, 1, 1), torch.tensor(SEG_STD).view(1, 3, 1, 1)
    with torch.no_grad(), fp32_only():
        inputs = (torch.from_numpy(image).permute(2, 0, 1)[None].float() - mean) / std
        sample = Sample(image.shape[:2], img_path)
        ref.predict(inputs, [sample])
    return sample.data["pred_sem_seg"].data[0], sample.data["seg_logits"].data


def run_ours(seg: Segmenter, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return seg.coarse(image, image.shape[:2])


# ------------------------------------------------------------------------------------------ benchmark
def make_image(short_side: int, seed: int = 0) -> np.ndarray:
    """A 4:3-ish RGB image (short side x 19/14 of it, as 448x608) of smooth colour regions plus noise."""
    h, w = short_side, short_side * 19 // 14
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(6, 8, 3)).astype(np.float32)
    smooth = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def fidelity(ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    (our_labels, our_probs), (ref_labels, ref_probs) = ours, theirs
    ref_probs = ref_probs.float()
    if ref_probs.shape != our_probs.shape:  # (never expected: same size, same classes)
        ref_probs = F.interpolate(ref_probs[None], size=our_probs.shape[-2:], mode="bilinear")[0]
    return {"max_abs_prob_diff": float((our_probs.float() - ref_probs).abs().max()),
            "labels_equal_pct": float((our_labels.cpu() == ref_labels.cpu()).float().mean() * 100),
            "classes_predicted": int(our_labels.unique().numel())}


def reference_commit(folder: Path) -> str | None:
    """The commit of the reference checkout `folder` (None when `folder` is not itself a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != folder.resolve():
        return None
    return lines[1][:12]


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": threads,
            "cpu": cpu, "logical_cpus": torch.multiprocessing.cpu_count(), "platform": platform.platform()}


def models_for(method: str, methods: list[str], cache: dict[str, Any]) -> LoadedModels:
    """Full-size random ViT-B/16 (+ the method's VFM, + SAM ViT-B for Trident), each seeded as
    `load_models` seeds it; every model is built once and shared by the methods that use it."""
    if "base" not in cache:
        cache["base"] = load_models("ViT-B/16", None, "vit_b" if "trident" in methods else None, mode="random",
                                    device="cpu")
    base: LoadedModels = cache["base"]
    vfm = {"proxyclip": "dino_vitb8", "trident": "dino_vitb16"}.get(method)
    if vfm is not None and vfm not in cache:
        cache[vfm] = load_single("vfm", vfm, mode="random", device="cpu")
    return dataclasses.replace(base, vfm=cache[vfm] if vfm else None, sam=base.sam if method == "trident" else None)


def bench_method(method: str, methods: list[str], args: argparse.Namespace, cache: dict[str, Any], tmp: Path,
                 console: Console) -> dict[str, Any]:
    base = SegmenterConfig(models="random", sam="vit_b", device="cpu", precision="fp32")
    preset = PRESETS[args.preset] if args.preset else None
    explicit = {"short_side": args.short_side} if args.short_side else {}
    cfg = method_config(base, method, preset, explicit)
    if method != "trident":
        cfg = dataclasses.replace(cfg, sam=None)
    cfg = dataclasses.replace(cfg, sam_refine=False)
    with console.status(f"{method}: building models…"):
        models = models_for(method, methods, cache)
        seg = Segmenter.build(cfg, CLASSES, BACKGROUND, models=models)
    image = make_image(cfg.short_side)
    img_path = tmp / f"image_{image.shape[0]}x{image.shape[1]}.png"
    cv2.imwrite(str(img_path), np.ascontiguousarray(image[..., ::-1]))  # Trident re-reads the file (cv2)
    row: dict[str, Any] = {"method": method, "reference_repo": REPO[method],
                           "reference_commit": reference_commit(Path(args.refs) / REPO[method]) if args.refs else None,
                           "image": list(image.shape[:2]),
                           "short_side": cfg.short_side,
                           "windows": "whole image" if cfg.whole_image else f"{cfg.crop}/{cfg.stride}"}
    ref = None
    try:
        with console.status(f"{method}: building the reference…"):
            ref = build_reference(method, Path(args.refs), seg, models, tmp) if args.refs else None
        if ref is None:
            raise NotRunnable("--refs not given")
    except Exception as exc:  # noqa: BLE001 - any failure of foreign code: one line in the table
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not isinstance(exc, NotRunnable):
            reason = f"{type(exc).__name__}: {reason}"
        row["reference_error"] = reason[:200]
    ours_times, ref_times = [], []
    ref_out = our_out = None
    with console.status(f"{method}: warm-up…"):
        if ref is not None:
            try:
                ref_warm, ref_out = timed(lambda: run_reference(ref, image, str(img_path)))
            except Exception as exc:  # noqa: BLE001
                row["reference_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                ref = None
        our_warm, our_out = timed(lambda: run_ours(seg, image))
    warm = our_warm if ref is None else (our_warm + ref_warm) / 2
    repeats = 1 if warm > args.slow else args.repeats
    for i in range(repeats):
        with console.status(f"{method}: run {i + 1}/{repeats}…"):
            if ref is not None:
                t, ref_out = timed(lambda: run_reference(ref, image, str(img_path)))
                ref_times.append(t)
            t, our_out = timed(lambda: run_ours(seg, image))
            ours_times.append(t)
    row["repeats"] = repeats
    row["s2clip_s"] = statistics.median(ours_times)
    row["s2clip_runs_s"] = ours_times
    if ref is not None:
        row["reference_s"] = statistics.median(ref_times)
        row["reference_runs_s"] = ref_times
        row["ratio"] = row["reference_s"] / row["s2clip_s"]
        row.update(fidelity(our_out, ref_out))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", type=Path, default=None,
                        help="folder holding ProxyCLIP/, SCLIP/, NACLIP/, Trident/ and dino/ (their repositories)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow", type=float, default=20.0,
                        help="seconds per image above which a method (warm-up) is timed with one repeat")
    parser.add_argument("--short-side", type=int, default=None,
                        help="image short side (default: the method's protocol)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a benchmark's protocol instead of `segment`'s")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("bench-results/references.json"))
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    warnings.simplefilter("ignore")
    console = Console(width=None if sys.stdout.isatty() else 200)
    cache: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-refs-") as tmp:
        for method in methods:
            rows.append(bench_method(method, methods, args, cache, Path(tmp), console))
            r = rows[-1]
            console.print(f"{method}: s2clip {r['s2clip_s']:.2f} s, reference "
                          + (f"{r['reference_s']:.2f} s" if "reference_s" in r else r.get("reference_error", "")))

    info = machine_info(torch.get_num_threads())
    table = Table(title=f"Per-image time, fp32 CPU, {info['threads']} thread(s), full-size random ViT-B/16 "
                        f"(+ DINO / SAM ViT-B), median after one warm-up ({info['cpu']}, torch {info['torch']})")
    for col in ("method", "image", "windows", "runs", "reference s/img", "s2clip s/img", "reference/s2clip",
                "probs max |diff|", "labels equal"):
        table.add_column(col, justify="left" if col in ("method", "windows") else "right")
    for r in rows:
        size = f"{r['image'][0]}x{r['image'][1]}"
        if "reference_s" in r:
            table.add_row(r["method"], size, r["windows"], str(r["repeats"]), f"{r['reference_s']:.2f}",
                          f"{r['s2clip_s']:.2f}", f"{r['ratio']:.2f}", f"{r['max_abs_prob_diff']:.1e}",
                          f"{r['labels_equal_pct']:.2f}% ({r['classes_predicted']} cl.)")
        else:
            table.add_row(r["method"], size, r["windows"], str(r["repeats"]),
                          f"reference not runnable: {r['reference_error']}", f"{r['s2clip_s']:.2f}", "–", "–", "–")
    console.print(table)
    payload = {"machine": info, "precision": "fp32", "device": "cpu", "preset": args.preset,
               "short_side": args.short_side, "repeats": args.repeats, "slow_seconds": args.slow,
               "refs": str(args.refs) if args.refs else None, "classes": CLASSES, "background": BACKGROUND,
               "methods": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
