"""The examples in clients/python/examples/, run as a user runs them.

The certificate script runs as its own process against the real daemon and
``openssl`` checks what it wrote; the FastAPI JWT service runs in FastAPI's
TestClient and PyJWT verifies its tokens with the JWK Set it serves.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from cryptography import x509
from fastapi.testclient import TestClient

if TYPE_CHECKING:
    from conftest import Daemon

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("ca_type", ["ec-p384", "ed25519", "rsa-2048"])
def test_issue_certificate_script(
    signd: Daemon, key_name: str, tmp_path: Path, ca_type: str
) -> None:
    ca_key, web_key = f"{key_name}-ca", f"{key_name}-web"
    with signd.client() as c:
        c.create_key(ca_key, ca_type)
        c.create_key(web_key, "ec-p256")
    env = {**os.environ, "SIGND_SOCKET": signd.socket}

    def run(*args: str) -> None:
        out = subprocess.run(
            [sys.executable, str(EXAMPLES / "issue_certificate.py"), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert "wrote" in out.stdout

    run("ca", ca_key, "--cn", "Example Root CA", "--days", "30", "--out", "ca.pem")
    run(
        "csr",
        web_key,
        "--cn",
        "web.example.internal",
        "--dns",
        "web.example.internal",
        "--out",
        "web.csr",
    )
    run(
        "sign",
        ca_key,
        "--ca",
        "ca.pem",
        "--csr",
        "web.csr",
        "--dns",
        "web.example.internal",
        "--days",
        "7",
        "--out",
        "web.pem",
    )
    req = openssl("req", "-verify", "-in", str(tmp_path / "web.csr"), "-noout")
    assert req.returncode == 0, req.stderr
    assert "verify OK" in req.stdout + req.stderr
    ca = str(tmp_path / "ca.pem")
    for cert in ("ca.pem", "web.pem"):
        check = openssl("verify", "-CAfile", ca, "-x509_strict", str(tmp_path / cert))
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.strip().endswith(": OK")
    web = x509.load_pem_x509_certificate((tmp_path / "web.pem").read_bytes())
    with signd.client() as c:
        assert web.public_key() == c.private_key(web_key).public_key()
    san = web.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.example.internal"]
    # A CSR tampered with after signing is refused by the script.
    pem = (tmp_path / "web.csr").read_text()
    lines = pem.splitlines()
    body = lines[3]
    lines[3] = body[:10] + ("A" if body[10] != "A" else "B") + body[11:]
    (tmp_path / "bad.csr").write_text("\n".join(lines) + "\n")
    bad = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "issue_certificate.py"),
            "sign",
            ca_key,
            "--ca",
            "ca.pem",
            "--csr",
            "bad.csr",
            "--out",
            "bad.pem",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert bad.returncode != 0
    assert not (tmp_path / "bad.pem").exists()


def _load_service(monkeypatch: pytest.MonkeyPatch, socket: str, key: str) -> Any:
    monkeypatch.setenv("SIGND_SOCKET", socket)
    monkeypatch.setenv("SIGND_JWT_KEY", key)
    spec = importlib.util.spec_from_file_location("jwt_service", EXAMPLES / "jwt_service.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jwt_service(signd: Daemon, key_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256", verify_grace=3600)
    service = _load_service(monkeypatch, signd.socket, key_name)

    def check(http: TestClient, token: str) -> dict[str, Any]:
        keys = jwt.PyJWKSet.from_dict(http.get("/.well-known/jwks.json").json())
        kid = jwt.get_unverified_header(token)["kid"]
        claims: dict[str, Any] = jwt.decode(
            token, keys[kid].key, algorithms=["ES256"], audience="services"
        )
        return claims

    with TestClient(service.app) as http:
        first = http.post("/token", json={"sub": "alice"})
        assert first.status_code == 200, first.text
        old = first.json()["access_token"]
        assert check(http, old)["sub"] == "alice"
        assert jwt.get_unverified_header(old)["kid"] == f"{key_name}:1"
        with signd.client() as c:
            c.rotate(key_name)
        new = http.post("/token", json={"sub": "bob"}).json()["access_token"]
        assert jwt.get_unverified_header(new)["kid"] == f"{key_name}:2"
        assert check(http, new)["sub"] == "bob"
        assert check(http, old)["sub"] == "alice"  # still within version 1's grace
        assert http.post("/token", json={"sub": ""}).status_code == 422
