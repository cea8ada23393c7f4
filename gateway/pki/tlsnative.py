"""What ``ssl`` (CPython 3.11 to 3.13) cannot set on a context, set through the libssl it uses.

``ssl.SSLContext`` has no verification callback (to refuse, inside the handshake
and with the alert OpenSSL sends, a certificate that chains but is not pinned)
and no way to choose the TLS 1.3 cipher suites (``set_ciphers``
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
import weakref
from collections.abc import Callable
from typing import Any

from gateway.errors import MedgwError

# From openssl/ssl.h (stable ABI since OpenSSL 1.1.1).
_SSL_CTRL_MODE = 33
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_SESS_CACHE_OFF = 0
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
            fix="run medgw on a CPython 3.11 to 3.13 whose ssl module is linked to OpenSSL "
            "1.1.1 or later (as every Linux distribution's is)",
        ) from exc
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if (
        not pointer
        or lib.SSL_CTX_get_options(pointer) != context.options
        or lib.SSL_CTX_get_security_level(pointer) != security_level
    ):
        raise NativeTlsError(
            "the TLS context of Python's ssl module is not laid out as expected",
            fix="run medgw on CPython 3.11 to 3.13 (another interpreter or build is not supported)",
        )
    return lib, pointer


def no_session_cache(context: ssl.SSLContext, *, security_level: int) -> None:
    """The server keeps no sessions: a client cannot resume one by its session ID (with
    ``OP_NO_TICKET`` and no TLS 1.3 tickets, nothing can be resumed at all)."""
    lib, pointer = _ssl_ctx(context, security_level)
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)


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


# -- the leaf certificate judged inside the handshake -----------------------------------

_X509_V_ERR_CERT_REJECTED = 28  # OpenSSL answers it with the bad_certificate alert
_X509_V_ERR_APPLICATION_VERIFICATION = 50
_VerifyCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
# The callbacks must live as long as their context (OpenSSL holds only a C pointer).
_callbacks: weakref.WeakKeyDictionary[ssl.SSLContext, Any] = weakref.WeakKeyDictionary()
CERT_REJECTED = _X509_V_ERR_CERT_REJECTED


@functools.cache
def _libcrypto() -> ctypes.CDLL:
    lib = _libssl()  # libcrypto's symbols resolve through libssl's handle too
    lib.SSL_CTX_set_cert_verify_callback.restype = None
    lib.SSL_CTX_set_cert_verify_callback.argtypes = [
        ctypes.c_void_p,
        _VerifyCallback,
        ctypes.c_void_p,
    ]
    lib.X509_verify_cert.restype = ctypes.c_int
    lib.X509_verify_cert.argtypes = [ctypes.c_void_p]
    lib.X509_STORE_CTX_get0_cert.restype = ctypes.c_void_p
    lib.X509_STORE_CTX_get0_cert.argtypes = [ctypes.c_void_p]
    lib.X509_STORE_CTX_set_error.restype = None
    lib.X509_STORE_CTX_set_error.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.i2d_X509.restype = ctypes.c_int
    lib.i2d_X509.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte))]
    return lib


def _der(lib: ctypes.CDLL, cert: int) -> bytes | None:
    size = lib.i2d_X509(cert, None)
    if size <= 0:
        return None
    buffer = (ctypes.c_ubyte * size)()
    cursor = ctypes.cast(buffer, ctypes.POINTER(ctypes.c_ubyte))
    if lib.i2d_X509(cert, ctypes.byref(cursor)) != size:
        return None
    return bytes(buffer)


def judge_leaf(
    context: ssl.SSLContext,
    *,
    security_level: int,
    accept: Callable[[bytes], bool],
    refused: Callable[[bytes], None] | None = None,
) -> None:
    """After OpenSSL's own path validation of the other side's certificate, ``accept``
    (called with the leaf's DER) decides; a certificate it refuses fails the handshake
    inside OpenSSL with X509_V_ERR_CERT_REJECTED, so the other side gets the
    bad_certificate alert a standard TLS implementation sends (a refusal after the
    handshake could only close the connection).  Any error in ``accept`` refuses.
    ``refused`` is told the leaf's DER whenever it is refused, by OpenSSL's validation
    or by ``accept`` (the handshake then fails in the same step: the failure can name
    the certificate); it decides nothing."""
    _, pointer = _ssl_ctx(context, security_level)
    try:
        lib = _libcrypto()
    except AttributeError as exc:
        raise NativeTlsError(
            f"the OpenSSL library of Python's ssl module lacks a certificate call ({exc})",
            fix="run medgw on a CPython 3.11 to 3.13 whose ssl module is linked to OpenSSL "
            "1.1.1 or later",
        ) from exc

    def verify(store: int | None, _arg: int | None) -> int:
        try:
            leaf = lib.X509_STORE_CTX_get0_cert(store)
            der = _der(lib, leaf) if leaf else None
            if lib.X509_verify_cert(store) != 1:
                # OpenSSL's own reason (unknown CA, expired, ...) and alert stand.
                if der is not None and refused is not None:
                    refused(der)
                return 0
            if der is not None and accept(der):
                return 1
            if der is not None and refused is not None:
                refused(der)
            lib.X509_STORE_CTX_set_error(store, _X509_V_ERR_CERT_REJECTED)
        except BaseException:  # nothing may cross into C: refuse instead
            lib.X509_STORE_CTX_set_error(store, _X509_V_ERR_APPLICATION_VERIFICATION)
        return 0

    callback = _VerifyCallback(verify)
    _callbacks[context] = callback
    lib.SSL_CTX_set_cert_verify_callback(pointer, callback, None)
