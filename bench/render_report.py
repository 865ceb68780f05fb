#!/usr/bin/env python
"""Render an HTML report with headless Chromium and save a screenshot (to look at it).

    python bench/render_report.py report.html report.png

Needs Debian's chromium (`apt-get install chromium`). The page is self-contained, so the
screenshot is taken with networking disabled.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 2400) -> Path:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png}",
             page.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )
    return png


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
