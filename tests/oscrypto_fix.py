"""Make ``pyas2lib`` importable where OpenSSL's patch number has two digits.

pyas2lib (the independent AS2 implementation the interop tests run against)
depends on oscrypto 1.3.0, the newest release on PyPI.  oscrypto finds the
version of libcrypto with the pattern ``\\b(\\d\\.\\d\\.\\d[a-z]*)\\b``: for
"OpenSSL 3.0.19" the ``\\b`` after "3.0.1" fails, so importing oscrypto raises
``LibraryNotFoundError('Error detecting the version of libcrypto')``.  Its
``use_openssl(libcrypto, libssl)`` only chooses *which* library file is
loaded; the version is still read with the same pattern, so it does not help
(and there is only one libcrypto on the machine anyway).

Upstream fixed the pattern (``\\d+`` in each place) after 1.3.0 without a
release.  :func:`load_pyas2lib` applies that one-line fix while oscrypto's two
libcrypto binding modules (cffi and ctypes flavours) are imported: a loader
reads their source, replaces the pattern and compiles it; nothing on disk is
changed.  If the installed oscrypto no longer contains the old pattern it is
used as it is.  Only the test process is affected.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import CodeType, ModuleType
from typing import Any

_OLD = "'\\\\b(\\\\d\\\\.\\\\d\\\\.\\\\d[a-z]*)\\\\b'"
_NEW = "'\\\\b(\\\\d+\\\\.\\\\d+\\\\.\\\\d+[a-z]*)\\\\b'"
_MODULES = ("oscrypto._openssl._libcrypto_cffi", "oscrypto._openssl._libcrypto_ctypes")


class _PatchedLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname: str) -> CodeType:
        source = self.get_data(self.path).decode("utf-8")
        # Compiled from source on every import and never written to __pycache__.
        return compile(source.replace(_OLD, _NEW), self.path, "exec", dont_inherit=True)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None:
            return None
        loader = _PatchedLoader(fullname, spec.origin)
        return importlib.util.spec_from_file_location(fullname, spec.origin, loader=loader)


def load_pyas2lib() -> Any:
    """Import and return ``pyas2lib.as2`` with oscrypto's version detection fixed."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    import pyas2lib.as2  # type: ignore[import-untyped]

    return pyas2lib.as2
