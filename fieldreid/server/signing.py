"""Signed gallery bundles: the lab signs, devices verify with the lab's pinned ed25519 public key.

A bundle on the wire is one msgpack map (the *envelope*)::

    {"format": 1, "alg": "ed25519", "key": KEY_ID, "payload": ZLIB(MSGPACK(payload)), "sig": SIGNATURE}

The signature covers ``DOMAIN + payload`` (the compressed bytes), so a device checks it *before*
decompressing or decoding anything: an attacker cannot make the device parse bytes the lab never signed
(no decompression bombs, no parser bugs reachable from the network). ``KEY_ID`` is the first 16 hex
digits of the SHA-256 of the raw public key; it only names the key, trust comes from the pinned key.

This module needs ``cryptography`` and ``msgpack`` only (the device side imports it too), never
FastAPI or SQLAlchemy.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from pathlib import Path

from fieldreid.errors import FieldreidError, missing_extra

FORMAT = 1
DOMAIN = b"fieldreid-bundle-v1\x00"
#: decompressed payloads larger than this are refused. An embedding weighs ~5 kB (1280 float32) plus, when the lab
#: gallery has local features, ~130 kB of RootSIFT: 4 GiB holds a snapshot of ~30 000 embeddings with features
#: (a 278-embedding zebra snapshot is ~38 MB, ~26 MB compressed). ``FIELDREID_MAX_BUNDLE_BYTES`` sets another cap on a device.
MAX_PAYLOAD_BYTES = 4 * 1024**3
MAX_PAYLOAD_ENV = "FIELDREID_MAX_BUNDLE_BYTES"


def max_payload_bytes() -> int:
    """The decompressed-size cap: ``$FIELDREID_MAX_BUNDLE_BYTES`` (bytes, > 0) or :data:`MAX_PAYLOAD_BYTES`."""
    text = os.environ.get(MAX_PAYLOAD_ENV, "").strip()
    if not text:
        return MAX_PAYLOAD_BYTES
    if not text.isdigit() or int(text) <= 0:
        raise FieldreidError(f"{MAX_PAYLOAD_ENV}={text!r}: give the largest gallery bundle to accept, in bytes "
                             "(a positive whole number).")
    return int(text)


class SignatureError(FieldreidError):
    """A bundle is not signed by the lab key this device trusts, or it was altered on the way."""


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    except ImportError as exc:
        raise missing_extra("cryptography", "sync", "ed25519 signatures of gallery bundles") from exc
    return InvalidSignature, serialization, Ed25519PrivateKey, Ed25519PublicKey


def _msgpack():
    try:
        import msgpack
    except ImportError as exc:
        raise missing_extra("msgpack", "sync", "the sync wire format") from exc
    return msgpack


def packb(obj: object) -> bytes:
    return _msgpack().packb(obj, use_bin_type=True)


def unpackb(data: bytes) -> object:
    # unpackb bounds every container and string by len(data), so hostile lengths cannot allocate more;
    # strict_map_key: only str/bytes keys; raw=False: strings come back as str
    return _msgpack().unpackb(data, raw=False, strict_map_key=True)


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


class LabKey:
    """The lab's private signing key (kept on the lab server, file mode 0600)."""

    def __init__(self, private) -> None:
        self._private = private
        _, serialization, _, _ = _crypto()
        self.public_raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id(self.public_raw)

    @classmethod
    def generate(cls) -> LabKey:
        return cls(_crypto()[2].generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> LabKey:
        """Load the PEM key at ``path``; create it (0600) if absent."""
        _, serialization, priv_cls, _ = _crypto()
        path = Path(path)
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as exc:
                raise FieldreidError(f"{path} is not a PEM ed25519 private key ({exc}). Restore the lab's key from "
                                     "its backup: devices trust only that key.") from exc
            if not isinstance(key, priv_cls):
                raise FieldreidError(f"{path} holds a key that is not ed25519.")
            return cls(key)
        key = cls.generate()
        pem = key._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        return key

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public_raw).decode()

    def sign_bundle(self, payload: dict) -> bytes:
        body = zlib.compress(packb(payload), 6)
        sig = self._private.sign(DOMAIN + body)
        return packb({"format": FORMAT, "alg": "ed25519", "key": self.key_id, "payload": body, "sig": sig})


def parse_public_key(text: str | bytes) -> bytes:
    """Raw 32-byte ed25519 public key from base64 text (what ``fieldreid server public-key`` prints) or PEM."""
    _, serialization, _, pub_cls = _crypto()
    data = text.encode() if isinstance(text, str) else text
    data = data.strip()
    if data.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, pub_cls):
            raise FieldreidError("The lab public key is not an ed25519 key.")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise FieldreidError("The lab public key is not valid base64; copy it again from `fieldreid server "
                             "public-key` on the lab server.") from exc
    if len(raw) != 32:
        raise FieldreidError(f"The lab public key has {len(raw)} bytes; an ed25519 key has 32.")
    return raw


def verify_bundle(data: bytes, public_raw: bytes, max_bytes: int | None = None) -> dict:
    """Check the envelope's signature with the pinned key, then decompress and decode the payload.

    Raises :class:`SignatureError` for anything that does not verify; nothing is decoded before that.
    ``max_bytes`` caps the decompressed payload (default :func:`max_payload_bytes`).
    """
    cap = max_bytes if max_bytes is not None else max_payload_bytes()
    invalid_sig, _, _, pub_cls = _crypto()
    try:
        env = unpackb(data)
    except Exception as exc:
        raise SignatureError(f"The gallery bundle is not a signed fieldreid bundle ({type(exc).__name__}); "
                             "nothing was applied.") from exc
    if not isinstance(env, dict) or env.get("format") != FORMAT or env.get("alg") != "ed25519":
        raise SignatureError("The gallery bundle has an unknown format; nothing was applied. Upgrade fieldreid "
                             "if the lab server is newer.")
    body, sig = env.get("payload"), env.get("sig")
    if not isinstance(body, bytes) or not isinstance(sig, bytes):
        raise SignatureError("The gallery bundle has no payload or signature; nothing was applied.")
    if env.get("key") != key_id(public_raw):
        raise SignatureError(f"The gallery bundle is signed by key {env.get('key')!r}, not by the lab key this "
                             f"device trusts ({key_id(public_raw)}); nothing was applied. Check --server and the "
                             "lab public key.")
    try:
        pub_cls.from_public_bytes(public_raw).verify(sig, DOMAIN + body)
    except invalid_sig:
        raise SignatureError("The gallery bundle's signature does not verify: it was altered in transit or not "
                             "made by the lab. Nothing was applied.") from None
    d = zlib.decompressobj()
    try:
        raw = d.decompress(body, cap)
    except zlib.error as exc:
        raise SignatureError(f"The signed gallery bundle does not decompress ({exc}).") from exc
    if d.unconsumed_tail:
        raise SignatureError(f"The signed gallery bundle is larger than this device accepts ({cap} bytes "
                             f"decompressed; set {MAX_PAYLOAD_ENV} to accept more); nothing was applied.")
    payload = unpackb(raw)
    if not isinstance(payload, dict):
        raise SignatureError("The signed gallery bundle holds no payload map.")
    return payload
