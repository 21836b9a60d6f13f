"""JWT verification (and minting, for development) with PyJWT: never by hand.

Theory of operation. The configured algorithms are the only ones accepted,
and each is bound, at start-up, to the one key of its family: ``HS*`` to the
HMAC secret, ``RS*``/``PS*`` to an RSA public key, ``ES*`` to an EC public key
of the matching curve, ``EdDSA`` to an Ed25519/Ed448 key. A token's ``alg``
header only selects among those pairs, so a token cannot choose its own key:
an ``HS256`` token signed with the RSA public key as its "secret" is refused
because ``HS256`` is not configured (or, if it is, is checked against the
real secret). ``none`` is refused by the settings before anything starts.

``sub`` and ``exp`` are required, ``nbf`` honoured, ``aud`` and ``iss`` checked
when configured (an ``aud`` claim is ignored when no audience is set), with
``jwt_leeway`` seconds of clock skew. The optional ``subscribe`` and
``publish`` claims must be lists of valid channel patterns. A refusal says
which rule failed, never which part of a signature; neither tokens nor keys
are ever logged.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker.access import Principal, Verified
from broker.channels import check_pattern
from broker.exceptions import BadChannel, ConfigError, Unauthorized
from broker.settings import Settings

__all__ = ["MIN_SECRET_BYTES", "JwtVerifier", "mint", "verifier_from_settings"]

log = logging.getLogger(__name__)

#: RFC 7518 section 3.2: an HS256 key should be at least as long as the hash.
MIN_SECRET_BYTES = 32

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
#: The longest list of channel patterns a token may carry in one claim.
MAX_CLAIM_PATTERNS = 1000


def _algorithm_of(token: str) -> object:
    """The ``alg`` a token's header names, read only to pick the key (PyJWT checks it again).

    A quarter of a verification went to ``jwt.get_unverified_header``, which
    parses more than this needs and which ``jwt.decode`` repeats anyway.
    """
    head, dot, _ = token.partition(".")
    try:
        if not dot or not head.isascii():
            raise ValueError("not a JWT")
        header = orjson.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):  # orjson.JSONDecodeError is a ValueError
        raise Unauthorized("token is malformed (not a JWT)") from None
    if not isinstance(header, dict):
        raise Unauthorized("token is malformed (not a JWT)")
    return header.get("alg")


class JwtVerifier:
    """Checks tokens against the configured keys and rules; see the module docstring."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key_pem: bytes | None = None,
        algorithms: Sequence[str] | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if secret is None and public_key_pem is None:
            raise ConfigError("authentication needs jwt_secret or jwt_public_key")
        if secret is not None and len(secret.encode()) < MIN_SECRET_BYTES:
            # Said once here, not by PyJWT on every token verified.
            log.warning(
                "jwt_secret is %d bytes; use at least %d random bytes (RFC 7518 section 3.2)",
                len(secret.encode()),
                MIN_SECRET_BYTES,
            )
            warnings.filterwarnings("ignore", category=jwt.InsecureKeyLengthWarning)
        public_key: Any = None
        if public_key_pem is not None:
            try:
                public_key = load_pem_public_key(public_key_pem)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"jwt_public_key is not a PEM public key: {exc}") from None
        if algorithms is None:
            algorithms = _default_algorithms(secret, public_key)
        self._keys: dict[str, Any] = {}
        for algorithm in algorithms:
            self._keys[algorithm] = _key_for(algorithm, secret, public_key)
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._clock = clock
        required = ["exp", "sub"]
        if audience is not None:
            required.append("aud")
        if issuer is not None:
            required.append("iss")
        self._options: Any = {
            "require": required,
            "verify_aud": audience is not None,
            "verify_iss": issuer is not None,
        }

    @property
    def algorithms(self) -> list[str]:
        """The algorithms accepted, in the configured order."""
        return list(self._keys)

    def verify(self, token: str) -> Verified:
        """Return who ``token`` names and for how long; raise ``Unauthorized`` saying why not."""
        algorithm = _algorithm_of(token)
        key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None or not isinstance(algorithm, str):
            accepted = ", ".join(self._keys)
            raise Unauthorized(f"token algorithm {algorithm!r} is not accepted (only {accepted})")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token has expired (exp)") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token is not valid yet (nbf or iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token audience (aud) does not match") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token issuer (iss) does not match") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token lacks the required '{exc.claim}' claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("token signature is invalid") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            # DecodeError and friends: bad base64, bad JSON, a key PyJWT refuses.
            raise Unauthorized("token is malformed or cannot be verified") from None
        # The leeway is clock skew: a token accepted within it does not expire at once.
        expires_in = float(claims["exp"]) + self._leeway - self._clock()
        return Verified(self._principal(claims), expires_in)

    def _principal(self, claims: dict[str, Any]) -> Principal:
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("token 'sub' claim must be a non-empty string")
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise Unauthorized("token 'exp' claim must be a number")
        return Principal(
            sub=sub,
            subscribe=_patterns(claims, "subscribe"),
            publish=_patterns(claims, "publish"),
            expires_at=float(exp),
        )


