"""Transport security of one process: which identity it holds and the gRPC credentials made of it.

Every mesh port requires mTLS. Development (``make run``, tests) uses the PKI under
``PAYMESH_PKI_DIR`` (default ``var/pki``), created on first use; production names its files with
``PAYMESH_TLS_CA_FILE``/``PAYMESH_TLS_CERT_FILE``/``PAYMESH_TLS_KEY_FILE``. Plaintext only with
``PAYMESH_INSECURE=1``, logged as a warning. Server credentials re-read rotated files on the next
handshake; :meth:`TransportSecurity.fingerprint` tells clients when to rebuild their channels.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from services.mesh import pki

log = logging.getLogger("paymesh.tls")

INSECURE_VAR = "PAYMESH_INSECURE"
PKI_DIR_VAR = "PAYMESH_PKI_DIR"
CA_FILE_VAR = "PAYMESH_TLS_CA_FILE"
CERT_FILE_VAR = "PAYMESH_TLS_CERT_FILE"
KEY_FILE_VAR = "PAYMESH_TLS_KEY_FILE"
TRUST_DOMAIN_VAR = "PAYMESH_TRUST_DOMAIN"
NAMESPACE_VAR = "PAYMESH_NAMESPACE"
ENV_VAR = "PAYMESH_ENV"
OPERATOR_CERT_VAR = "PAYMESH_OPERATOR_CERT_FILE"
OPERATOR_KEY_VAR = "PAYMESH_OPERATOR_KEY_FILE"


class TlsConfigError(ValueError):
    """The TLS settings are incomplete or name unusable files; the message says which."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsFiles:
    """The PEM files of one identity."""

    ca: Path
    """CA certificate(s) every peer's certificate must chain to."""
    cert: Path
    """This identity's certificate chain."""
    key: Path
    """This identity's private key."""

    def read(self) -> tuple[bytes, bytes, bytes]:
        """CA, certificate and key bytes."""
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()

    def fingerprint(self) -> tuple[int, ...]:
        """Modification times of the three files; changes when any is replaced."""
        return tuple(os.stat(path).st_mtime_ns for path in (self.ca, self.cert, self.key))


def is_production(environ: Mapping[str, str]) -> bool:
    """Whether ``PAYMESH_ENV`` says production (stricter defaults everywhere)."""
    return environ.get(ENV_VAR, "development").strip().lower() == "production"


def var_dir(environ: Mapping[str, str]) -> Path:
    """``PAYMESH_VAR_DIR`` or ``var``."""
    return Path(environ.get("PAYMESH_VAR_DIR", "var"))


def plaintext_requested(environ: Mapping[str, str]) -> bool:
    """Whether ``PAYMESH_INSECURE`` asks for plaintext: ``1`` does; ``0`` or unset does not.

    Raises:
        TlsConfigError: it holds anything else (a typo must not decide about TLS).
    """
    raw = environ.get(INSECURE_VAR, "")
    value = raw.strip()
    if value not in ("", "0", "1"):
        raise TlsConfigError(
            f"{INSECURE_VAR}={raw!r} is not 1 (plaintext, development only) or 0 (TLS, the default)"
        )
    return value == "1"


