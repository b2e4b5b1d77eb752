"""What every command's parsing shares: one-line errors, the consoles, option types with their
choices, and `--config FILE` (TOML, or a results JSON's `config` block) as option defaults."""

from __future__ import annotations

import enum
import json
import os
import tomllib
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.exceptions import TyperException

from ..config import PRECISIONS
from ..data.presets import PRESETS
from ..errors import S2ClipError, one_line
from ..models.registry import CLIP_SPECS, SAM_SPECS, VFM_SPECS

console = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 2) -> None:
    """One red line on stderr, then exit with `code`."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and a non-zero exit (no traceback).

    Set S2CLIP_DEBUG=1 to see the traceback of unexpected errors."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except S2ClipError as exc:
            fail(one_line(exc))
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except (typer.Exit, typer.Abort, TyperException):
            raise
        except Exception as exc:  # noqa: BLE001 - last resort, keep it to one line
            if os.environ.get("S2CLIP_DEBUG"):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            fail(f"unexpected {type(exc).__name__}: {first} (set S2CLIP_DEBUG=1 for the traceback)", code=1)

    return wrapper


def warn_random(mode: str) -> None:
    if mode != "real":
        from ..models.factory import random_warning

        console.print(f"[bold yellow]warning:[/] {random_warning(mode)}", highlight=False)


# ------------------------------------------------------------------------------------- choices
def choices(name: str, values: list[str]) -> type[enum.Enum]:
    """A str Enum whose values are `values`: Typer lists them in --help and rejects anything else."""
    return enum.Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


ClipName = choices("ClipName", list(CLIP_SPECS))
VfmName = choices("VfmName", list(VFM_SPECS))
SamName = choices("SamName", list(SAM_SPECS))
PrecisionName = choices("PrecisionName", list(PRECISIONS))
CombineName = choices("CombineName", ["mean", "entropy"])
SamImplName = choices("SamImplName", ["optimized", "original"])
ModelsMode = choices("ModelsMode", ["real", "tiny", "random"])
DeviceName = choices("DeviceName", ["auto", "cpu", "cuda"])
PresetName = choices("PresetName", list(PRESETS))


def value(choice: Any) -> Any:
    """The plain value of a choice (enum member) or of anything else."""
    return choice.value if isinstance(choice, enum.Enum) else choice


def dataset_list(text: str | None, *, allow_all: bool = True) -> list[str]:
    """`voc21`, `voc21,ade20k` or `all` → preset names; a typo is rejected with the valid names."""
    if text is None:
        return []
    if allow_all and text.strip() == "all":
        return list(PRESETS)
    names = [d.strip() for d in text.split(",") if d.strip()]
    valid = ", ".join(PRESETS) + (", all" if allow_all else "")
    for name in names:
        if name not in PRESETS:
            raise typer.BadParameter(f"unknown dataset {name!r}; choose from: {valid}", param_hint="'--dataset'")
    if not names:
        raise typer.BadParameter(f"no dataset given; choose from: {valid}", param_hint="'--dataset'")
    return names


DATASETS_HELP = f"Preset(s), comma-separated, or all: {', '.join(PRESETS)}."

# Options shared by the commands that build models.
ClipOpt = Annotated[ClipName, typer.Option("--clip", help="CLIP backbone.")]
DeviceOpt = Annotated[DeviceName, typer.Option("--device", help="Where models run.")]
PrecisionOpt = Annotated[PrecisionName, typer.Option(
    "--precision", help="Backbone precision: auto (fp16 on CUDA, fp32 on the CPU), fp32, fp16 or bf16. Attention "
    "softmax, classification and SAM prompt decoding always run in fp32.")]
ModelsOpt = Annotated[ModelsMode, typer.Option("--models", help="real (checkpoints), tiny (small random, for tests) "
                                               "or random (full-size random, for timing).")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never download weights (also S2CLIP_OFFLINE=1).")]
LayersOpt = Annotated[str | None, typer.Option("--layers", help="CLIP layers to fuse, e.g. 6,8,10 or 6-10 "
                                               "(default: the deeper half, 6-10 for ViT-B/16).")]
CombineOpt = Annotated[CombineName, typer.Option("--combine", help="How per-layer cosine logits combine.")]
WeightsOpt = Annotated[Path | None, typer.Option(help="Explicit checkpoint file (overrides the search).")]
NoSamOpt = Annotated[bool, typer.Option("--no-sam", help="Skip the SAM post-processing.")]
SamOpt = Annotated[SamName, typer.Option(help="SAM model for post-processing.")]
SamImplOpt = Annotated[SamImplName, typer.Option(help="SAM refinement implementation.")]
NoCcaOpt = Annotated[bool, typer.Option("--no-cca", help="Ablation: one prompt per class.")]
NoBoxOpt = Annotated[bool, typer.Option("--no-box", help="Ablation: no box prompts.")]
NoMaskOpt = Annotated[bool, typer.Option("--no-mask", help="Ablation: no mask prompts.")]
NoPointOpt = Annotated[bool, typer.Option("--no-point", help="Ablation: no point prompts.")]
WindowBatchOpt = Annotated[int, typer.Option(help="Windows per forward pass (bounds memory).", min=1)]
SdOpt = Annotated[bool, typer.Option("--sd", help="CLIPer's Stable-Diffusion refinement of the class maps (before "
                                     "SAM; with --no-sam: SD alone). Needs the sd21_base weights.")]
SdThresholdOpt = Annotated[float | None, typer.Option(help="SD attention threshold (default: the dataset's — 0.1 "
                                                      "VOC, 0.35 Cityscapes, 0.2 otherwise; 0.2 for segment).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the SD noise (results repeat).")]


# ------------------------------------------------------------------------------------- --config
def read_config_file(path: Path) -> dict[str, Any]:
    """Option values from a TOML file, or from the `config` block of a results JSON s2clip wrote."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise S2ClipError(f"cannot read config {path}: {one_line(exc.strerror or exc)}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise S2ClipError(f"config {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: "
                          f"{one_line(exc)}") from None
    if isinstance(data.get("config"), dict):
        data = data["config"]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _load_config(ctx: typer.Context, param: Any, path: Path | None) -> Path | None:
    """Eager callback: the file's values become the defaults of this command's options."""
    if path is None or ctx.resilient_parsing:
        return path
    try:
        values = read_config_file(path)
    except S2ClipError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--config'") from None
    known = {p.name for p in ctx.command.params if p.name != "config"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise typer.BadParameter(f"{path} sets {', '.join(unknown)}, which `{ctx.info_name}` does not take",
                                 param_hint="'--config'")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="TOML file of option values (or a results JSON: its `config` block); options on the "
    "command line win.", callback=_load_config, is_eager=True)]


def config_record(ctx: typer.Context) -> dict[str, Any]:
    """This invocation's options as plain JSON values: the `config` block of results files, which
    `--config` accepts back."""
    from ..io.files import json_safe  # (numpy: not at start-up)

    return json_safe({name: value(v) if not isinstance(v, list) else [value(x) for x in v]
                      for name, v in ctx.params.items() if name != "config"})


def parse_layers(spec: str | None) -> list[int] | None:
    """`6,8,10` or `6-10` (or a mix) → sorted unique layer indices."""
    if spec is None or not spec.strip():
        return None
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise S2ClipError(f"bad --layers {spec!r}: use a comma list like 6,8,10 or a range like 6-10") from None
    if any(layer < 0 for layer in layers):
        raise S2ClipError(f"bad --layers {spec!r}: layers are non-negative block indices")
    return sorted(layers)