def _patterns(claims: dict[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_CLAIM_PATTERNS:
        raise Unauthorized(f"token '{name}' claim must be a list of channel patterns")
    patterns = []
    for item in value:
        try:
            patterns.append(check_pattern(item) if isinstance(item, str) else "")
        except BadChannel as exc:
            raise Unauthorized(f"token '{name}' claim: {exc.message}") from None
        if not patterns[-1]:
            raise Unauthorized(f"token '{name}' claim must be a list of channel patterns")
    return tuple(patterns)


def _default_algorithms(secret: str | None, public_key: Any) -> list[str]:
    algorithms = []
    if secret is not None:
        algorithms.append("HS256")
    if isinstance(public_key, rsa.RSAPublicKey):
        algorithms.append("RS256")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        algorithms.append(_BY_CURVE.get(public_key.curve.name, "ES256"))
    elif isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        algorithms.append("EdDSA")
    return algorithms


def _key_for(algorithm: str, secret: str | None, public_key: Any) -> Any:
    """The one key ``algorithm`` verifies with; ``ConfigError`` when there is none."""
    family = algorithm[:2]
    if family == "HS":
        if secret is None:
            raise ConfigError(f"jwt_algorithms lists {algorithm}, which needs jwt_secret")
        return secret.encode()
    if family in ("RS", "PS"):
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise ConfigError(f"jwt_algorithms lists {algorithm}, which needs an RSA public key")
        return public_key
    if family == "ES":
        curve = _CURVES[algorithm]
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, curve
        ):
            raise ConfigError(
                f"jwt_algorithms lists {algorithm}, which needs an EC public key on {curve.name}"
            )
        return public_key
    if not isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise ConfigError(f"jwt_algorithms lists {algorithm}, which needs an Ed25519/Ed448 key")
    return public_key


def verifier_from_settings(settings: Settings) -> JwtVerifier | None:
    """The verifier the settings describe, or None when authentication is off.

    Reads the public key file; raises ``ConfigError`` for a missing or wrong key.
    """
    if not settings.auth_required:
        return None
    pem = None
    if settings.jwt_public_key is not None:
        try:
            pem = Path(settings.jwt_public_key).read_bytes()
        except OSError as exc:
            raise ConfigError(f"jwt_public_key {settings.jwt_public_key}: {exc.strerror}") from None
    secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret is not None else None
    return JwtVerifier(
        secret=secret,
        public_key_pem=pem,
        algorithms=settings.jwt_algorithms,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        leeway=settings.jwt_leeway,
    )


def mint(
    settings: Settings,
    sub: str,
    *,
    ttl: float,
    subscribe: Sequence[str] = (),
    publish: Sequence[str] = (),
    now: float | None = None,
) -> str:
    """A token for ``sub`` signed with the configured secret (``broker token``, tests).

    Raises ``ConfigError`` when no secret is configured: the broker holds only
    the public half of an asymmetric key and cannot sign.
    """
    if settings.jwt_secret is None:
        raise ConfigError("minting a token needs jwt_secret (a public key cannot sign)")
    algorithm = next(
        (a for a in settings.jwt_algorithms or ["HS256"] if a.startswith("HS")), "HS256"
    )
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {"sub": sub, "iat": int(issued), "exp": int(issued + ttl)}
    if subscribe:
        claims["subscribe"] = [check_pattern(p) for p in subscribe]
    if publish:
        claims["publish"] = [check_pattern(p) for p in publish]
    if settings.jwt_audience is not None:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer is not None:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm=algorithm)
