"""The analyses (entropy, ap) see each window exactly as the pipeline's backbones see it: the same
crops of the same normalised image, the same padding, and the VFM the same re-normalised input."""

from __future__ import annotations

import numpy as np
import torch

from s2clip_cli.analysis.features import image_windows, vfm_maps
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig
from s2clip_cli.pipeline.transforms import clip_to_imagenet


def test_analysis_windows_are_the_pipelines() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)
    cfg = SegmenterConfig(models="tiny", device="cpu", window_batch=2, short_side=200, crop=112, stride=56)
    seg = Segmenter.build(cfg, [["cat"], ["dog"]], None)
    pipeline = seg.windows(seg.prepare(image))
    analysis = list(image_windows(image, short_side=cfg.short_side, stride=cfg.stride, crop=cfg.crop,
                                  multiple=seg.pad_multiple(), batch_size=cfg.window_batch))
    assert len(pipeline) == len(analysis) > 1
    for ours, theirs in zip(analysis, pipeline, strict=True):
        assert ours.crops.shape == theirs.crops.shape
        torch.testing.assert_close(ours.crops, theirs.crops, rtol=0, atol=0)  # same ops on the same pixels


def test_vfm_maps_feed_the_imagenet_renormalised_input() -> None:
    seen: list[torch.Tensor] = []

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x[:, :, ::8, ::8]

    crops = torch.randn(2, 3, 16, 24)
    out = vfm_maps(Recorder(), crops, torch.float32)
    assert out.shape == (2, 3, 2, 3)
    torch.testing.assert_close(seen[0], clip_to_imagenet(crops))
