"""Default hyper-parameters of the method (the benchmarks' table is `data.presets`).

Values follow the protocol the published tables share (Trident's / ProxyCLIP's MMSegmentation
configs); see ``shared/notes/reference-semantics.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Proxy attention (DESIGN step 4).
BETA = 1.2
GAMMA = 3.0
# Classification (DESIGN step 5).
LOGIT_SCALE = 40.0
# Sliding windows.
CROP = 336
SEGMENT_STRIDE = 112
SEGMENT_SHORT_SIDE = 448
MAX_LONG_SIDE = 2048
IGNORE_INDEX = 255
# `--precision` (models.precision maps them to dtypes; here so that parsing needs no torch).
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")

# Stuff names queried for the background class when `segment` keeps a background
# (the with-background benchmarks' convention: the class-name file's first line).
DEFAULT_BACKGROUND = (
    "sky; wall; tree; wood; grass; road; sea; river; mountain; sands; desk; bed; building; cloud; "
    "lamp; door; window; wardrobe; ceiling; shelf; curtain; stair; floor; hill; rail; fence"
)


@dataclass(frozen=True)
class RefineConfig:
    """SAM post-processing thresholds (DESIGN step 6)."""

    coarse_thresh: float = 0.2
    min_area: int = 225
    mask_coeff: float = 0.005
    iou_thresh: float = 0.8
    impl: str = "optimized"
    use_cca: bool = True
    use_box: bool = True
    use_mask: bool = True
    use_point: bool = True
