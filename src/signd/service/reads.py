"""The reads: health, whoami, list_keys, key_info, public_key, jwks.

Answered at once in the caller's task, but for a key this process has not
seen yet, which is looked up on the token first.
"""

from __future__ import annotations

import dataclasses
import time

from .. import __version__
from ..audit.log import AUDIT_KEY
from ..errors import InvalidArgument, UnsupportedAlgorithm
from ..keys.records import check_key_name
from ..protocol import (
    MAX_JWKS_KEYS,
    PROTOCOL_VERSION,
    Health,
    Jwk,
    Jwks,
    JwksArgs,
    KeyGrant,
    KeyList,
    KeyRefArgs,
    PublicKey,
    PublicKeyArgs,
    Request,
    TokenStatus,
    Whoami,
)
from ..token.ipc import TokenInfo
from ..token.tokenset import TokenSet
from .base import RESERVED_KEYS, RESERVED_VERBS
from .context import Batch
from .convert import jwks_of, key_info, key_summary
from .signing import Signing

__all__ = ["Reads"]


class Reads(Signing):
    """What a client may ask about the daemon and the keys."""

    def op_health(self, req: Request, batch: Batch) -> None:
        health = self.health()
        if self.audit_head is not None and self.policy.allows(batch.who, "read", AUDIT_KEY):
            health = dataclasses.replace(health, audit=self.audit_head())
        self._answer(batch.reply, req, health)

    def op_whoami(self, req: Request, batch: Batch) -> None:
        """The caller as the kernel recorded it, and the verbs the rules grant
        it on each key this process holds (a reserved key: only those a client
        may use on it)."""
        who = batch.who
        grants = []
        for name in sorted(k.record.name for k in self.keystore.all()):
            verbs = self.policy.granted(who, name)
            if name in RESERVED_KEYS:
                verbs &= RESERVED_VERBS
            if verbs:
                grants.append(KeyGrant(name=name, verbs=tuple(sorted(verbs))))
        answer = Whoami(
            uid=who.uid,
            gid=who.gid,
            groups=tuple(sorted(who.groups | {who.gid})),
            user=who.user,
            keys=tuple(grants),
        )
        self._answer(batch.reply, req, answer)

    def op_list_keys(self, req: Request, batch: Batch) -> None:
        """Only the keys this peer may read."""
        allows, who = self.policy.allows, batch.who
        keys = tuple(
            key_summary(k) for k in self.keystore.all() if allows(who, "read", k.record.name)
        )
        self._answer(batch.reply, req, KeyList(keys=keys))

    def op_key_info(self, req: Request, batch: Batch) -> None:
        args = req.args
        assert isinstance(args, KeyRefArgs)
        key = self._key_or_none(args.key)
        if key is None:
            self._defer_lookup(req, args.key, batch)
            return
        self._answer(batch.reply, req, self._with_mark(key_info(key.at(self._clock()))))

    def op_public_key(self, req: Request, batch: Batch) -> None:
        args = req.args
        assert isinstance(args, PublicKeyArgs)
        key = self._key_or_none(args.key)
        if key is None:
            self._defer_lookup(req, args.key, batch)
            return
        key = key.at(self._clock())
        if args.version is not None:
            v = key.version(args.version)
        else:  # the version sign uses, or else the newest
            v = key.signer or key.version(key.record.latest.version)
        if v.public_key_pem is None:
            raise UnsupportedAlgorithm(
                f"key {key.record.name!r} is an {key.kt.name} key: a secret on the token, "
                "with no public key"
            )
        answer = PublicKey(
            name=key.record.name,
            version=v.record.version,
            type=key.kt.name,
            public_key_pem=v.public_key_pem,
        )
        self._answer(batch.reply, req, answer)

    def op_jwks(self, req: Request, batch: Batch) -> None:
        """Every version of the named keys that may verify now, as JWKs.

        Raises: InvalidArgument (no names, too many, or not key names),
        PermissionDenied (a name the peer may not read).
        """
        args = req.args
        assert isinstance(args, JwksArgs)
        # The limit counts the names as sent, repeats included (PROTOCOL.md).
        if not 1 <= len(args.keys) <= MAX_JWKS_KEYS:
            raise InvalidArgument(
                f"'keys' must name 1 to {MAX_JWKS_KEYS} keys, got {len(args.keys)}"
            )
        names = list(dict.fromkeys(args.keys))  # repeats named once, order kept
        for name in names:
            check_key_name(name)
            self.policy.check(batch.who, "read", name)
        now = self._clock()
        out: list[Jwk] = []
        for name in names:
            key = self._key_or_none(name)
            if key is None:
                self._defer_lookup(req, name, batch)
                return
            out.extend(jwks_of(key.at(now)))
        self._answer(batch.reply, req, Jwks(keys=tuple(out)))

    def health(self) -> Health:
        ready = self.ready
        tokens = None
        status, detail = "ok", None
        if isinstance(self.token, TokenSet):
            states = self.token.states()
            tokens = tuple(self._token_status(info, state) for info, state in states)
            away = [i + 1 for i, (_, state) in enumerate(states) if state != "serving"]
            if ready and away:
                status = "degraded"
                detail = f"token {', '.join(map(str, away))} of {len(states)} not serving"
        if not ready:
            status, detail = "unavailable", "the token is not open or the keys are not loaded"
        info = self.token.info
        return Health(
            status=status,
            live=True,
            ready=ready,
            daemon_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            uptime=time.monotonic() - self._started,
            keys=len(self.keystore),
            token=None if info is None else self._token_status(info, None),
            detail=detail,
            tokens=tokens,
        )

    def _token_status(self, info: TokenInfo | None, state: str | None) -> TokenStatus:
        if info is None:  # never opened (with several tokens only)
            return TokenStatus(
                label="", manufacturer="", model="", serial="", logged_in=False, state=state
            )
        return TokenStatus(
            label=info.label,
            manufacturer=info.manufacturer,
            model=info.model,
            serial=info.serial,
            logged_in=state in (None, "serving", "catching_up"),
            profile=self.profile.name,
            key_types=tuple(t for t, why in info.key_types.items() if why is None),
            mechanisms=tuple(info.mechanisms),
            state=state,
        )
