"""Certificates and keys for a TLS + SuperNode-authentication test (``fedtune flower certs``).

Writes, under one folder:

``ca.crt`` / ``ca.key``         a self-signed certificate authority (give ``ca.crt`` to every
                                SuperNode and to the ``flwr`` CLI: ``--root-certificates``)
``server.pem`` / ``server.key`` the SuperLink's certificate, signed by the CA, valid for the
                                host names and IP addresses given (default 127.0.0.1, localhost)
``node-N`` / ``node-N.pub``     one EC P-384 key pair per SuperNode in OpenSSH format (the
                                private key stays on the node: ``--auth-supernode-private-key``;
                                the public key is registered: ``flwr supernode register``)

For a test, not for production: the keys are unencrypted files and the CA key sits next to them.
Uses the ``cryptography`` package (a Flower dependency); the README shows the openssl commands.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key of each is <key>.pub

    @classmethod
    def in_dir(cls, out: Path, nodes: int) -> CertFiles:
        return cls(out / "ca.crt", out / "server.pem", out / "server.key",
                   tuple(out / f"node-{i}" for i in range(nodes)))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey,
               fmt: serialization.PrivateFormat) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_certs(out: Path, nodes: int, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
               days: int = 30) -> CertFiles:
    """Write a CA, a server certificate for ``hosts`` and ``nodes`` SuperNode key pairs."""
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or IP address")
    out.mkdir(parents=True, exist_ok=True)
    files = CertFiles.in_dir(out, nodes)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("fedtune test CA"))
               .issuer_name(_name("fedtune test CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, key_cert_sign=True, crl_sign=True,
                   content_commitment=False, key_encipherment=False, data_encipherment=False,
                   key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    _write_key(out / "ca.key", ca_key, serialization.PrivateFormat.PKCS8)
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
                   .issuer_name(ca_cert.subject).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(until)
                   .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .sign(ca_key, hashes.SHA256()))
    _write_key(files.server_key, server_key, serialization.PrivateFormat.PKCS8)
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))

    for path in files.node_keys:
        key = ec.generate_private_key(ec.SECP384R1())
        _write_key(path, key, serialization.PrivateFormat.OpenSSH)
        path.with_name(path.name + ".pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return files
