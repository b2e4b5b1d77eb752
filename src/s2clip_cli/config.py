"""Presets and default hyper-parameters: one table for every benchmark, one for `segment`.

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


@dataclass(frozen=True)
class DatasetPreset:
    """Everything that fixes how one benchmark is evaluated."""

    name: str
    class_file: str  # file name under s2clip_cli/data/class_names/
    short_side: int  # mmseg Resize(scale=(2048, short_side), keep_ratio=True)
    prob_thd: float
    coarse_thresh: float
    reduce_zero_label: bool
    has_background: bool  # first class-name line is the background (several stuff names)
    num_classes: int
    crop: int = CROP
    stride: int = 224
    logit_scale: float = LOGIT_SCALE
    ignore_index: int = IGNORE_INDEX
    description: str = ""


PRESETS: dict[str, DatasetPreset] = {
    p.name: p
    for p in [
        DatasetPreset("voc21", "voc21.txt", 448, 0.2, 0.2, False, True, 21,
                      description="PASCAL VOC 2012 val, background + 20 classes"),
        DatasetPreset("voc20", "voc20.txt", 336, 0.0, 0.2, True, False, 20, stride=112,
                      description="PASCAL VOC 2012 val, 20 classes (background ignored)"),
        DatasetPreset("context60", "context60.txt", 576, 0.15, 0.15, False, True, 60,
                      description="PASCAL Context val, background + 59 classes"),
        DatasetPreset("context59", "context59.txt", 576, 0.0, 0.15, True, False, 59,
                      description="PASCAL Context val, 59 classes"),
        DatasetPreset("coco_object", "coco_object.txt", 448, 0.25, 0.25, False, True, 81,
                      description="COCO val2017 objects, background + 80 things"),
        DatasetPreset("coco_stuff164k", "coco_stuff164k.txt", 448, 0.0, 0.05, False, False, 171,
                      description="COCO-Stuff 164k val2017, 171 classes"),
        DatasetPreset("cityscapes", "cityscapes.txt", 688, 0.0, 0.10, False, False, 19,
                      description="Cityscapes val, 19 classes"),
        DatasetPreset("ade20k", "ade20k.txt", 576, 0.0, 0.05, True, False, 150,
                      description="ADE20K val, 150 classes"),
    ]
}


def get_preset(name: str) -> DatasetPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; choose one of: {', '.join(PRESETS)}") from None
