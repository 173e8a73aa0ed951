"""Issue X.509 certificates with a CA key that never leaves the HSM.

    pip install signd-client
    signctl create ca-root --type ec-p384

    # a self-signed CA certificate for the key
    python issue_certificate.py ca ca-root --cn "Example Root CA" --days 3650 --out ca.pem
    # a CSR for another key held by signd (its private key stays on the token too)
    python issue_certificate.py csr web-tls --cn web.example.internal --out web.csr
    # the CA signs the CSR: a TLS server certificate
    python issue_certificate.py sign ca-root --ca ca.pem --csr web.csr \\
        --dns web.example.internal --days 90 --out web.pem
    openssl verify -CAfile ca.pem web.pem

The signd key objects (``Client.private_key``) are ``cryptography`` private
keys, so ``x509.CertificateBuilder`` and ``CertificateSigningRequestBuilder``
sign with them as with any local key.  Each object is pinned to one key
version: the certificate's public key always matches its signature.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signd_client import Client, SigndError
from signd_client.keys import SigndPrivateKey


def _hash(key: SigndPrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """Ed25519 signs without a separate hash; P-384 pairs with SHA-384."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    return hashes.SHA384() if key.key_type == "ec-p384" else hashes.SHA256()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=days)
    )


def self_signed_ca(key: SigndPrivateKey, cn: str, days: int) -> x509.Certificate:
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return _validity(builder, days).sign(key, _hash(key))


def csr(key: SigndPrivateKey, cn: str, dns: list[str]) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(cn))
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    return builder.sign(key, _hash(key))


def sign_csr(
    ca_key: SigndPrivateKey,
    ca_cert: x509.Certificate,
    request: x509.CertificateSigningRequest,
    dns: list[str],
    days: int,
) -> x509.Certificate:
    if not request.is_signature_valid:
        raise ValueError("the CSR's signature does not verify")
    if ca_cert.public_key() != ca_key.public_key():
        raise ValueError(
            f"{ca_key.name} version {ca_key.version} is not the key of this CA certificate"
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(request.subject)
        .issuer_name(ca_cert.subject)
        .public_key(request.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    return _validity(builder, days).sign(ca_key, _hash(ca_key))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", help="signd's socket (default: $SIGND_SOCKET)")
    sub = p.add_subparsers(dest="cmd", required=True)
    ca = sub.add_parser("ca", help="a self-signed CA certificate")
    req = sub.add_parser("csr", help="a certificate signing request")
    sig = sub.add_parser("sign", help="issue a certificate for a CSR")
    for sp in (ca, req, sig):
        sp.add_argument("key", help="the signd key that signs")
        sp.add_argument("--version", type=int, help="key version (default: current)")
        sp.add_argument("--out", type=Path, required=True, help="PEM file to write")
    for sp in (ca, req):
        sp.add_argument("--cn", required=True, help="subject common name")
    for sp in (req, sig):
        sp.add_argument("--dns", action="append", default=[], help="a DNS subjectAltName")
    for sp in (ca, sig):
        sp.add_argument("--days", type=int, default=365)
    sig.add_argument("--ca", type=Path, required=True, help="the CA certificate (PEM)")
    sig.add_argument("--csr", type=Path, required=True, help="the request (PEM)")
    args = p.parse_args(argv)
    try:
        with Client(args.socket) as client:
            key = client.private_key(args.key, args.version)
            pem: bytes
            if args.cmd == "ca":
                pem = self_signed_ca(key, args.cn, args.days).public_bytes(
                    serialization.Encoding.PEM
                )
            elif args.cmd == "csr":
                pem = csr(key, args.cn, args.dns).public_bytes(serialization.Encoding.PEM)
            else:
                ca_cert = x509.load_pem_x509_certificate(args.ca.read_bytes())
                request = x509.load_pem_x509_csr(args.csr.read_bytes())
                cert = sign_csr(key, ca_cert, request, args.dns, args.days)
                pem = cert.public_bytes(serialization.Encoding.PEM)
    except (SigndError, ValueError, OSError) as exc:
        print(f"issue_certificate: {exc}", file=sys.stderr)
        return 1
    args.out.write_bytes(pem)
    print(f"wrote {args.out} (signed by {key.name} version {key.version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
