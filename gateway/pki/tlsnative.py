"""What Python 3.11's ``ssl`` cannot set on a context, set through the libssl it uses.

``ssl.SSLContext`` has no way to choose the TLS 1.3 cipher suites (``set_ciphers``
only governs TLS 1.2 and below) nor more than one key-exchange group
(``set_ecdh_curve`` takes one), and OpenSSL completes a server's certificate
chain from the trust store, root included, when the certificate file holds no
chain.  OpenSSL has a call for each; this module makes them on the ``SSL_CTX``
of a stdlib context, through ``ctypes`` and the very libssl the ``_ssl`` module
is linked to (so the context stays a stdlib one: asyncio and aiohttp take it
as it is; pyOpenSSL's contexts cannot be used by either).

The ``SSL_CTX`` pointer is the first field of the ``_ssl._SSLContext`` object;
before anything is set it is checked against the context (its options and its
security level, read through both interfaces), and the suites are read back
through ``ssl`` afterwards.  Any mismatch, or a libssl without these calls,
raises :class:`NativeTlsError`: the gateway then refuses to start rather than
run with the library defaults.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import ssl

from gateway.errors import MedgwError

# From openssl/ssl.h (stable ABI since OpenSSL 1.1.1).
_SSL_CTRL_MODE = 33
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_MODE_NO_AUTO_CHAIN = 0x00000008


class NativeTlsError(MedgwError):
    """The TLS library cannot be told what the policy requires."""


@functools.cache
def _libssl() -> ctypes.CDLL:
    lib = ctypes.CDLL(_ssl.__file__)  # symbols resolve in the libssl it is linked to
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_security_level.restype = ctypes.c_int
    lib.SSL_CTX_get_security_level.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
    lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    return lib


def _ssl_ctx(context: ssl.SSLContext, security_level: int) -> tuple[ctypes.CDLL, int]:
    try:
        lib = _libssl()
    except (OSError, AttributeError) as exc:
        raise NativeTlsError(
            f"cannot reach the OpenSSL library of Python's ssl module ({exc})",
            fix="run medgw on a CPython 3.11 whose ssl module is linked to OpenSSL 1.1.1 or "
            "later (as every Linux distribution's is)",
        ) from exc
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if (
        not pointer
        or lib.SSL_CTX_get_options(pointer) != context.options
        or lib.SSL_CTX_get_security_level(pointer) != security_level
    ):
        raise NativeTlsError(
            "the TLS context of Python's ssl module is not laid out as expected",
            fix="run medgw on CPython 3.11 (another interpreter or build is not supported)",
        )
    return lib, pointer


def restrict(
    context: ssl.SSLContext, *, tls13_suites: str, groups: str, security_level: int
) -> None:
    """Only ``tls13_suites`` and ``groups`` (OpenSSL lists, ``:``-separated) may be
    negotiated, and only the chain loaded with the certificate is sent (OpenSSL adds
    nothing, in particular no root, from the trust store).  ``security_level`` is the
    one already set on ``context`` (a check that the right structure is changed)."""
    lib, pointer = _ssl_ctx(context, security_level)
    if lib.SSL_CTX_set_ciphersuites(pointer, tls13_suites.encode()) != 1:
        raise NativeTlsError(f"OpenSSL refused the TLS 1.3 cipher suites {tls13_suites}")
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
        raise NativeTlsError(f"OpenSSL refused the key-exchange groups {groups}")
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_MODE, _SSL_MODE_NO_AUTO_CHAIN, None)
    offered = [c["name"] for c in context.get_ciphers() if c.get("protocol") == "TLSv1.3"]
    if offered != tls13_suites.split(":"):
        raise NativeTlsError(
            f"TLS 1.3 cipher suites read back as {offered}, not {tls13_suites}",
            fix="report this with the output of `openssl version`",
        )
