"""Certificates and node keys for a TLS federation, made with ``cryptography``.

``addiff certs create DIR --host server.example.org``
    DIR/ca.crt (give it to every hospital), DIR/ca.key (keep it offline), DIR/server.pem and
    DIR/server.key (the SuperLink's; SubjectAlternativeNames = the given hosts, plus
    localhost and 127.0.0.1 unless --no-loopback).
``addiff certs node-key DIR NAME``
    DIR/NAME (private key, OpenSSH format, stays at the hospital) and DIR/NAME.pub (public
    key, given to the server operator, who registers it: ``addiff server start --auth
    --authorized-keys DIR/NAME.pub``). EC P-384, as Flower's SuperNode authentication expects.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import re
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


_HOSTNAME = re.compile(r"(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not _HOSTNAME.fullmatch(h):
                raise ValueError(f"--host {h[:80]!r}: not a host name (letters, digits, '-' and dots) or an "
                                 "IP address") from None
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def create_certificates(out_dir: Path, hosts: list[str], *, days: int = 365, loopback: bool = True,
                        overwrite: bool = False) -> dict[str, Path]:
    out_dir = Path(out_dir)
    hosts = list(dict.fromkeys([h.strip() for h in hosts if h.strip()] + (["localhost", "127.0.0.1"] if loopback else [])))
    if not hosts:
        raise ValueError("give at least one --host (the name or address hospitals use to reach the server)")
    _san(hosts)  # every name checked before anything is written
    paths = {"ca_cert": out_dir / "ca.crt", "ca_key": out_dir / "ca.key", "server_cert": out_dir / "server.pem",
             "server_key": out_dir / "server.key"}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists (use --overwrite to replace the certificates)")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "addiff-fl federation CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "addiff-fl")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "addiff-fl")])
    srv_cert = (x509.CertificateBuilder().subject_name(srv_name).issuer_name(ca_name)
                .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(_san(hosts), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    nopw = serialization.NoEncryption()
    _write(paths["ca_key"], ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopw), private=True)
    _write(paths["ca_cert"], ca_cert.public_bytes(pem))
    _write(paths["server_key"], srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopw), private=True)
    _write(paths["server_cert"], srv_cert.public_bytes(pem))
    return paths


def create_node_key(out_dir: Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    priv, pub = out_dir / name, out_dir / f"{name}.pub"
    if (priv.exists() or pub.exists()) and not overwrite:
        raise FileExistsError(f"{priv} exists (use --overwrite to replace the key pair)")
    key = ec.generate_private_key(ec.SECP384R1())
    _write(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
           + f" {name}\n".encode())
    return priv, pub


def cert_hosts(cert_file: Path) -> list[str]:
    """SubjectAlternativeNames of a certificate (to pick the address the CLI connects to)."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in san.get_values_for_type(x509.IPAddress)]


def add_parser(sub) -> None:
    c = sub.add_parser("certs", help="TLS certificates for the SuperLink and authentication keys for SuperNodes")
    csub = c.add_subparsers(dest="certs_command", metavar="CERTS_COMMAND", required=True)
    s = csub.add_parser("create", help="a CA and a server certificate for the given host names/addresses")
    s.add_argument("dir", help="output folder (ca.crt, ca.key, server.pem, server.key)")
    s.add_argument("--host", action="append", default=[], help="server DNS name or IP (repeat); "
                                                              "localhost and 127.0.0.1 are always added")
    s.add_argument("--days", type=int, default=365)
    s.add_argument("--no-loopback", action="store_true", help="do not add localhost / 127.0.0.1")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_certs_create)
    s = csub.add_parser("node-key", help="an EC key pair that authenticates one hospital's SuperNode")
    s.add_argument("dir")
    s.add_argument("name", help="key name, e.g. the site name (writes DIR/NAME and DIR/NAME.pub)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_certs_node_key)


def cmd_certs_create(args) -> int:
    from addiff_core.errors import UserError
    from addiff_core.options import check_options

    check_options(args, "--days")  # a negative or huge validity: one line, not an expired CA or a traceback
    try:
        paths = create_certificates(Path(args.dir), args.host, days=args.days, loopback=not args.no_loopback,
                                    overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        raise UserError(str(e)) from None
    print(f"CA certificate    : {paths['ca_cert']}  (give to every hospital: addiff client start --ca ...)")
    print(f"CA key            : {paths['ca_key']}  (keep secret, offline)")
    print(f"server certificate: {paths['server_cert']}  hosts: {', '.join(cert_hosts(paths['server_cert']))}")
    print(f"server key        : {paths['server_key']}")
    return 0


def cmd_certs_node_key(args) -> int:
    from addiff_core.errors import UserError

    try:
        priv, pub = create_node_key(Path(args.dir), args.name, overwrite=args.overwrite)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    print(f"private key: {priv}  (stays at the hospital: addiff client start --auth-key {priv})")
    print(f"public key : {pub}  (the server registers it: addiff server start --auth --authorized-keys {pub})")
    return 0
