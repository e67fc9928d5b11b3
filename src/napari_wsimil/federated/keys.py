"""Keys for a federation without a PKI: a CA, the server's TLS certificate and one EC key pair per site.

Layout of ``DIR`` (what ``server`` and ``site`` look for):
``ca.pem`` (give it to every site: it checks the server with it), ``ca.key`` (keep it offline),
``server.pem``/``server.key`` (the server's TLS certificate, signed by the CA, for the names given),
``sites/<name>.key`` (a site's private key: give it to that site only) and ``sites/<name>.pub`` (registered
with the server, so that only these sites may join). Site keys are NIST P-384 EC keys in OpenSSH format,
what Flower's SuperNode authentication reads.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import WsimilError
from ..io.atomic import write_bytes

CA, CA_KEY, SERVER_CERT, SERVER_KEY, SITES = "ca.pem", "ca.key", "server.pem", "server.key", "sites"


def _private(path: Path, data: bytes) -> None:
    write_bytes(path, data)
    os.chmod(path, 0o600)


def make_keys(folder: str | os.PathLike[str], sites: Sequence[str], server_names: Sequence[str] = (),
              days: int = 825) -> Path:
    """Write the CA, the server certificate (valid for localhost, 127.0.0.1 and ``server_names``) and the site
    keys into ``folder``; an existing CA is never overwritten (re-issuing it would lock every site out)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(folder)
    if (out / CA).exists():
        raise WsimilError(f"{out} already holds a CA ({CA}); choose an empty folder")
    if not sites:
        raise WsimilError("--sites must be at least 1")
    (out / SITES).mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    pem = serialization.Encoding.PEM
    no_pass = serialization.NoEncryption()

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wsimil federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
          .not_valid_after(now + _dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))

    names: list[x509.GeneralName] = []
    for n in ["localhost", "127.0.0.1", "::1", *server_names]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            names.append(x509.DNSName(n))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(server_names) or ["localhost"])[0])]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
           .add_extension(x509.SubjectAlternativeName(names), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .sign(ca_key, hashes.SHA256()))
    _private(out / CA_KEY, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_pass))
    write_bytes(out / CA, ca.public_bytes(pem))
    _private(out / SERVER_KEY, srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_pass))
    write_bytes(out / SERVER_CERT, srv.public_bytes(pem))
    for name in sites:
        add_site_key(out, name)
    return out


def add_site_key(folder: str | os.PathLike[str], name: str) -> Path:
    """A new site's key pair ``sites/<name>.key`` / ``.pub``; returns the private key's path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise WsimilError(f"a site name must be a plain word, got {name!r}")
    folder = Path(folder) / SITES
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / f"{name}.key").exists():
        raise WsimilError(f"site {name} already has a key in {folder}")
    key = ec.generate_private_key(ec.SECP384R1())
    _private(folder / f"{name}.key", key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption()))
    write_bytes(folder / f"{name}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                       serialization.PublicFormat.OpenSSH)
                + f" wsimil-site-{name}\n".encode())
    return folder / f"{name}.key"


def site_public_keys(folder: str | os.PathLike[str]) -> list[Path]:
    return sorted((Path(folder) / SITES).glob("*.pub"))


def check_server_keys(folder: str | os.PathLike[str]) -> Path:
    folder = Path(folder)
    missing = [n for n in (CA, SERVER_CERT, SERVER_KEY) if not (folder / n).is_file()]
    if missing:
        raise WsimilError(f"{folder} lacks {', '.join(missing)}: make the keys with 'wsimil federate keys {folder}'")
    return folder


__all__ = ["CA", "SERVER_CERT", "SERVER_KEY", "SITES", "add_site_key", "check_server_keys", "make_keys",
           "site_public_keys"]
