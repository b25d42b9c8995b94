"""Which transport failures are TLS handshake failures: grpc core's and the ssl module's words.

The strings are what grpc 1.85 reports against a real server (see test_chain_tls.py); older
releases say ``Ssl handshake failed``.
"""

from __future__ import annotations

import ssl

import grpc
import pytest

from interceptors.tls import grpc_tls_problem, ssl_tls_problem

LAST_ERROR = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:34321: "
CERTIFICATE_PROBLEMS = [
    "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
    "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK",
    "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
    "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired: OK",
    "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:"
    "OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK",
    "Custom verification check failed with error: UNAUTHENTICATED: Hostname Verification Check "
    "failed.",
    "Ssl handshake failed: SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
    "CERTIFICATE_VERIFY_FAILED",
]
TRANSIENT = [
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:33301: "
    "Handshake read failed (Socket closed)",
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:42435: "
    "Socket closed",
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
    "Failed to connect to remote host: Connection refused",
    "Ssl handshake failed: SSL_ERROR_SYSCALL",
    "scripted UNAVAILABLE",
]


@pytest.mark.parametrize("problem", CERTIFICATE_PROBLEMS)
def test_grpc_certificate_problems_are_tls_handshake_failures(problem: str) -> None:
    assert grpc_tls_problem(grpc.StatusCode.UNAVAILABLE, LAST_ERROR + problem) == (
        LAST_ERROR + problem
    )


@pytest.mark.parametrize("details", TRANSIENT)
def test_a_closed_or_refused_connection_is_not_a_tls_handshake_failure(details: str) -> None:
    assert grpc_tls_problem(grpc.StatusCode.UNAVAILABLE, details) is None


def test_only_unavailable_can_be_a_tls_handshake_failure() -> None:
    details = LAST_ERROR + CERTIFICATE_PROBLEMS[0]
    assert grpc_tls_problem(grpc.StatusCode.INTERNAL, details) is None


def test_certificate_verification_error_is_a_tls_handshake_failure() -> None:
    error = ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
    )
    assert ssl_tls_problem(error) == str(error)


def test_an_ssl_eof_mid_handshake_is_not_a_tls_handshake_failure() -> None:
    assert ssl_tls_problem(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")) is None
