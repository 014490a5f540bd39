"""Token verification and minting (JWT, explicit algorithm allowlist).

A token's ``sub`` is the user id and ``role`` is one of user, publisher, admin
(default user). ``exp`` is required; ``nbf`` is honoured; ``iss`` and ``aud``
are checked when configured. ``alg: none`` is never accepted, and the key is
chosen by the configured algorithm family, so a token signed with HS256 using
the RSA public key as secret (algorithm confusion) fails.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import jwt
import orjson

from rtserver.config import AuthConfig, Role
from rtserver.protocol import FORBIDDEN, UNAUTHORIZED, ProtocolError

ROLES: tuple[str, ...] = get_args(Role)
_RANK = {"user": 0, "publisher": 1, "admin": 2}
#: The last second of the year 9999: a token time past it cannot be shown as
#: a date (``expires_at``), and no real token needs one.
MAX_TIME = 253402300799


class Claims:
    """A verified token: who (``sub``), with what role, until when."""

    __slots__ = ("exp", "raw", "role", "sub")

    def __init__(self, sub: str, role: Role, exp: float, raw: dict[str, Any]) -> None:
        self.sub = sub
        self.role = role
        self.exp = exp
        self.raw = raw

    def require(self, role: Role) -> None:
        """Raise ``forbidden`` unless this token's role is at least ``role``."""
        require_role(self.role, role)


