"""`s2clip methods` and the `--method`/`--pamr` options of `segment`, `eval` and `bench-sam`:
parsing only; the work is in `commands/methods.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..methods import METHODS
from .common import ClipName, SamName, VfmName, choices, out, user_errors

MethodName = choices("MethodName", list(METHODS))
MethodOrAll = choices("MethodOrAll", [*METHODS, "all"])

MethodOpt = Annotated[MethodName, typer.Option(
    "--method", help="Training-free method (see `s2clip methods`): its attention, layers, VFM, post-processing and "
    "protocol; options given explicitly override its values.")]
MethodOrAllOpt = Annotated[MethodOrAll, typer.Option(
    "--method", help="Training-free method (see `s2clip methods`), or all: every method into <work-dir>/<method>/ "
    "plus comparison.md/json. Its protocol on each dataset applies; options given explicitly override it.")]
# Options whose default is the method's value: None = not given.
MethodVfmOpt = Annotated[VfmName | None, typer.Option(
    "--vfm", help="VFM for proxy attention (default: the method's; dino_vitb8 for s2clip and proxyclip, dino_vitb16 "
    "for trident).")]
MethodSamOpt = Annotated[SamName | None, typer.Option(
    "--sam", help="SAM model for post-processing (default vit_b, for the methods that use SAM; given explicitly, SAM "
    "prompt refinement is added to any method).")]
MethodClipOpt = Annotated[ClipName | None, typer.Option(
    "--clip", help="CLIP backbone (default: the method's; ViT-B/16, MetaCLIP-B/16 for corrclip).")]
# CorrCLIP's class-agnostic masks. Not `--masks`: `eval --masks` is the generic dataset's label folder.
InstanceMasksOpt = Annotated[Path | None, typer.Option(
    "--instance-masks", help="corrclip: folder of pre-generated class-agnostic masks, <image stem>.npz holding an "
    "integer instance_mask array at the image's size (CorrCLIP's published region masks), instead of SAM 2's "
    "generator.")]
MaskPointsOpt = Annotated[int | None, typer.Option(
    "--mask-points", min=1, max=256, help="corrclip: points per side of SAM 2's mask generator (default 8, as "
    "CorrCLIP's code; its table's masks used 32).")]
PamrOpt = Annotated[bool | None, typer.Option(
    "--pamr/--no-pamr", help="PAMR on the logits before classification (default: the method's; on for naclip).")]


def given(**options: Any) -> dict[str, Any]:
    """The options the user set (value not None), for `commands.methods.method_config`."""
    return {name: v for name, v in options.items() if v is not None}


@user_errors
def methods() -> None:
    """List the training-free methods: attention strategy, residual/FFN, VFM, post-processing and the
    mIoU each reports (ViT-B/16)."""
    from ..commands.methods import methods_table

    out.print(methods_table(), highlight=False, soft_wrap=True, markup=False)
