"""Headless visual output: frame strips as PNG, or MP4 when an ffmpeg binary is already installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

__all__ = ["frames_grid", "mp4_available", "save_frames"]


def frames_grid(rows: list[list[np.ndarray]], max_cols: int = 8) -> np.ndarray:
    """Tile frames (each row one episode, subsampled to at most max_cols) into one RGB image."""
    if not rows or not any(rows):
        raise ValueError("no frames to tile")
    h, w, _ = next(f for r in rows for f in r).shape
    picked = []
    for r in rows:
        idx = np.unique(np.linspace(0, len(r) - 1, min(max_cols, len(r))).round().astype(int)) if r else []
        picked.append([r[i] for i in idx])
    cols = max(len(p) for p in picked)
    img = np.full((len(picked) * h, cols * w, 3), 255, dtype=np.uint8)
    for i, p in enumerate(picked):
        for j, f in enumerate(p):
            img[i * h : (i + 1) * h, j * w : (j + 1) * w] = f
    return img


def mp4_available() -> bool:
    return shutil.which("ffmpeg") is not None


def _write_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image  # pillow ships with matplotlib, already a project dependency

    Image.fromarray(img).save(path)


def _write_mp4(path: Path, frames: list[np.ndarray], fps: int) -> None:
    h, w, _ = frames[0].shape
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", str(fps), "-i", "-", "-pix_fmt", "yuv420p", "-vcodec", "libx264", str(path)]  # fmt: skip
    subprocess.run(cmd, input=b"".join(f.tobytes() for f in frames), check=True)


def save_frames(path: str | Path, rows: list[list[np.ndarray]], fps: int = 10) -> tuple[Path, str]:
    """Write frames to ``path`` (.png strip, or .mp4 if ffmpeg exists); returns (written path, note).

    Asking for .mp4 without an encoder falls back to a PNG strip next to it rather than adding a dependency.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".mp4"):
        raise ValueError(f"render output must end in .png or .mp4, got {path.name!r}")
    if suffix == ".mp4":
        if mp4_available():
            _write_mp4(path, [f for r in rows for f in r], fps)
            return path, f"wrote video {path}"
        png = path.with_suffix(".png")
        _write_png(png, frames_grid(rows))
        return png, f"no mp4 encoder (ffmpeg) found; wrote a PNG frame strip instead: {png}"
    _write_png(path, frames_grid(rows))
    return path, f"wrote frame strip {path}"
