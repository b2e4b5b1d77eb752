"""Videos through OpenCV: reading every N-th frame as RGB, and writing an overlay video.

Every failure becomes one ``S2ClipError`` line naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from ..errors import S2ClipError

MAX_FRAME_PIXELS = 2**27  # a frame larger than this (e.g. 16384 x 8192) is refused before decoding
OVERLAY_FOURCC = "mp4v"  # MPEG-4 part 2: written by every OpenCV build with FFmpeg, read by every player


class VideoFrames:
    """Frames of a video file: ``len()`` (from the header, possibly approximate), ``fps``, ``size``
    ``(height, width)``, and iteration over ``(index, RGB uint8 frame)`` of every `every`-th frame
    (frame 0, every, 2·every, …; the frames in between are skipped without decoding)."""

    def __init__(self, path: Path, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.path = Path(path)
        self.every = every
        if not self.path.is_file():
            raise S2ClipError(f"cannot read video {self.path}: not a regular file")
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            capture.release()
            raise S2ClipError(f"cannot read video {self.path}: OpenCV cannot open it (not a supported video)")
        self._capture = capture
        self.frame_count = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        self.fps = fps if np.isfinite(fps) and fps > 0 else 25.0
        height, width = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        if height * width > MAX_FRAME_PIXELS:
            self.close()
            raise S2ClipError(f"cannot read video {self.path}: frames of {width}x{height} are too large")
        self.size = (height, width)

    def __len__(self) -> int:
        """Frames that iteration yields, by the header's frame count (0 when unknown)."""
        return -(-self.frame_count // self.every)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        index = 0
        yielded = 0
        while True:
            if index % self.every == 0:
                ok, frame = self._capture.read()
                if not ok:
                    break
                if frame is None or frame.ndim != 3 or frame.shape[2] != 3:
                    raise S2ClipError(f"cannot read video {self.path}: frame {index} is not a colour frame")
                if frame.shape[:2] != self.size:
                    raise S2ClipError(f"cannot read video {self.path}: frame {index} is {frame.shape[1]}x"
                                      f"{frame.shape[0]}, not {self.size[1]}x{self.size[0]} as the video")
                yielded += 1
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            elif not self._capture.grab():
                break
            index += 1
        if yielded == 0:
            raise S2ClipError(f"cannot read video {self.path}: no frame could be decoded")

    def close(self) -> None:
        self._capture.release()

    def __enter__(self) -> VideoFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VideoWriter:
    """Writes RGB uint8 frames of one size to an MPEG-4 video (``.mp4``) at `fps`."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]) -> None:
        self.path = Path(path)
        self.size = size
        height, width = size
        fourcc = cv2.VideoWriter_fourcc(*OVERLAY_FOURCC)
        self._writer = cv2.VideoWriter(str(self.path), fourcc, float(fps), (width, height))
        if not self._writer.isOpened():
            self._writer.release()
            raise S2ClipError(f"cannot write video {self.path}: OpenCV has no {OVERLAY_FOURCC} encoder")
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        if frame.shape[:2] != self.size:
            raise ValueError(f"frame {frame.shape[:2]} does not match the video size {self.size}")
        self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        """Finish the file; `S2ClipError` when nothing reached the disk (OpenCV's writer does not
        report failed writes, e.g. a full disk)."""
        self._writer.release()
        if self.frames and (not self.path.is_file() or self.path.stat().st_size == 0):
            raise S2ClipError(f"cannot write video {self.path}: the file is empty (disk full?)")

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.release()
