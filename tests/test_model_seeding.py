"""`--models tiny|random`: each model is built under its own seed, so its random weights do not depend
on which other models the run builds, and one identity means one set of weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from s2clip_cli.cli import app
from s2clip_cli.commands.methods import method_config
from s2clip_cli.commands.segment import background_names
from s2clip_cli.models.factory import load_models, load_single, model_seed, random_identity
from s2clip_cli.models.registry import vfm_spec
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig

runner = CliRunner()


def _tiny(*args: object, **kwargs: object):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_models(*args, mode="tiny", **kwargs)  # type: ignore[arg-type]


def _equal_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_clip_and_vfm_weights_do_not_depend_on_sam_being_built() -> None:
    with_sam = _tiny("ViT-B/16", "dino_vitb8", "vit_b")
    without = _tiny("ViT-B/16", "dino_vitb8", None)
    _equal_weights(with_sam.clip, without.clip)
    _equal_weights(with_sam.vfm, without.vfm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _equal_weights(load_single("clip", "ViT-B/16", mode="tiny"), with_sam.clip)  # the analyses' models too
        _equal_weights(load_single("vfm", "dino_vitb8", mode="tiny"), with_sam.vfm)
    assert with_sam.identity["dino_vitb8"] == without.identity["dino_vitb8"] == "random-tiny:vfm:dino_vitb8:seed0"
    assert with_sam.identity["vit_b"] == "random-tiny:sam:vit_b:seed0"
    # different models, different seeds (not one stream cut in turn)
    assert len({model_seed("clip", "ViT-B/16"), model_seed("vfm", "dino_vitb8"), model_seed("sam", "vit_b")}) == 3


def test_sam_encoder_vfm_is_the_random_sam_encoder_with_sam_or_without() -> None:
    served = _tiny("ViT-B/16", "sam_vitb16", "vit_b")  # SAM ViT-B's encoder serves as the VFM
    alone = _tiny("ViT-B/16", "sam_vitb16", None)  # built on its own
    _equal_weights(served.vfm, alone.vfm)
    assert served.identity["sam_vitb16"] == alone.identity["sam_vitb16"] == random_identity("tiny", vfm_spec("sam_vitb16"))


def test_building_models_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _tiny("ViT-B/16", "dino_vits16", None)
    assert torch.equal(torch.rand(3), expected)


def _segment_config() -> SegmenterConfig:
    """What `s2clip segment --models tiny --device cpu` configures (cli/segment.py)."""
    return SegmenterConfig(method="s2clip", clip="ViT-B/16", combine="mean", prob_thd=0.2, window_batch=4,
                           work_resolution="resized", sd_threshold=0.2, models="tiny", device="cpu")


def test_segment_no_sam_equals_a_segmenter_that_built_sam_and_does_not_refine(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    result = runner.invoke(app, ["segment", str(tmp_path / "in.png"), "--classes", "cat,dog", "--no-sam",
                                 "--models", "tiny", "--device", "cpu", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    no_sam_labels = np.asarray(Image.open(tmp_path / "out" / "in_mask.png"))

    classes = [["cat"], ["dog"]]
    cfg = method_config(_segment_config(), "s2clip", None, {})
    assert cfg.sam is not None  # SAM is built...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        seg = Segmenter.build(cfg, classes, background_names(None, classes))
    assert seg.models.sam is not None
    labels = seg(image, refine=False).labels  # ...and not used
    np.testing.assert_array_equal(labels, no_sam_labels)


@pytest.mark.parametrize("mode", ["tiny"])
def test_identity_names_what_was_built(mode: str) -> None:
    loaded = _tiny("ViT-B/16", "dino_vits16", "vit_b")
    assert loaded.identity == {"ViT-B/16": f"random-{mode}:clip:ViT-B/16:seed0",
                               "dino_vits16": f"random-{mode}:vfm:dino_vits16:seed0",
                               "vit_b": f"random-{mode}:sam:vit_b:seed0"}
