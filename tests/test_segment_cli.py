"""`s2clip segment` end to end with --models tiny, and every bad input it must reject cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from s2clip_cli.cli import app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
runner = CliRunner()
TINY = ["--models", "tiny", "--device", "cpu"]


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8), "L").save(d / "grey.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16)).save(d / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    Image.fromarray(rng.integers(0, 255, (30, 60, 3), dtype=np.uint8)).save(d / "rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (12, 900, 3), dtype=np.uint8)).save(d / "wide.png")
    return d


def test_segment_examples_end_to_end(tmp_path: Path) -> None:
    images = sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() in {".jpg", ".png"})
    assert images, "examples/ must hold photos"
    code, stdout, stderr = run("segment", str(images[0]), "--classes", "cat,floor; carpet,wall",
                               "-o", str(tmp_path), *TINY)
    assert code == 0, stderr
    assert "meaningless" in stderr  # every random-weights run says so
    stem = images[0].stem
    mask = Image.open(tmp_path / f"{stem}_mask.png")
    src = Image.open(images[0])
    assert mask.mode == "P" and mask.size == src.size
    labels = np.asarray(mask)
    assert labels.max() <= 3  # background + 3 classes
    overlay = Image.open(tmp_path / f"{stem}_overlay.png")
    assert overlay.size[0] >= src.size[0] and overlay.size[1] >= src.size[1]
    record = json.loads((tmp_path / f"{stem}.json").read_text())
    assert record["classes"] == ["background", "cat", "floor", "wall"]
    assert record["class_names"][2] == ["floor", "carpet"]
    assert abs(sum(record["pixel_share"].values()) - 1.0) < 1e-4
    shares = np.bincount(labels.ravel(), minlength=4) / labels.size
    assert np.allclose([record["pixel_share"][k] for k in record["classes"]], shares, atol=1e-5)
    assert {"vfm", "clip", "fusion", "sam_refine"} <= set(record["timings_s"])
    assert "warning" in record
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))


def test_segment_folder_no_sam_no_background(tmp_path: Path, odd_images: Path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run("segment", str(odd_images), "--classes", "a,b", "--no-background", "--no-sam",
                               "-o", str(out), *TINY)
    assert code == 0, stderr
    for name, size in {"grey": (50, 40), "rgba": (50, 40), "deep16": (50, 40), "rotated": (30, 60),
                       "tiny": (20, 20), "wide": (900, 12)}.items():
        mask = Image.open(out / f"{name}_mask.png")
        assert mask.size == size, name
        assert np.asarray(mask).max() <= 1  # two classes, no background
        record = json.loads((out / f"{name}.json").read_text())
        assert record["classes"] == ["a", "b"] and "sam_refine" not in record["timings_s"]


def test_classes_from_file_and_layers(tmp_path: Path, odd_images: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("car\nbicycle; bike\n\nperson\n")
    code, _, stderr = run("segment", str(odd_images / "tiny.png"), "--classes", f"@{classes}", "--no-sam",
                          "--layers", "3-4", "--combine", "entropy", "--background", "sky; road",
                          "-o", str(tmp_path / "o"), *TINY)
    assert code == 0, stderr
    record = json.loads((tmp_path / "o" / "tiny.json").read_text())
    assert record["classes"] == ["background", "car", "bicycle", "person"]
    assert record["class_names"][0] == ["sky", "road"]
    assert record["run"]["layers"] == [3, 4]  # the resolved settings
    assert record["config"]["layers"] == "3-4"  # the options as given: what --config takes back


@pytest.mark.parametrize(
    "setup,args,message",
    [
        ("none", ["missing.jpg"], "missing.jpg"),
        ("zero", ["zero.jpg"], "zero.jpg"),
        ("corrupt", ["corrupt.png"], "corrupt.png"),
        ("emptydir", ["emptydir"], "no images"),
        ("ok", ["ok.png", "--classes", ""], "class"),
        ("ok", ["ok.png", "--classes", "cat,Cat"], "duplicate"),
        ("ok", ["ok.png", "--classes", "cat,,dog"], "empty"),
        ("ok", ["ok.png", "--clip", "ViT-Z/9"], "'ViT-Z/9' is not one of"),  # Typer choices list the valid values
        ("ok", ["ok.png", "--vfm", "dino_giant"], "'dino_giant' is not one of"),
        ("ok", ["ok.png", "--sam", "vit_q"], "'vit_q' is not one of"),
        ("ok", ["ok.png", "--models", "fake"], "'fake' is not one of"),
        ("ok", ["ok.png", "--layers", "x"], "bad --layers"),
        ("ok", ["ok.png", "--device", "tpu"], "'tpu' is not one of"),
        ("ok", ["ok.png", "-o", "afile"], "is a file"),
        ("ok", ["ok.png", "--models", "real", "--offline"], "missing weights for ViT-B/16"),
    ],
)
def test_bad_input_is_one_line_no_traceback(tmp_path: Path, setup: str, args: list[str], message: str) -> None:
    os.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    if setup == "zero":
        (tmp_path / "zero.jpg").write_bytes(b"")
    elif setup == "corrupt":
        (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    elif setup == "emptydir":
        (tmp_path / "emptydir").mkdir()
    elif setup == "ok":
        Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "ok.png")
    argv = ["segment", *args]
    if "--classes" not in args:
        argv += ["--classes", "cat,dog"]
    if "--models" not in args:
        argv += ["--models", "tiny"]
    if "-o" not in args:
        argv += ["-o", str(tmp_path / "out")]
    code, stdout, stderr = run(*argv)
    assert code != 0
    assert message.lower() in stderr.lower(), stderr
    assert "Traceback" not in stderr + stdout
    assert len([line for line in stderr.splitlines() if line.startswith("error:")]) == 1
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # no partial outputs


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "s2clip_cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "segment" in proc.stdout


def test_help_does_not_import_torch() -> None:
    """Parsing (and `--help`) must stay fast: torch is imported only when a command runs."""
    code = ("import sys; from typer.testing import CliRunner; from s2clip_cli.cli import app; "
            "result = CliRunner().invoke(app, ['segment', '--help']); "
            "assert result.exit_code == 0, result.output; print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_precision_choices_match_the_library() -> None:
    from s2clip_cli.cli.common import PrecisionName
    from s2clip_cli.models.precision import PRECISIONS

    assert [p.value for p in PrecisionName] == list(PRECISIONS)
