"""The one table of benchmarks: how each is laid out on disk and how it is evaluated.

A `DatasetPreset` carries everything about one benchmark: its folder layout (MMSegmentation's),
its usual sub-folder under a data root, its class-name file, the label mapping, and the protocol
(resize scale, windows, thresholds) that the published tables share (Trident's / ProxyCLIP's
configs; see ``shared/notes/reference-semantics.md``). To add a benchmark, add a row here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CROP, IGNORE_INDEX, LOGIT_SCALE
from ..errors import S2ClipError

CUSTOM = "custom"


@dataclass(frozen=True)
class Layout:
    """Where a benchmark keeps its images and labels, relative to its data root."""

    title: str  # e.g. "VOC2012 layout"
    img_dir: str
    ann_dir: str
    img_suffix: str
    seg_suffix: str
    split_file: str | None = None  # ids listed here (split layouts); None: scan img_dir

    def required(self) -> list[str]:
        """The entries a data root must hold, folders with a trailing slash."""
        out = [self.img_dir + "/", self.ann_dir + "/"]
        return out + ([self.split_file] if self.split_file else [])

    def describe(self) -> str:
        if self.split_file:
            return (f"{self.title}: {self.img_dir}/<id>{self.img_suffix}, {self.ann_dir}/<id>{self.seg_suffix}, "
                    f"ids in {self.split_file}")
        return (f"{self.title}: {self.img_dir}/**/*{self.img_suffix}, "
                f"{self.ann_dir}/**/*{self.seg_suffix}")


VOC_LAYOUT = Layout("VOC2012 layout", "JPEGImages", "SegmentationClass", ".jpg", ".png",
                    "ImageSets/Segmentation/val.txt")
CONTEXT_LAYOUT = Layout("Pascal Context layout (VOC2010)", "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
                        "ImageSets/SegmentationContext/val.txt")
COCO_OBJECT_LAYOUT = Layout("COCO-Object layout", "images/val2017", "annotations/val2017", ".jpg",
                            "_instanceTrainIds.png")
COCO_STUFF_LAYOUT = Layout("COCO-Stuff 164k layout", "images/val2017", "annotations/val2017", ".jpg",
                           "_labelTrainIds.png")
CITYSCAPES_LAYOUT = Layout("Cityscapes layout", "leftImg8bit/val", "gtFine/val", "_leftImg8bit.png",
                           "_gtFine_labelTrainIds.png")
ADE_LAYOUT = Layout("ADEChallengeData2016 layout", "images/validation", "annotations/validation", ".jpg", ".png")
CUSTOM_LAYOUT = Layout("images + masks folders", "", "", "", "")


@dataclass(frozen=True)
class DatasetPreset:
    """Everything that fixes where one benchmark lives and how it is evaluated."""

    name: str
    class_file: str  # file name under s2clip_cli/data/class_names/
    short_side: int  # mmseg Resize(scale=(2048, short_side), keep_ratio=True)
    prob_thd: float
    coarse_thresh: float
    reduce_zero_label: bool
    has_background: bool  # first class-name line is the background (several stuff names)
    num_classes: int
    layout: Layout = CUSTOM_LAYOUT
    subdir: str = ""  # its folder under a data root holding every benchmark (MMSegmentation's names)
    crop: int = CROP
    stride: int = 224
    logit_scale: float = LOGIT_SCALE
    ignore_index: int = IGNORE_INDEX
    sd_threshold: float = 0.2  # CLIPer's SD attention threshold for this benchmark
    cos_fac: float = 1.2  # Trident's SAM-guidance factor
    refine_neg_cos: bool = True  # Trident's guidance: negative thresholds replaced (see pipeline.trident)
    description: str = ""


PRESETS: dict[str, DatasetPreset] = {
    p.name: p
    for p in [
        DatasetPreset("voc21", "voc21.txt", 448, 0.2, 0.2, False, True, 21, VOC_LAYOUT, "VOCdevkit/VOC2012",
                      sd_threshold=0.1, description="PASCAL VOC 2012 val, background + 20 classes"),
        DatasetPreset("voc20", "voc20.txt", 336, 0.0, 0.2, True, False, 20, VOC_LAYOUT, "VOCdevkit/VOC2012",
                      stride=112, sd_threshold=0.1, cos_fac=0.0,
                      description="PASCAL VOC 2012 val, 20 classes (background ignored)"),
        DatasetPreset("context60", "context60.txt", 576, 0.15, 0.15, False, True, 60, CONTEXT_LAYOUT,
                      "VOCdevkit/VOC2010", description="PASCAL Context val, background + 59 classes"),
        DatasetPreset("context59", "context59.txt", 576, 0.0, 0.15, True, False, 59, CONTEXT_LAYOUT,
                      "VOCdevkit/VOC2010", description="PASCAL Context val, 59 classes"),
        DatasetPreset("coco_object", "coco_object.txt", 448, 0.25, 0.25, False, True, 81, COCO_OBJECT_LAYOUT,
                      "coco_stuff164k", description="COCO val2017 objects, background + 80 things"),
        DatasetPreset("coco_stuff164k", "coco_stuff164k.txt", 448, 0.0, 0.05, False, False, 171, COCO_STUFF_LAYOUT,
                      "coco_stuff164k", description="COCO-Stuff 164k val2017, 171 classes"),
        DatasetPreset("cityscapes", "cityscapes.txt", 688, 0.0, 0.10, False, False, 19, CITYSCAPES_LAYOUT,
                      "cityscapes", sd_threshold=0.35, cos_fac=3.0, refine_neg_cos=False,
                      description="Cityscapes val, 19 classes"),
        DatasetPreset("ade20k", "ade20k.txt", 576, 0.0, 0.05, True, False, 150, ADE_LAYOUT,
                      "ade/ADEChallengeData2016", refine_neg_cos=False, description="ADE20K val, 150 classes"),
    ]
}


def get_preset(name: str) -> DatasetPreset:
    """The preset called `name` (one line naming the choices otherwise)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise S2ClipError(f"unknown dataset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def custom_preset(num_classes: int, *, reduce_zero_label: bool = False) -> DatasetPreset:
    """The preset of a generic dataset: no background, `segment`'s short side 448, stride 224,
    no probability threshold, SAM coarse threshold 0.05 (the no-background benchmarks' lowest)."""
    return DatasetPreset(CUSTOM, "", short_side=448, prob_thd=0.0, coarse_thresh=0.05,
                         reduce_zero_label=reduce_zero_label, has_background=False, num_classes=num_classes,
                         description="images + masks folders, classes from a file")
