"""Running the ``medgw`` command as a subprocess, the way an administrator does."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def medgw(
    *args: str | Path, timeout: float = 120, prefix: Sequence[str] = (), **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """``medgw ARGS`` with this interpreter; output captured as text, exit status not checked.
    ``prefix``: the command that runs it (as another user: see tests.helpers.other_user);
    ``kwargs`` go to :func:`subprocess.run` (``cwd``, ``env``, ``input``, ...)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "gateway", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )
