"""Running the ``medgw`` command as a subprocess, the way an administrator does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any


def medgw(
    *args: str | Path, timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """``medgw ARGS`` with this interpreter; output captured as text, exit status not checked.
    ``kwargs`` go to :func:`subprocess.run` (``cwd``, ``env``, ``input``, ...)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )
