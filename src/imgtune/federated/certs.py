"""Test certificates for a federation's TLS (``imgtune federate certs DIR``), made with ``cryptography``.

A self-signed certificate authority (ca.crt, ca.key) and the SuperLink's certificate signed by it
(server.crt, server.key) for the names and addresses given (localhost and 127.0.0.1 always). The
SuperLink presents server.crt; every site and ``flwr run`` verify it against ca.crt. For production,
use certificates from your own authority: the same three files, the same flags.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from ..atomic import atomic_write_bytes

CA, CA_KEY, SERVER, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, issuer: str, public_key, signing_key, days: int, ca: bool, names: list[str]):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _san(name: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_certificates(folder: str | Path, hosts: list[str] = (), days: int = 30) -> dict[str, Path]:
    """ca.crt/ca.key and server.crt/server.key for ``hosts`` (plus localhost, 127.0.0.1, ::1)."""
    from cryptography.hazmat.primitives import serialization

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(["localhost", "127.0.0.1", "::1", *hosts]))
    ca_key, server_key = _key(), _key()
    ca = _certificate("imgtune federation test CA", "imgtune federation test CA", ca_key.public_key(), ca_key, days,
                      True, [])
    server = _certificate(names[0] if not hosts else hosts[0], "imgtune federation test CA", server_key.public_key(),
                          ca_key, days, False, names)
    pem = serialization.Encoding.PEM
    files = {CA: ca.public_bytes(pem), CA_KEY: _pem_key(ca_key), SERVER: server.public_bytes(pem),
             SERVER_KEY: _pem_key(server_key)}
    for name, content in files.items():
        atomic_write_bytes(folder / name, content)
        if name.endswith(".key"):
            (folder / name).chmod(0o600)
    return {name: folder / name for name in files}
