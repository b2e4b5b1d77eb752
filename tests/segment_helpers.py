"""What the `segment` input/output tests share: fast tiny settings, a CLI runner, test images, and
one tiny Segmenter per configuration for the whole session (building models is the slow part)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from s2clip_cli.cli import app
from s2clip_cli.pipeline.segmenter import Segmenter

FAST = ["--models", "tiny", "--device", "cpu", "--no-sam", "--short-side", "64"]
runner = CliRunner()
_built: dict[str, Segmenter] = {}
_real_build = Segmenter.build.__func__  # type: ignore[attr-defined]


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def segment(*args: str, classes: str = "cat,dog") -> tuple[int, str, str]:
    return run("segment", *args, "--classes", classes, *FAST)


def save_image(path: Path, shape: tuple[int, int] = (40, 50), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(autouse=True)
def reuse_segmenters(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Segmenter.build` returns the Segmenter built earlier for the same settings and classes."""

    def build(cls: type[Segmenter], config: object, classes: object, background: object, models: object = None
              ) -> Segmenter:
        key = repr((config, classes, background))
        if models is not None or key not in _built:
            seg = _real_build(cls, config, classes, background, models)
            if models is not None:
                return seg
            _built[key] = seg
        return _built[key]

    monkeypatch.setattr(Segmenter, "build", classmethod(build))
