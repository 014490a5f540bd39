"""Attacks on authentication: forged, expired, unsigned and confused tokens,
wrong audience and issuer, and token expiry on an open connection."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from rtserver.auth import Authenticator
from rtserver.client import ClientError
from rtserver.config import AuthConfig
from rtserver.protocol import ProtocolError

from ..conftest import SECRET, Running, StartServer


def claims(sub: str = "alice", **extra: Any) -> dict[str, Any]:
    return {"sub": sub, "role": "user", "exp": int(time.time()) + 600, **extra}


def b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


async def refused(server: Running, token: str) -> ClientError:
    client = await server.connect()
    with pytest.raises(ClientError) as err:
        await client.register(token)
    assert server.hub.get_user_sessions("alice") == []
    return err.value


class TestForgedTokens:
    async def test_forged_signature(self, server: Running) -> None:
        """A token signed with another secret is refused."""
        err = await refused(server, jwt.encode(claims(), "not-the-secret-" * 3, algorithm="HS256"))
        assert (err.code, err.message) == ("unauthorized", "token signature is invalid")

    async def test_alg_none(self, server: Running) -> None:
        """An unsigned token (alg none) is refused."""
        token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."
        err = await refused(server, token)
        assert err.code == "unauthorized" and "algorithm" in err.message

    async def test_tampered_payload(self, server: Running) -> None:
        """Changing the subject of a valid token breaks its signature."""
        header, _, sig = server.token("mallory").split(".")
        err = await refused(server, f"{header}.{b64(claims('alice'))}.{sig}")
        assert err.code == "unauthorized"

    async def test_expired(self, server: Running) -> None:
        """An expired token is refused."""
        err = await refused(server, server.token("alice", ttl=-30))
        assert err.message == "token has expired"

    async def test_not_yet_valid(self, server: Running) -> None:
        """nbf in the future is refused."""
        err = await refused(
            server, jwt.encode(claims(nbf=int(time.time()) + 300), SECRET, algorithm="HS256")
        )
        assert err.message == "token is not valid yet"

    async def test_missing_exp(self, server: Running) -> None:
        """A token without exp is refused."""
        token = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
        err = await refused(server, token)
        assert "exp" in err.message

    async def test_bad_role(self, server: Running) -> None:
        """A role outside user/publisher/admin is refused."""
        err = await refused(server, jwt.encode(claims(role="root"), SECRET, algorithm="HS256"))
        assert err.message == "token role is invalid"

    async def test_wrong_audience_and_issuer(self, start_server: StartServer) -> None:
        """With iss and aud configured, tokens for another audience or issuer fail."""
        srv = await start_server(
            auth={"audience": "rtserver", "issuer": "https://auth.example.com"}
        )
        good = jwt.encode(
            claims(aud="rtserver", iss="https://auth.example.com"), SECRET, algorithm="HS256"
        )
        client = await srv.connect()
        assert (await client.register(good))["user_id"] == "alice"
        for bad, message in (
            (claims(aud="billing", iss="https://auth.example.com"), "token audience is wrong"),
            (claims(aud="rtserver", iss="https://evil.example.com"), "token issuer is wrong"),
        ):
            c = await srv.connect()
            with pytest.raises(ClientError) as err:
                await c.register(jwt.encode(bad, SECRET, algorithm="HS256"))
            assert err.value.message == message

    async def test_http_api_checks_tokens_too(self, server: Running) -> None:
        """The HTTP API refuses forged and expired bearer tokens with 401."""
        for token in (
            jwt.encode(claims(role="admin"), "x" * 40, algorithm="HS256"),
            server.token("a", "admin", ttl=-5),
        ):
            status, body = await server.http(
                "POST", "/api/broadcast", {"message": "x"}, token=token
            )
            assert status == 401 and body["error"]["code"] == "unauthorized"


def rsa_pair() -> tuple[Any, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return key, public


class TestAsymmetric:
    def test_rs256_with_public_key_and_algorithm_confusion(self, tmp_path: Path) -> None:
        """RS256 tokens verify with the public key; an HS256 token whose HMAC key
        is that public key (algorithm confusion) is refused."""
        key, public = rsa_pair()
        (tmp_path / "pub.pem").write_text(public)
        auth = Authenticator(
            AuthConfig(
                secret=SECRET,
                algorithms=("HS256", "RS256"),
                public_key_file=str(tmp_path / "pub.pem"),
            )
        )
        assert auth.verify(jwt.encode(claims(), key, algorithm="RS256")).sub == "alice"
        confused = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims())}"
        import hashlib
        import hmac

        sig = hmac.new(public.encode(), confused.encode(), hashlib.sha256).digest()
        forged = f"{confused}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
        with pytest.raises(ProtocolError) as err:
            auth.verify(forged)
        assert err.value.code == "unauthorized"

    def test_algorithm_outside_allowlist(self, tmp_path: Path) -> None:
        """An RS256 token is refused where only HS256 is allowed."""
        key, _ = rsa_pair()
        auth = Authenticator(AuthConfig(secret=SECRET))
        with pytest.raises(ProtocolError, match="algorithm"):
            auth.verify(jwt.encode(claims(), key, algorithm="RS256"))

    def test_es256_from_jwks_by_kid(self, tmp_path: Path) -> None:
        """ES256 tokens verify against a JWKS file, choosing the key by kid;
        an unknown kid is refused."""
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwk.update(kid="k1", alg="ES256")
        (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
        auth = Authenticator(
            AuthConfig(algorithms=("ES256",), jwks_file=str(tmp_path / "jwks.json"))
        )
        assert (
            auth.verify(jwt.encode(claims(), key, algorithm="ES256", headers={"kid": "k1"})).sub
            == "alice"
        )
        with pytest.raises(ProtocolError, match="key id"):
            auth.verify(jwt.encode(claims(), key, algorithm="ES256", headers={"kid": "k2"}))


class TestExpiryOnOpenConnections:
    async def test_warned_then_closed_1008_at_expiry(self, start_server: StartServer) -> None:
        """A session whose token expires gets token_expiring, then close 1008."""
        srv = await start_server(auth={"expiry_warning": 0.5})
        client = await srv.connect()
        ack = await client.register(srv.token("exp", ttl=1.2))
        assert ack["expires_at"].endswith("Z")
        warning = await client.next("token_expiring", timeout=3)
        assert 0 < warning["seconds"] <= 0.8
        await asyncio.wait_for(client.closed.wait(), 5)
        assert client.close_code == 1008 and client.close_reason == "token expired"

    async def test_refresh_extends_the_session(self, start_server: StartServer) -> None:
        """refresh with a new token of the same subject keeps the session open."""
        srv = await start_server(auth={"expiry_warning": 0.5})
        client = await srv.connect()
        await client.register(srv.token("ref", ttl=1.2))
        await client.next("token_expiring", timeout=3)
        ack = await client.request("refresh", {"token": srv.token("ref", ttl=600)})
        assert ack["expires_at"].endswith("Z")
        await asyncio.sleep(1.2)
        assert not client.closed.is_set()
        result = await srv.hub.send_notification("ref", {"message": "still here"})
        assert result.delivered == 1

    async def test_refresh_cannot_switch_user(self, server: Running) -> None:
        """A refresh token for another subject is forbidden."""
        client = await server.user("ref")
        with pytest.raises(ClientError) as err:
            await client.request("refresh", {"token": server.token("someone-else")})
        assert err.value.code == "forbidden"

    async def test_tokens_are_not_accepted_in_urls(self, server: Running) -> None:
        """A token in the query string authenticates nothing."""
        token = server.token("alice", "admin")
        status, _ = await server.http(
            "GET", f"/api/admin/sessions?token={token}&access_token={token}"
        )
        assert status == 401


def test_verified_token_cache_never_outlives_the_token() -> None:
    """A remembered token is refused once it expires, like any other."""
    auth = Authenticator(AuthConfig(secret=SECRET, leeway=0))
    token = jwt.encode({"sub": "alice", "exp": time.time() + 1}, SECRET, algorithm="HS256")
    assert auth.verify(token).sub == "alice"
    assert auth.verify(token).sub == "alice"  # from the cache
    time.sleep(1.1)
    with pytest.raises(ProtocolError, match="expired"):
        auth.verify(token)
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    with pytest.raises(ProtocolError):
        auth.verify(forged)


def _sign(header: dict[str, Any], payload: dict[str, Any], secret: str = SECRET) -> str:
    import hashlib
    import hmac

    signing = f"{b64(header)}.{b64(payload)}"
    mac = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


class TestPlainHS256:
    """``Authenticator._plain_hs256`` checks common HS256 tokens without PyJWT;
    it must never accept a token PyJWT refuses, and must agree on the claims
    of the ones both accept (anything unusual is left to PyJWT)."""

    def tokens(self) -> dict[str, str]:
        now = int(time.time())
        hs = {"alg": "HS256", "typ": "JWT"}
        good = _sign(hs, claims())
        head, body, sig = good.split(".")
        return {
            "good": good,
            "good_with_kid_nbf_iat_jti": _sign(
                {**hs, "kid": "k1"}, claims(nbf=now - 10, iat=now - 10, jti="abc")
            ),
            "pyjwt_minted": jwt.encode(claims(), SECRET, algorithm="HS256"),
            "other_secret": _sign(hs, claims(), secret="another-secret-0123456789-0123456789"),
            "tampered_payload": f"{head}.{b64(claims(sub='mallory'))}.{sig}",
            "non_canonical_signature": f"{head}.{body}.{sig}=",
            "alg_none": f"{b64({'alg': 'none'})}.{body}.",
            "alg_hs512": _sign({"alg": "HS512"}, claims()),
            "crit_header": _sign({**hs, "crit": ["exp"]}, claims()),
            "expired": _sign(hs, claims(exp=now - 60)),
            "expired_within_leeway": _sign(hs, claims(exp=now - 2)),
            "float_exp": _sign(hs, claims(exp=now + 600.5)),
            "string_exp": _sign(hs, claims(exp=str(now + 600))),
            "bool_exp": _sign(hs, {**claims(), "exp": True}),
            "no_exp": _sign(hs, {"sub": "alice"}),
            "no_sub": _sign(hs, {"exp": now + 600}),
            "int_sub": _sign(hs, claims(sub=7)),  # type: ignore[arg-type]
            "nbf_future": _sign(hs, claims(nbf=now + 600)),
            "iat_future": _sign(hs, claims(iat=now + 600)),
            "iat_string": _sign(hs, claims(iat="yesterday")),
            "jti_number": _sign(hs, claims(jti=5)),
            "payload_list": _sign(hs, [1, 2]),  # type: ignore[arg-type]
            "header_list": _sign([1], claims()),  # type: ignore[arg-type]
            "two_segments": f"{head}.{body}",
            "four_segments": f"{good}.x",
            "not_base64": f"{head}.!!!.{sig}",
            "non_ascii": f"{head}.{body}é.{sig}",
        }

    def pyjwt(self, auth: Authenticator, token: str) -> dict[str, Any] | None:
        try:
            return auth._decode(token)
        except ProtocolError:
            return None

    @pytest.mark.parametrize("issuer", [None, "rtserver-tests"])
    def test_never_accepts_what_pyjwt_refuses(self, issuer: str | None) -> None:
        auth = Authenticator(AuthConfig(secret=SECRET, issuer=issuer))
        fast_accepted = 0
        for name, token in self.tokens().items():
            if issuer is not None and token.count(".") == 2 and name.startswith("good"):
                token = _sign({"alg": "HS256"}, claims(iss=issuer))
            fast, slow = auth._plain_hs256(token), self.pyjwt(auth, token)
            if fast is not None:
                fast_accepted += 1
                assert fast == slow, name
        assert fast_accepted >= 2  # the plain tokens do take the fast path

    def test_refusals_keep_pyjwts_reasons(self) -> None:
        auth = Authenticator(AuthConfig(secret=SECRET))
        tokens = self.tokens()
        for name, message in [
            ("expired", "token has expired"),
            ("nbf_future", "token is not valid yet"),
            ("other_secret", "token signature is invalid"),
            ("alg_none", "token algorithm is not accepted"),
            ("no_exp", "token lacks the exp claim"),
        ]:
            with pytest.raises(ProtocolError) as err:
                auth.verify(tokens[name])
            assert err.value.message == message, name
        assert auth.verify(tokens["good"]).sub == "alice"
        assert auth.verify(tokens["expired_within_leeway"]).sub == "alice"


class TestAbsurdClaims:
    @pytest.mark.parametrize("exp", [10**15, 10**30, 1e300])
    async def test_expiry_past_year_9999(self, server: Running, exp: float) -> None:
        """An expiry no date can show (10**15 s is the year 31 million) is
        refused with a reason, on the WebSocket and over HTTP, instead of
        registering and then failing."""
        token = jwt.encode(claims(exp=exp), SECRET, algorithm="HS256")
        err = await refused(server, token)
        message = "token exp is out of range (a time before 10000)"
        assert (err.code, err.message) == ("unauthorized", message)
        status, body = await server.http("GET", "/api/users/alice/notifications", token=token)
        assert status == 401 and body["error"]["message"] == message

    async def test_audience_while_none_is_configured(self, server: Running) -> None:
        """A token minted for some audience is for another service: refused
        while ``auth.audience`` is unset (PyJWT's own default)."""
        token = jwt.encode(claims(aud="billing"), SECRET, algorithm="HS256")
        err = await refused(server, token)
        assert (err.code, err.message) == (
            "unauthorized",
            "token names an audience and auth.audience is not configured",
        )
