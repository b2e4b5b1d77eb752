"""Analysis figures and reports: readable PNGs, atomic writes, JSON/CSV contents, Rich tables."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image
from rich.console import Console

from s2clip_cli.analysis.plots import HEATMAP_CMAP, entropy_heatmap, pr_curves
from s2clip_cli.analysis.reports import ap_table, entropy_table, write_ap_outputs, write_entropy_outputs
from s2clip_cli.errors import S2ClipError
from s2clip_cli.io.files import atomic_path


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 100 and im.height > 100
        rgb = np.asarray(im.convert("RGB"))
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 10  # not all one colour


def _no_temp_files(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]


def _entropy_stats() -> dict[str, dict[str, dict[str, float]]]:
    return {
        "ade20k": {
            f"clip:{i}": {"entropy": 5.0 - 0.1 * i, "gini": 0.1 * i, "channel_corr": 0.01} for i in range(6)
        },
        "context59": {
            f"clip:{i}": {"entropy": 4.5 + 0.05 * i, "gini": 0.2, "channel_corr": math.nan}
            for i in range(2, 8)
        },
    }


def _ap_results() -> dict[str, dict]:
    rec = np.linspace(1.0, 0.0, 50)
    return {
        **{
            f"clip:{i}": {
                "ap": 0.3 + 0.05 * i,
                "positive_rate": 0.2,
                "n_pairs": 1000,
                "precision": list(0.2 + (0.05 * i) * (1 - rec)),
                "recall": list(rec),
            }
            for i in range(4)
        },
        "dino_vitb8": {
            "ap": 0.8,
            "positive_rate": 0.2,
            "n_pairs": 1000,
            "precision": list(1 - 0.8 * rec**3),
            "recall": list(rec),
        },
        "sam_vitb16": {"ap": math.nan, "positive_rate": 0.0, "n_pairs": 10, "precision": [], "recall": []},
    }


def test_heatmap_colormap_makes_low_values_dark() -> None:
    cmap = colormaps[HEATMAP_CMAP]
    lum = [float(np.dot(cmap(t)[:3], [0.299, 0.587, 0.114])) for t in np.linspace(0, 1, 11)]
    assert all(a < b for a, b in zip(lum, lum[1:], strict=False))


@pytest.mark.parametrize("per_column", [True, False])
def test_entropy_heatmap_writes_png(tmp_path: Path, per_column: bool) -> None:
    values = np.array([[5.0, 4.0], [4.5, np.nan], [3.9, 3.0]])
    out = entropy_heatmap(
        values,
        ["clip:0", "clip:1", "clip:2"],
        ["ade20k", "voc"],
        tmp_path / "sub" / "h.png",
        per_column=per_column,
    )
    assert out == tmp_path / "sub" / "h.png"
    _assert_png(out)
    _no_temp_files(out.parent)
    with pytest.raises(S2ClipError):
        entropy_heatmap(values, ["a", "b"], ["x", "y"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_pr_curves_writes_png(tmp_path: Path) -> None:
    out = pr_curves(_ap_results(), tmp_path / "pr.png", title="ADE20K")
    _assert_png(out)
    _no_temp_files(tmp_path)
    with pytest.raises(S2ClipError):
        pr_curves({}, tmp_path / "empty.png")


def test_atomic_write_leaves_target_untouched_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")

    with pytest.raises(RuntimeError), atomic_path(target) as tmp:  # the one atomic writer (io.files)
        tmp.write_bytes(b"partial")
        raise RuntimeError("fail")
    assert target.read_text() == "old"
    _no_temp_files(tmp_path)


def test_write_entropy_outputs(tmp_path: Path) -> None:
    stats = _entropy_stats()
    paths = write_entropy_outputs(stats, tmp_path / "ent")
    assert [p.name for p in paths] == ["entropy.json", "entropy.csv", "entropy_heatmap.png"]
    data = json.loads(paths[0].read_text())
    assert data["ade20k"]["clip:3"]["entropy"] == pytest.approx(4.7)
    assert data["context59"]["clip:2"]["channel_corr"] is None  # NaN -> null
    rows = list(csv.DictReader(io.StringIO(paths[1].read_text())))
    assert len(rows) == 12
    assert list(rows[0]) == ["dataset", "layer", "entropy", "gini", "channel_corr"]
    assert rows[-1]["dataset"] == "context59" and rows[-1]["layer"] == "clip:7"
    assert rows[-1]["channel_corr"] == ""
    _assert_png(paths[2])
    _no_temp_files(tmp_path / "ent")
    with pytest.raises(S2ClipError):
        write_entropy_outputs({}, tmp_path)


def _render(table) -> str:  # type: ignore[no-untyped-def]
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_entropy_table() -> None:
    table = entropy_table(_entropy_stats())
    assert table.row_count == 12
    assert [c.header for c in table.columns] == ["dataset", "layer", "entropy", "gini", "channel_corr"]
    text = _render(table)
    assert "context59" in text and "4.5000" in text and "clip:7" in text
    # The lowest-entropy layer of each dataset is highlighted.
    styled = [i for i, row in enumerate(table.rows) if row.style]
    assert styled == [5, 6]


def test_ap_table_and_outputs(tmp_path: Path) -> None:
    results = _ap_results()
    table = ap_table(results)
    assert table.row_count == 6
    text = _render(table)
    assert "dino_vitb8" in text and "0.8000" in text
    assert [i for i, row in enumerate(table.rows) if row.style] == [4]
    paths = write_ap_outputs(results, tmp_path, title="COCO-Stuff")
    assert [p.name for p in paths] == ["ap.json", "ap_pr_curves.png"]
    data = json.loads(paths[0].read_text())
    assert data["sam_vitb16"]["ap"] is None
    assert data["clip:2"]["ap"] == pytest.approx(0.4) and len(data["clip:2"]["recall"]) == 50
    _assert_png(paths[1])
    with pytest.raises(S2ClipError):
        ap_table({})