def pki_dir(environ: Mapping[str, str]) -> Path:
    """The development PKI folder: ``PAYMESH_PKI_DIR`` or ``<var>/pki``."""
    value = environ.get(PKI_DIR_VAR)
    return Path(value) if value else var_dir(environ) / "pki"


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportSecurity:
    """The identity of one process (a service or the operator) and how it dials and listens."""

    name: str
    """Mesh name of the identity (``order-service``, ``operator``)."""
    files: TlsFiles | None
    """Its PEM files; None only when plaintext was asked for."""
    trust_domain: str = pki.DEFAULT_TRUST_DOMAIN
    """SPIFFE trust domain of the mesh."""
    namespace: str = pki.DEFAULT_NAMESPACE
    """SPIFFE namespace of the mesh."""

    @classmethod
    def from_environ(
        cls, name: str, environ: Mapping[str, str], *, create: bool = True
    ) -> TransportSecurity:
        """The identity ``name`` runs with under ``environ``.

        In development the PKI is created (or the certificate renewed) when ``create``; tools
        pass False so they never mint a CA the running mesh does not trust.

        Raises:
            TlsConfigError: the variables are contradictory or name unreadable files.
        """
        trust_domain = environ.get(TRUST_DOMAIN_VAR) or pki.DEFAULT_TRUST_DOMAIN
        namespace = environ.get(NAMESPACE_VAR) or pki.DEFAULT_NAMESPACE
        if plaintext_requested(environ):
            return cls(name=name, files=None, trust_domain=trust_domain, namespace=namespace)
        variables = (CA_FILE_VAR, CERT_FILE_VAR, KEY_FILE_VAR)
        named = [environ.get(var) for var in variables]
        if any(named):
            if not all(named):
                given = [f"{var}={environ[var]!r}" for var in variables if environ.get(var)]
                missing = [var for var in variables if not environ.get(var)]
                raise TlsConfigError(
                    f"{', '.join(given)} but not {' or '.join(missing)}: set all of "
                    f"{CA_FILE_VAR}, {CERT_FILE_VAR} and {KEY_FILE_VAR}, or none"
                )
            ca, cert, key = (Path(str(value)) for value in named)
            files = TlsFiles(ca=ca, cert=cert, key=key)
        elif is_production(environ):
            raise TlsConfigError(
                f"{ENV_VAR}=production needs {CA_FILE_VAR}, {CERT_FILE_VAR} and {KEY_FILE_VAR} "
                f"(or {INSECURE_VAR}=1 for plaintext)"
            )
        else:
            directory = pki_dir(environ)
            layout = pki.PkiLayout(directory=directory)
            if create:
                pki.ensure_dev_pki(
                    directory, [name], trust_domain=trust_domain, namespace=namespace
                )
            elif not layout.cert(name).exists():
                raise TlsConfigError(
                    f"no {name} certificate in {directory} (the development PKI that `make run` "
                    f"creates); set {PKI_DIR_VAR}, or {OPERATOR_CERT_VAR}/{OPERATOR_KEY_VAR}"
                )
            files = TlsFiles(ca=layout.ca_cert, cert=layout.cert(name), key=layout.key(name))
        security = cls(name=name, files=files, trust_domain=trust_domain, namespace=namespace)
        security.check()
        return security

    @property
    def plaintext(self) -> bool:
        """True when the process was told to run without TLS."""
        return self.files is None

    @property
    def spiffe_id(self) -> str:
        """This identity's SPIFFE id."""
        return self.spiffe_id_of(self.name)

    def spiffe_id_of(self, name: str) -> str:
        """The SPIFFE id of mesh identity ``name`` in this trust domain."""
        return pki.spiffe_id(name, trust_domain=self.trust_domain, namespace=self.namespace)

    def check(self) -> None:
        """Raise TlsConfigError naming the problem when the identity cannot be used now."""
        if self.files is None:
            return
        try:
            _, cert, key = self.files.read()
        except OSError as exc:
            raise TlsConfigError(f"cannot read TLS file: {exc}") from exc
        problem = pki.certificate_problem(cert, key, now=datetime.datetime.now(datetime.UTC))
        if problem:
            raise TlsConfigError(f"{self.files.cert}: {problem}")
        ids = pki.spiffe_ids_of(cert)
        if ids != [self.spiffe_id]:
            raise TlsConfigError(
                f"{self.files.cert} must carry exactly one SPIFFE id {self.spiffe_id!r}; it has "
                f"{ids or 'none'}"
            )

    def fingerprint(self) -> tuple[int, ...]:
        """Changes when the identity's files were rotated."""
        return self.files.fingerprint() if self.files is not None else ()

    def server_credentials(self, *, require_client_cert: bool = True) -> grpc.ServerCredentials:
        """Credentials of a listening port; rotated files are picked up on the next handshake.

        With ``require_client_cert`` (every mesh port) a peer without a certificate of the
        mesh CA cannot connect; without it (the merchant-facing port) TLS authenticates only
        the server.
        """
        files = self.files
        if files is None:
            raise TlsConfigError("plaintext was asked for; there are no server credentials")
        state: dict[str, Any] = {"fingerprint": files.fingerprint()}

        def configuration() -> Any:
            ca, cert, key = files.read()
            return grpc.ssl_server_certificate_configuration(
                [(key, cert)], root_certificates=ca if require_client_cert else None
            )

        def fetch() -> Any:
            try:
                current = files.fingerprint()
                if current == state["fingerprint"]:
                    return None
                ca, cert, key = files.read()
                problem = pki.certificate_problem(
                    cert, key, now=datetime.datetime.now(datetime.UTC)
                )
                if problem:  # half-written rotation: keep serving the old pair
                    log.warning("not rotating to %s yet: %s", files.cert, problem)
                    return None
                state["fingerprint"] = current
                log.info("TLS identity rotated: %s", files.cert)
                return grpc.ssl_server_certificate_configuration(
                    [(key, cert)], root_certificates=ca if require_client_cert else None
                )
            except OSError as exc:
                log.warning("cannot re-read TLS files: %s", exc)
                return None

        return grpc.dynamic_ssl_server_credentials(
            configuration(), fetch, require_client_authentication=require_client_cert
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials of a channel that presents this identity and trusts the mesh CA."""
        if self.files is None:
            raise TlsConfigError("plaintext was asked for; there are no channel credentials")
        ca, cert, key = self.files.read()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def channel_options(self, target: str) -> list[tuple[str, Any]]:
        """Channel arguments that make TLS verify ``target``'s certificate by its mesh name."""
        return [] if self.files is None else [("grpc.ssl_target_name_override", target)]

    def aio_channel(
        self, target: str, address: str, *, options: Sequence[tuple[str, Any]] = ()
    ) -> aio.Channel:
        """A plain (chain-less) aio channel to mesh service ``target``, for probes and tools."""
        opts = [*options, *self.channel_options(target)]
        if self.files is None:
            return aio.insecure_channel(address, options=opts)
        return aio.secure_channel(address, self.channel_credentials(), options=opts)

    def merchant_aio_channel(self, target: str, address: str) -> aio.Channel:
        """A channel as a merchant dials ``target``'s public port: it verifies the server
        against the mesh CA and presents no certificate (the API key goes in metadata)."""
        if self.files is None:
            return aio.insecure_channel(address)
        credentials = grpc.ssl_channel_credentials(root_certificates=self.files.ca.read_bytes())
        return aio.secure_channel(address, credentials, options=self.channel_options(target))

    def sync_channel(
        self, target: str, address: str, *, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.Channel:
        """A plain blocking channel to mesh service ``target``, for tools and scripts."""
        opts = [*options, *self.channel_options(target)]
        if self.files is None:
            return grpc.insecure_channel(address, options=opts)
        return grpc.secure_channel(address, self.channel_credentials(), options=opts)


def operator_security(environ: Mapping[str, str]) -> TransportSecurity:
    """The operator identity of tools (``make status``, the chaos suite, benchmarks).

    ``PAYMESH_OPERATOR_CERT_FILE``/``PAYMESH_OPERATOR_KEY_FILE`` (with ``PAYMESH_TLS_CA_FILE``)
    name a production operator certificate; otherwise the development PKI's ``operator.pem``.
    """
    cert, key = environ.get(OPERATOR_CERT_VAR), environ.get(OPERATOR_KEY_VAR)
    env = dict(environ)
    if cert or key:
        env[CERT_FILE_VAR], env[KEY_FILE_VAR] = cert or "", key or ""
    else:
        env.pop(CERT_FILE_VAR, None)
        env.pop(KEY_FILE_VAR, None)
        env.pop(CA_FILE_VAR, None)
    return TransportSecurity.from_environ(pki.OPERATOR, env, create=False)


def peer_identity(context: Any) -> str | None:
    """The verified SPIFFE id of the caller of a server call, from the TLS auth context.

    Only the transport sets it (from the client certificate's single SPIFFE URI SAN); no
    header can.
    """
    values = context.auth_context().get("peer_spiffe_id")
    if not values:
        return None
    value = values[0]
    return value.decode() if isinstance(value, bytes) else str(value)
