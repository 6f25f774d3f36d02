"""Headless Chromium, for PNG timelines and the Flower browser test.

Debian's ``chromium`` package; nothing is downloaded. The flags are the ones
that work here: no sandbox (we may run as root, where Chromium refuses its
sandbox), no GPU, and none of Chromium's background traffic (updates, sync,
safe-browsing lists), which a closed network refuses many times a start.
"""

from __future__ import annotations

import shutil

HEADLESS_FLAGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def find_chromium() -> str | None:
    """The chromium binary on PATH, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")
