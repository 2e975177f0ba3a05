"""Pictures people would rather see than read: annotated frames and GIFs of episodes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["caption_frame", "egocentric_frame", "write_gif"]


def caption_frame(frame: np.ndarray, lines: Sequence[str], width: int | None = None) -> Image.Image:
    """`frame` (H, W, 3) uint8 with a text band of `lines` above it."""
    image = Image.fromarray(frame)
    width = width or image.width
    font = ImageFont.load_default(size=13)
    band = 6 + 16 * len(lines)
    out = Image.new("RGB", (width, image.height + band), (20, 20, 20))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((6, 4 + 16 * i), line, fill=(235, 235, 235), font=font)
    out.paste(image, ((width - image.width) // 2, band))
    return out


def egocentric_frame(image: np.ndarray, tile_size: int = 24) -> np.ndarray:
    """Render a (7, 7, 3) symbolic observation (what the agent sees, or what a world model
    decodes) as an RGB picture (7 * tile, 7 * tile, 3); the agent is at the bottom centre."""
    from minigrid.core.grid import Grid

    grid, vis_mask = Grid.decode(np.asarray(image, dtype=np.uint8))
    return grid.render(tile_size, agent_pos=(3, 6), agent_dir=3, highlight_mask=~vis_mask)


def write_gif(frames: Sequence[Image.Image | np.ndarray], path: str | Path,
              ms_per_frame: int = 250) -> Path:
    """Write frames as a looping GIF, atomically (temp file, then rename)."""
    if not frames:
        raise ValueError("write_gif needs at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [f if isinstance(f, Image.Image) else Image.fromarray(f) for f in frames]
    size = (max(i.width for i in images), max(i.height for i in images))
    padded = []
    for img in images:
        canvas = Image.new("RGB", size, (20, 20, 20))
        canvas.paste(img, (0, 0))
        padded.append(canvas)
    fd, tmp = tempfile.mkstemp(suffix=".gif", dir=path.parent)
    os.close(fd)
    try:
        padded[0].save(tmp, save_all=True, append_images=padded[1:], duration=ms_per_frame,
                       loop=0)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