def require_role(have: Role | None, need: Role) -> None:
    """Raise ``forbidden`` unless ``have`` is at least ``need`` (user < publisher < admin)."""
    if have is None or _RANK[have] < _RANK[need]:
        raise ProtocolError(FORBIDDEN, f"requires the {need} role", status=403)


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._verified: OrderedDict[str, Claims] = OrderedDict()
        self.cache_size = 1024
        self._public_key: str | None = None
        self._jwks: jwt.PyJWKSet | None = None
        if config.public_key_file:
            self._public_key = Path(config.public_key_file).read_text(encoding="utf-8")
        if config.jwks_file:
            self._jwks = jwt.PyJWKSet.from_json(Path(config.jwks_file).read_text(encoding="utf-8"))
        self._hs256_key: bytes | None = None
        if config.secret and "HS256" in config.algorithms and config.audience is None:
            self._hs256_key = config.secret.encode()

    def _key_for(self, alg: str, kid: Any) -> Any:
        """The key for this algorithm family only: an HMAC secret never verifies
        an RS/ES token and a public key never verifies an HS256 one."""
        if alg == "HS256" and self.config.secret:
            return self.config.secret
        if alg in ("RS256", "ES256"):
            if self._jwks is not None and kid is not None:
                for jwk in self._jwks.keys:
                    if jwk.key_id == kid and jwk.algorithm_name == alg:
                        return jwk.key
                raise ProtocolError(UNAUTHORIZED, "token key id is unknown", status=401)
            if self._public_key:
                return self._public_key
        raise ProtocolError(UNAUTHORIZED, "token algorithm is not accepted", status=401)

    def verify(self, token: str) -> Claims:
        """The token's claims, or ``ProtocolError(unauthorized)`` saying why.

        Verified tokens are remembered (a small LRU keyed by the whole token)
        until they expire, so a service posting with one token pays for the
        signature check once, not per request (about 45 µs each).
        """
        if not isinstance(token, str) or not token:
            raise ProtocolError(UNAUTHORIZED, "token is missing", status=401)
        cached = self._verified.get(token)
        if cached is not None:
            if cached.exp + self.config.leeway > time.time():
                self._verified.move_to_end(token)
                return cached
            del self._verified[token]
        claims = self._verify(token)
        self._verified[token] = claims
        if len(self._verified) > self.cache_size:
            self._verified.popitem(last=False)
        return claims

    def _verify(self, token: str) -> Claims:
        raw = self._plain_hs256(token)
        if raw is None:
            raw = self._decode(token)
        for claim in ("exp", "nbf", "iat"):
            value = raw.get(claim, 0)
            if not isinstance(value, int | float) or not 0 <= value <= MAX_TIME:
                raise ProtocolError(
                    UNAUTHORIZED, f"token {claim} is out of range (a time before 10000)", status=401
                )
        sub, role = raw.get("sub"), raw.get("role", "user")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise ProtocolError(UNAUTHORIZED, "token subject is invalid", status=401)
        if role not in ROLES:
            raise ProtocolError(UNAUTHORIZED, "token role is invalid", status=401)
        return Claims(sub, role, float(raw["exp"]), raw)

    def _plain_hs256(self, token: str) -> dict[str, Any] | None:
        """The claims of a plainly valid HS256 token, checked without PyJWT
        (5 us instead of 40, which is most of accepting a WebSocket), or None
        to let PyJWT decide. Only accepts what PyJWT would: a header of alg
        HS256 (typ, kid) and nothing else, the canonical signature, integer
        exp in the future, integer nbf/iat not in it, a string jti, the
        configured issuer; tokens with an audience configured always go to
        PyJWT. Anything else, valid or not, goes to PyJWT for its verdict."""
        key = self._hs256_key
        if key is None or token.count(".") != 2:
            return None
        header_b64, payload_b64, signature = token.split(".")
        try:
            mac = hmac.new(key, f"{header_b64}.{payload_b64}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(
                base64.urlsafe_b64encode(mac).rstrip(b"="), signature.encode()
            ):
                return None
            header = orjson.loads(_b64decode(header_b64))
            claims = orjson.loads(_b64decode(payload_b64))
        except (ValueError, UnicodeEncodeError):
            return None
        if (
            not isinstance(header, dict)
            or header.get("alg") != "HS256"
            or not header.keys() <= {"alg", "typ", "kid"}
            or not isinstance(claims, dict)
        ):
            return None
        now, leeway = time.time(), self.config.leeway
        exp, nbf, iat = claims.get("exp"), claims.get("nbf", 0), claims.get("iat", 0)
        if (
            type(exp) is not int
            or exp <= now - leeway
            or type(nbf) is not int
            or nbf > now + leeway
            or type(iat) is not int
            or iat > now + leeway
            or not isinstance(claims.get("jti", ""), str)
            or not isinstance(claims.get("sub"), str)
            or (self.config.issuer is not None and claims.get("iss") != self.config.issuer)
            or "aud" in claims
        ):
            return None
        return claims

    def _decode(self, token: str) -> dict[str, Any]:
        """PyJWT's verdict: the claims, or ``ProtocolError`` saying why not."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise ProtocolError(UNAUTHORIZED, "token is malformed", status=401) from None
        alg = header.get("alg")
        if alg not in self.config.algorithms:
            raise ProtocolError(UNAUTHORIZED, "token algorithm is not accepted", status=401)
        try:
            raw: dict[str, Any] = jwt.decode(
                token,
                self._key_for(alg, header.get("kid")),
                algorithms=[alg],
                issuer=self.config.issuer,
                audience=self.config.audience,
                leeway=self.config.leeway,
                # A token naming an audience is refused while none is
                # configured (PyJWT's default): it was minted for another service.
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise ProtocolError(UNAUTHORIZED, "token has expired", status=401) from None
        except jwt.ImmatureSignatureError:
            raise ProtocolError(UNAUTHORIZED, "token is not valid yet", status=401) from None
        except jwt.InvalidAudienceError:
            if self.config.audience is None:
                raise ProtocolError(
                    UNAUTHORIZED,
                    "token names an audience and auth.audience is not configured",
                    status=401,
                ) from None
            raise ProtocolError(UNAUTHORIZED, "token audience is wrong", status=401) from None
        except jwt.InvalidIssuerError:
            raise ProtocolError(UNAUTHORIZED, "token issuer is wrong", status=401) from None
        except jwt.MissingRequiredClaimError as err:
            raise ProtocolError(
                UNAUTHORIZED, f"token lacks the {err.claim} claim", status=401
            ) from None
        except jwt.PyJWTError:
            raise ProtocolError(UNAUTHORIZED, "token signature is invalid", status=401) from None
        return raw

    def mint(
        self,
        user_id: str,
        role: Role = "user",
        ttl: float | None = None,
        *,
        topics: Sequence[str] = (),
        publish_topics: Sequence[str] = (),
    ) -> str:
        """An HS256 token for ``user_id`` (development, tests, the demo),
        granting ``topics`` to subscribe to and ``publish_topics`` to publish
        to (exact names, or prefixes ending in ``*``)."""
        if not self.config.secret:
            raise ValueError("auth.secret is not configured; cannot mint tokens")
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": user_id,
            "role": role,
            "iat": now,
            "exp": now + int(ttl if ttl is not None else self.config.token_ttl),
        }
        if topics:
            claims["topics"] = list(topics)
        if publish_topics:
            claims["publish_topics"] = list(publish_topics)
        if self.config.issuer:
            claims["iss"] = self.config.issuer
        if self.config.audience:
            claims["aud"] = self.config.audience
        return jwt.encode(claims, self.config.secret, algorithm="HS256")


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
