"""What every command's parsing shares: one-line errors, the consoles, option types with their
choices, and `--config FILE` (TOML, or a results JSON's `config` block) as option defaults."""

from __future__ import annotations

import enum
import json
import math
import os
import stat
import tomllib
import typing
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.exceptions import TyperException

from ..config import PRECISIONS
from ..data.presets import PRESETS
from ..errors import S2ClipError, interrupt_exit_code, interrupt_message, one_line
from ..models.registry import CLIP_SPECS, SAM_SPECS, VFM_SPECS

console = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 2) -> None:
    """One red line on stderr, then exit with `code`."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and a non-zero exit (no traceback); an
    interruption into ``error: interrupted`` (with the notes the driver added on where it stopped)
    and exit 130 (Ctrl-C) or 143 (SIGTERM).

    Set S2CLIP_DEBUG=1 to see the traceback of unexpected errors."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except S2ClipError as exc:
            fail(one_line(exc))
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (`errors.Terminated`): 130 / 143
            fail(interrupt_message(exc), code=interrupt_exit_code(exc))
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

        console.print(f"[bold yellow]warning:[/] {random_warning(mode)}", highlight=False, soft_wrap=True)


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
CONFIG_MAX_BYTES = 4 << 20  # a config (or a results JSON) is small; anything bigger is not one

# String options that are lists on the command line, and how a config file's list joins into that
# string: (separator, what one item is). `classes` items may also be lists of synonyms.
LIST_OPTIONS: dict[str, tuple[str, str]] = {
    "classes": (",", "name"), "background": ("; ", "name"), "layers": (",", "int"), "dataset": (",", "name"),
    "sources": (",", "name"), "strategies": (",", "name"), "vfm": (",", "name"), "point": (",", "int"),
}


def _read_config_text(path: Path) -> str:
    """The file's text: a regular file (no FIFO, device or folder) of at most `CONFIG_MAX_BYTES`."""
    try:
        st = path.stat()
    except OSError as exc:
        raise S2ClipError(f"cannot read config {path}: {one_line(exc.strerror or exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise S2ClipError(f"config {path} is not a regular file")
    if st.st_size > CONFIG_MAX_BYTES:
        raise S2ClipError(f"config {path} is {st.st_size} bytes; a config file is at most {CONFIG_MAX_BYTES} bytes")
    try:
        with open(path, "rb") as fh:
            data = fh.read(CONFIG_MAX_BYTES + 1)
    except OSError as exc:
        raise S2ClipError(f"cannot read config {path}: {one_line(exc.strerror or exc)}") from None
    if len(data) > CONFIG_MAX_BYTES:
        raise S2ClipError(f"config {path} is larger than {CONFIG_MAX_BYTES} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise S2ClipError(f"config {path} is not UTF-8 text (byte {exc.start})") from None


def _kind(obj: Any) -> str:
    """A config value's type in the words of TOML/JSON."""
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    if isinstance(obj, int):
        return "an integer"
    if isinstance(obj, float):
        return "a number"
    if isinstance(obj, str):
        return "a string"
    if isinstance(obj, list):
        return "a list"
    if isinstance(obj, dict):
        return "a table"
    return f"a {type(obj).__name__}"


def read_config_file(path: Path) -> dict[str, Any]:
    """Option values (not yet checked against a command) from a TOML file, or from the `config`
    block of a results JSON s2clip wrote. `S2ClipError` (one line naming the file) when the file is
    unreadable, not a regular file, too big, not UTF-8, not valid TOML/JSON or not a table of values."""
    text = _read_config_text(path)
    is_json = path.suffix.lower() == ".json"
    try:
        data = json.loads(text) if is_json else tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # (tomllib.TOMLDecodeError is a ValueError)
        reason = "nested too deeply" if isinstance(exc, RecursionError) else one_line(exc)
        raise S2ClipError(f"config {path} is not valid {'JSON' if is_json else 'TOML'}: {reason}") from None
    if not isinstance(data, dict):
        raise S2ClipError(f"config {path} holds {_kind(data)}; expected a table of option values "
                          "(key = value lines, or a JSON object)")
    if "config" in data:  # a results file: its `config` block holds the options
        data = data["config"]
        if not isinstance(data, dict):
            raise S2ClipError(f"config {path}: its `config` block is {_kind(data)}; expected a table of option values")
    values: dict[str, Any] = {}
    for key, item in data.items():
        name = str(key).replace("-", "_")
        if name in values:
            raise S2ClipError(f"config {path} sets {name} twice (as {name!r} and {name.replace('_', '-')!r})")
        values[name] = item
    return values


def _join_list(name: str, items: list[Any]) -> str:
    """A config list for a list-valued string option, as the command line spells it; `ValueError`
    saying what was expected."""
    sep, item_kind = LIST_OPTIONS[name]
    mark = sep.strip()
    if item_kind == "int":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise ValueError("a list of integers")
        return sep.join(str(v) for v in items)
    parts = []
    for v in items:
        if name == "classes" and isinstance(v, list):  # one class as a list of synonyms
            if not v or not all(isinstance(s, str) and s.strip() and "," not in s and ";" not in s for s in v):
                raise ValueError("a list of class names, each a name or a list of synonyms (no ',' or ';' inside "
                                 "a name)")
            parts.append("; ".join(v))
            continue
        if not isinstance(v, str) or mark in v:
            raise ValueError(f"a list of names (strings without '{mark}' inside)" if name != "classes" else
                             "a list of class names, each a name or a list of synonyms (no ',' inside a name)")
        parts.append(v)
    return sep.join(parts)


def _expected(param: Any) -> str:
    """What a parameter takes, in words."""
    annotation = param.type_descriptor.annotation
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in annotation)
    if typing.get_origin(annotation) is list:
        return "a list of paths"
    words = {bool: "true or false", int: "an integer", float: "a number", Path: "a path (string)"}
    text = words.get(annotation, "a string")
    if param.name in LIST_OPTIONS and annotation is str:
        text += " or a list"
    bounds = [f">= {param.min}" if param.min is not None else "", f"<= {param.max}" if param.max is not None else ""]
    return text + (f" ({' and '.join(b for b in bounds if b)})" if any(bounds) else "")


def check_config_value(param: Any, obj: Any) -> Any:
    """`obj` from a config file as the value of `param` (what the command line would give it), or
    `ValueError` when its type does not fit. None (JSON null) means the option's default."""
    if obj is None:
        return None
    annotation = param.type_descriptor.annotation
    if typing.get_origin(annotation) is list:  # a variadic argument (input paths)
        items = [obj] if isinstance(obj, str) else obj
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError
        return items
    if annotation is bool:
        if not isinstance(obj, bool):
            raise ValueError
        return obj
    if annotation in (int, float):
        if isinstance(obj, bool) or not isinstance(obj, int if annotation is int else int | float):
            raise ValueError
        if isinstance(obj, float) and not math.isfinite(obj):
            raise ValueError
        if (param.min is not None and obj < param.min) or (param.max is not None and obj > param.max):
            raise ValueError
        return obj
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if not isinstance(obj, str) or obj not in {m.value for m in annotation}:
            raise ValueError
        return obj
    if annotation is str and param.name in LIST_OPTIONS:
        if isinstance(obj, list):
            return _join_list(param.name, obj)
        if LIST_OPTIONS[param.name][1] == "int" and isinstance(obj, int) and not isinstance(obj, bool):
            return str(obj)
    if not isinstance(obj, str):
        raise ValueError
    return obj


def config_defaults(path: Path, values: dict[str, Any], params: list[Any], command: str) -> dict[str, Any]:
    """The file's values checked against the command's parameters: `S2ClipError` naming the file and
    the first unknown key, or the key whose value does not fit and what it takes."""
    by_name = {p.name: p for p in params if p.name != "config"}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise S2ClipError(f"config {path} sets {', '.join(unknown)}, which `{command}` does not take")
    checked = {}
    for name, obj in values.items():
        param = by_name[name]
        try:
            checked[name] = check_config_value(param, obj)
        except ValueError as exc:
            expected = str(exc) or _expected(param)
            shown = one_line(json.dumps(obj, default=str))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise S2ClipError(f"config {path}: {name} is {_kind(obj)} ({shown}); expected {expected}") from None
    return {name: v for name, v in checked.items() if v is not None}


def _load_config(ctx: typer.Context, param: Any, path: Path | None) -> Path | None:
    """Eager callback: the file's values, checked, become the defaults of this command's options."""
    if path is None or ctx.resilient_parsing:
        return path
    try:
        values = config_defaults(path, read_config_file(path), list(ctx.command.params), str(ctx.info_name))
    except S2ClipError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--config'") from None
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="TOML file of option values (or a results JSON: its `config` block); options on the "
    "command line win. Lists are accepted where the option takes one (classes = [\"cat\", [\"dog\", "
    "\"puppy\"]], layers = [6, 8, 10]).", callback=_load_config, is_eager=True)]


def config_record(ctx: typer.Context) -> dict[str, Any]:
    """This invocation's options as plain JSON values: the `config` block of results files, which
    `--config` accepts back."""
    from ..io.files import json_safe  # (numpy: not at start-up)

    return json_safe({name: value(v) if not isinstance(v, list) else [value(x) for x in v]
                      for name, v in ctx.params.items() if name != "config"})


MAX_LAYER = 1023  # far deeper than any CLIP; bounds what a range like 0-1000000000 would allocate


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
                if hi > MAX_LAYER:
                    raise S2ClipError(f"bad --layers {spec!r}: layers are block indices in 0..{MAX_LAYER}")
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise S2ClipError(f"bad --layers {spec!r}: use a comma list like 6,8,10 or a range like 6-10") from None
    if any(layer < 0 or layer > MAX_LAYER for layer in layers):
        raise S2ClipError(f"bad --layers {spec!r}: layers are block indices in 0..{MAX_LAYER}")
    return sorted(layers)
