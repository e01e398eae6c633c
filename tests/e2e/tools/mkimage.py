"""The image maker moved to deploy/image/mkimage.py (one maker for every image); this path
keeps working for the scripts that call it: same command line."""

from __future__ import annotations

import runpy
from pathlib import Path

if __name__ == "__main__":
    maker = Path(__file__).resolve().parents[3] / "deploy" / "image" / "mkimage.py"
    runpy.run_path(str(maker), run_name="__main__")
