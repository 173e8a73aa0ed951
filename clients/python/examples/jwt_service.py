"""A FastAPI service that issues JWTs signed by a key that never leaves the HSM.

    pip install signd-client fastapi uvicorn
    signctl create api-tokens --type ec-p256 --verify-grace 1d
    SIGND_JWT_KEY=api-tokens uvicorn jwt_service:app

- ``POST /token`` with ``{"sub": "alice"}`` answers a JWT (ES256 for an ec-p256
  key) whose ``kid`` names the key and version that signed it.
- ``GET /.well-known/jwks.json`` answers the JWK Set that relying parties
  verify with: every version of the key that may still verify, so tokens
  issued before a rotation keep verifying until their version retires.

The handlers are ``async``: one ``AsyncClient`` (asyncio here; it works the
same under trio) keeps a pool of connections to signd and serves every
request.  A threaded app (plain ``def`` handlers, Flask, Django) uses one
``signd_client.Client`` the same way.  Rotation needs nothing from this
service: ``sign_jwt_async`` moves on to the new version by itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel, Field

from signd_client import AsyncClient
from signd_client.errors import ConnectionFailed, SigndError, WireError
from signd_client.jose import sign_jwt_async
from signd_client.keys import AsyncSigndPrivateKey

KEY_NAME = os.environ.get("SIGND_JWT_KEY", "api-tokens")
ISSUER = os.environ.get("JWT_ISSUER", "https://auth.example.internal")
LIFETIME = int(os.environ.get("JWT_LIFETIME", "600"))  # seconds


class TokenRequest(BaseModel):
    sub: str = Field(min_length=1, max_length=256)
    aud: str = "services"


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "Bearer"  # noqa: S105 (a token type, not a password)
    expires_in: int


class State:
    client: AsyncClient
    key: AsyncSigndPrivateKey


state = State()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The socket comes from SIGND_SOCKET (or signd's default path).
    async with AsyncClient() as client:
        state.client = client
        state.key = await client.private_key(KEY_NAME)  # fails fast if the key is missing
        yield


app = FastAPI(title="JWT issuer backed by signd", lifespan=lifespan)


@app.post("/token")
async def issue(req: TokenRequest) -> TokenResponse:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": req.sub,
        "aud": req.aud,
        "iat": now,
        "nbf": now,
        "exp": now + LIFETIME,
    }
    try:
        token = await sign_jwt_async(state.key, claims)
    except SigndError as exc:  # e.g. token_unavailable while the HSM reconnects
        transient = isinstance(exc, ConnectionFailed) or (
            isinstance(exc, WireError) and exc.retryable
        )
        raise HTTPException(
            503 if transient else 500,
            f"signing failed: {exc}",
            headers={"Retry-After": "1"} if transient else None,
        ) from exc
    return TokenResponse(access_token=token, expires_in=LIFETIME)


@app.get("/.well-known/jwks.json")
async def jwks(response: Response) -> dict[str, Any]:
    # Short caching: a rotation shows up within a minute; old kids stay for the grace.
    response.headers["Cache-Control"] = "public, max-age=60"
    return (await state.client.jwks([KEY_NAME])).to_wire()
