"""Where the analyses and benchmarks get their images: datasets (given or default) or a folder."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..data.datasets import SegDataset
from ..data.sources import default_data_root, prepare_command
from ..errors import S2ClipError
from ..io.images import collect_images, read_image
from .evaluate import open_datasets

# The datasets of the paper's Figures 3 and 4.
FIGURE_DATASETS: tuple[str, ...] = ("ade20k", "cityscapes", "coco_stuff164k", "context59")


@dataclass
class ImageSource:
    """One dataset (or folder) to analyse: its name, the dataset when there is one, and its items."""

    name: str
    dataset: SegDataset | None
    items: list  # dataset indices, or image paths

    def image(self, item: object) -> np.ndarray:
        return self.dataset.load_image(item) if self.dataset is not None else read_image(item)

    def label(self, item: object) -> np.ndarray:
        if self.dataset is None:
            raise S2ClipError(f"{self.name}: no labels (a folder of images)")
        return self.dataset.load_label(item)


def default_figure_datasets(console: Console) -> list[str]:
    """The Figure 3/4 datasets present in the default data folder (each named), or one line naming
    the command that prepares them."""
    present = [name for name in FIGURE_DATASETS if default_data_root(name).exists()]
    if not present:
        raise S2ClipError(f"none of the paper's datasets ({', '.join(FIGURE_DATASETS)}) is prepared in the default "
                          f"data folder: prepare one, e.g. `{prepare_command('ade20k')}`, or give --dataset with "
                          "--data-root, or --images DIR")
    console.print(f"datasets found in the default data folder: {', '.join(present)}", highlight=False)
    return present


def image_sources(dataset_names: list[str], data_root: Path | None, images_dir: Path | None,
                  limit: int | None) -> Iterator[ImageSource]:
    """Every dataset opened (a wrong layout reported before any work), or the folder of images."""
    if images_dir is not None:
        yield ImageSource(images_dir.name, None, collect_images([images_dir])[:limit])
        return
    for name, ds in open_datasets(dataset_names, data_root):
        count = len(ds) if limit is None else min(limit, len(ds))
        if count == 0:
            raise S2ClipError(f"{name}: no images to analyse")
        yield ImageSource(name, ds, list(range(count)))


def progress_bar(console: Console, *, disable: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=disable)
