"""The development PKI of ``make run``: one CA and an X.509 identity per service and operator.

Each leaf certificate has exactly one SPIFFE URI SAN (``spiffe://<trust-domain>/ns/<namespace>/
sa/<name>``), which is what servers authorize on, plus DNS/IP SANs (the name, ``localhost``,
the loopback addresses) so TLS hostname checks of gRPC, ``buf curl`` and grpcurl pass. Keys
are EC P-256: a whole mesh's certificates are made in well under a second. Files are written
atomically; a leaf is renewed once less than a third of its lifetime is left.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "paymesh.local"
DEFAULT_NAMESPACE = "paymesh"
#: The identity of people and tools (``make status``, ``buf curl``, the chaos suite).
OPERATOR = "operator"
CA_VALIDITY = datetime.timedelta(days=365)
LEAF_VALIDITY = datetime.timedelta(days=30)

Clock = Callable[[], datetime.datetime]


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def spiffe_id(
    name: str, *, trust_domain: str = DEFAULT_TRUST_DOMAIN, namespace: str = DEFAULT_NAMESPACE
) -> str:
    """The SPIFFE id of mesh identity ``name``."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{name}"


def name_of(spiffe: str, *, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str | None:
    """The identity name in ``spiffe`` when it belongs to ``trust_domain``, else None."""
    prefix = f"spiffe://{trust_domain}/ns/"
    if not spiffe.startswith(prefix):
        return None
    _, sep, name = spiffe.removeprefix(prefix).partition("/sa/")
    return name if sep and name and "/" not in name else None


@dataclass(frozen=True, slots=True, kw_only=True)
class PkiLayout:
    """Where the files of a development PKI live."""

    directory: Path
    """Folder of the CA and every leaf (``var/pki``)."""

    @property
    def ca_cert(self) -> Path:
        """The CA certificate every party trusts."""
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The CA's private key (only the launcher and this module read it)."""
        return self.directory / "ca-key.pem"

    def cert(self, name: str) -> Path:
        """Certificate of identity ``name``."""
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        """Private key of identity ``name``."""
        return self.directory / f"{name}-key.pem"


def ensure_dev_pki(
    directory: Path,
    names: Iterable[str],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    namespace: str = DEFAULT_NAMESPACE,
    clock: Clock = _utcnow,
    leaf_validity: datetime.timedelta = LEAF_VALIDITY,
) -> list[str]:
    """Create the CA and a leaf per name where missing, renew leaves near expiry.

    Safe to call from several processes at once (a file lock serializes them). Returns the
    names whose certificate was (re)issued.
    """
    layout = PkiLayout(directory=directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    issued: list[str] = []
    with _locked(directory / ".lock"):
        now = clock()
        ca_cert, ca_key = _load_or_create_ca(layout, trust_domain=trust_domain, now=now)
        for name in names:
            if _needs_renewal(layout.cert(name), ca_cert, now):
                _issue_leaf(
                    layout,
                    name,
                    ca_cert,
                    ca_key,
                    spiffe=spiffe_id(name, trust_domain=trust_domain, namespace=namespace),
                    now=now,
                    validity=leaf_validity,
                )
                issued.append(name)
    return issued


def issue_leaf_with(
    directory: Path,
    name: str,
    *,
    spiffe: str,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> None:
    """Issue ``name``'s leaf from the CA in ``directory`` with explicit SAN and validity.

    For tests that need what ``ensure_dev_pki`` never makes: an expired certificate, or one
    whose SPIFFE id claims another identity.
    """
    layout = PkiLayout(directory=directory)
    ca_cert, ca_key = _load_or_create_ca(layout, trust_domain="", now=not_before)
    _issue_leaf(
        layout,
        name,
        ca_cert,
        ca_key,
        spiffe=spiffe,
        now=not_before,
        validity=not_after - not_before,
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_or_create_ca(
    layout: PkiLayout, *, trust_domain: str, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if layout.ca_cert.exists() and layout.ca_key.exists():
        cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc > now:
            return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PayMesh development"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"PayMesh development CA {trust_domain}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_atomic(layout.ca_key, _key_pem(key), mode=0o600)
    _write_atomic(layout.ca_cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert, key


def _needs_renewal(path: Path, ca_cert: x509.Certificate, now: datetime.datetime) -> bool:
    if not path.exists():
        return True
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        return True
    if cert.issuer != ca_cert.subject:
        return True  # the CA was replaced: re-issue under the new one
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime / 3


def _issue_leaf(
    layout: PkiLayout,
    name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    spiffe: str,
    now: datetime.datetime,
    validity: datetime.timedelta,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(spiffe),
        x509.DNSName(name),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    # Key first: a reader that sees the new certificate finds its key already in place.
    _write_atomic(layout.key(name), _key_pem(key), mode=0o600)
    _write_atomic(layout.cert(name), cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def certificate_problem(cert_pem: bytes, key_pem: bytes, *, now: datetime.datetime) -> str | None:
    """Why ``cert_pem``/``key_pem`` cannot serve as an identity now, or None when they can."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        return f"unreadable certificate or key: {exc}"
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        return "the private key does not belong to the certificate"
    if cert.not_valid_after_utc <= now:
        return f"the certificate expired at {cert.not_valid_after_utc.isoformat()}"
    if cert.not_valid_before_utc > now:
        return f"the certificate is not valid before {cert.not_valid_before_utc.isoformat()}"
    return None


def spiffe_ids_of(cert_pem: bytes) -> list[str]:
    """The SPIFFE URI SANs of a certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]
