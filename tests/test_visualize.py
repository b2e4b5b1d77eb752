"""`s2clip visualize` (Figure 6): PCA colours and cosine maps against numpy references, and a
well-formed figure from the command with tiny models, with and without --point, under bf16."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from s2clip_cli.analysis.visualize import FeaturePanel, cosine_map, feature_figure, pca_rgb
from s2clip_cli.cli import app

runner = CliRunner()
TINY = ["--models", "tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "scene.png"
    rng = np.random.default_rng(0)
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    image[:, :48] = (200, 40, 40)
    image[:, 48:] = (30, 160, 220)
    image = np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(path)
    return path


def test_pca_rgb_follows_the_first_components() -> None:
    rng = np.random.default_rng(1)
    c, h, w = 16, 6, 8
    base = rng.normal(size=(c, h * w))
    base[:, : h * w // 2] += 6 * rng.normal(size=(c, 1))  # a strong two-cluster direction
    features = torch.tensor(base.reshape(c, h, w), dtype=torch.float32)
    rgb = pca_rgb(features, clip_percent=0.0)
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    # Reference: numpy SVD of the centred positions × channels matrix, first component min-max scaled.
    x = base.T - base.T.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    v = vt[0] * np.sign(vt[0][np.abs(vt[0]).argmax()])
    proj = x @ v
    expected = np.round((proj - proj.min()) / (proj.max() - proj.min()) * 255).reshape(h, w)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255


def test_cosine_map_against_numpy() -> None:
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(5, 4, 6)).astype(np.float32)
    out = cosine_map(torch.from_numpy(feats), (0.5, 0.3))  # column 3, row 1
    f = feats.reshape(5, -1)
    f = f / np.linalg.norm(f, axis=0, keepdims=True)
    expected = (f[:, 1 * 6 + 3] @ f).reshape(4, 6)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[1, 3] == pytest.approx(1.0)


def test_feature_figure_size_and_panels(tmp_path: Path) -> None:
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    panels = [FeaturePanel(f"p{i}", torch.randn(8, 5, 7, generator=torch.Generator().manual_seed(i))) for i in range(3)]
    one = feature_figure(image, panels, tmp_path / "one.png", panel_inches=2.0, dpi=50)
    two = feature_figure(image, panels, tmp_path / "two.png", point=(0.5, 0.5), panel_inches=2.0, dpi=50)
    assert Image.open(one).size == (400, 120) and Image.open(two).size == (400, 220)
    assert not list(tmp_path.glob("*.tmp*"))


def _colours(path: Path) -> int:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return len(np.unique(pixels, axis=0))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_visualize_command_writes_a_figure(photo: Path, tmp_path: Path, precision: str) -> None:
    out = tmp_path / "fig"
    args = ["visualize", str(photo), "-o", str(out), "--strategies", "vanilla,qq,kk,vv", "--vfm", "dino_vitb8",
            "--short-side", "64", "--precision", precision, *TINY]
    result = runner.invoke(app, [*args, "--point", "20,30"])
    assert result.exit_code == 0, result.stderr
    figure = out / "scene_features.png"
    # 1 image + 4 strategies + 1 VFM = 6 panels of 2.6 in at 100 dpi; two rows with --point.
    assert Image.open(figure).size == (1560, 560)
    assert _colours(figure) > 200  # PCA colours of several panels, a colour map row, the image
    record = json.loads((out / "visualize.json").read_text())
    assert record["strategies"] == ["vanilla", "qq", "kk", "vv"] and record["precision"] == precision
    assert record["point"] == [20.0, 30.0] and record["warning"]
    no_point = runner.invoke(app, args)
    assert no_point.exit_code == 0, no_point.stderr
    assert Image.open(figure).size == (1560, 300)


def test_visualize_bad_inputs_are_one_line(photo: Path, tmp_path: Path) -> None:
    for extra, message in ((["--strategies", "proxy"], "unknown strategy 'proxy'"),
                           (["--vfm", "dino_huge"], "unknown VFM 'dino_huge'"),
                           (["--point", "500,10"], "outside scene.png"),
                           (["--point", "abc"], "bad --point")):
        result = runner.invoke(app, ["visualize", str(photo), "-o", str(tmp_path), "--vfm", "", *TINY, *extra])
        assert result.exit_code != 0 and message in result.stderr, (extra, result.stderr)
        assert "Traceback" not in result.stderr
