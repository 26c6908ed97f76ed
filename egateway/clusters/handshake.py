"""
The connection-info handshake: how a remote kernel launcher tells the
gateway where its kernel listens, encrypted to the gateway's public key.

This module is the codec only (no sockets, no Twisted); the
L{egateway.clusters.response.ResponseListener} decides which payloads to
accept.  Every failure raises L{HandshakeError}, whose message says what was
wrong with the payload (never which secret was expected).

The gateway holds one RSA-2048 key pair (L{HandshakeKeys}) and passes its
public half to launchers as C{{public_key}}: the base64 (standard alphabet,
no newlines) of the DER SubjectPublicKeyInfo, exactly as Enterprise Gateway
does, so its launchers import it unchanged.

A payload is the ASCII base64 of a UTF-8 JSON object, sent over one TCP
connection and ended by EOF.  Two versions are accepted:

Version 1 (Enterprise Gateway's format, kept for its launchers and images)::

    {"version": 1,
     "key": b64(RSA-PKCS#1-v1.5-encrypt(public_key, aes_key)),   # 16 bytes
     "conn_info": b64(AES-128-ECB(aes_key, PKCS#7-pad(json_bytes)))}

  The connection info JSON must carry C{kernel_id}.  Nothing authenticates
  it: anyone who can reach the listener and knows a pending kernel id can
  forge one, which is why the listener refuses version 1 unless the
  operator turned it on, and then takes it only for launches that allow it
  and only from the kernel's host.

Version 2 (egateway's own; authenticated and bound to one launch)::

    {"version": 2,
     "kernel_id": "<kernel id>",
     "key": b64(RSA-OAEP-encrypt(public_key, aes_key)),  # SHA-256, MGF1-SHA-256,
                                                          # no label; 32 bytes
     "nonce": b64(12 random bytes),
     "conn_info": b64(AES-256-GCM-encrypt(aes_key, nonce, plaintext, aad))}

  C{conn_info} is the ciphertext followed by the 16-byte tag (as produced by
  C{cryptography}'s C{AESGCM}).  C{aad} is the UTF-8 text C{"2|"} followed
  by the kernel id, so a payload cannot be moved to another kernel or
  relabelled as another version.  The plaintext is the connection info JSON
  object (as in version 1, C{kernel_id} equal to the outer one) plus
  C{"launch_token"}: the one-time token the gateway handed to this launch
  (in C{EG_LAUNCH_TOKEN}).  Only a launcher given the token can produce an
  acceptable payload; the listener accepts each token once.

Version 0 (Enterprise Gateway's legacy, keyed by the kernel id itself) is
refused: anyone who knows the kernel id could forge it.

All base64 fields use the standard alphabet with padding.  The full
description for launcher authors is C{docs/launcher-protocol.md}.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP, PKCS1v15
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SUPPORTED_VERSIONS = (1, 2)
TOKEN_FIELD = "launch_token"
RSA_BITS = 2048


class HandshakeError(ValueError):
    """
    A payload cannot be accepted.  The message is safe to log and names the
    problem (malformed, unsupported version, cannot be decrypted...).
    """


@dataclass(frozen=True)
class HandshakePayload:
    """
    A decrypted payload.

    @ivar conn_info: the connection info as sent, launcher extras (C{pid},
        C{pgid}, C{comm_port}, C{kernel_id}) included, the launch token
        removed.
    @ivar token: the launch token (version 2), C{None} for version 1.
    """

    version: int
    kernel_id: str
    conn_info: dict[str, Any]
    token: str | None


@dataclass(frozen=True)
class Envelope:
    """
    A payload's outer layer, parsed but not decrypted: enough to route or
    refuse a payload before spending an RSA operation on it.

    @ivar kernel_id: the kernel named in clear (version 2), else C{""}.
    """

    version: int
    kernel_id: str
    fields: dict[str, Any]


class HandshakeKeys:
    """
    The gateway's RSA key pair.  Ephemeral by design: launchers only need
    it while a launch is in progress, so a new gateway process makes a new
    one.
    """

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self._private = private_key
        der = private_key.public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        self.public_key_b64: str = base64.b64encode(der).decode("ascii")

    @classmethod
    def generate(cls, bits: int = RSA_BITS) -> "HandshakeKeys":
        """
        A fresh key pair.  Takes a noticeable fraction of a second; do it
        once per process.
        """
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=bits))

    def decode(self, payload: bytes | str) -> HandshakePayload:
        """
        Shorthand for L{decode}C{(payload, self)}.
        """
        return decode(payload, self)

    def _decrypt_v1_key(self, wrapped: bytes) -> bytes:
        try:
            return self._private.decrypt(wrapped, PKCS1v15())
        except ValueError:
            raise HandshakeError(
                "version 1 key cannot be decrypted (encrypted to another key, or damaged)"
            ) from None

    def _decrypt_v2_key(self, wrapped: bytes) -> bytes:
        try:
            return self._private.decrypt(wrapped, _oaep())
        except ValueError:
            raise HandshakeError(
                "version 2 key cannot be decrypted (encrypted to another key, or damaged)"
            ) from None


def _oaep() -> OAEP:
    return OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, (str, bytes)):
        raise HandshakeError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HandshakeError(f"{what} is not valid base64") from None


def _public_key(public_key_b64: str) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(base64.b64decode(public_key_b64))
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not a base64 DER public key: {e}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the public key is not an RSA key")
    return key


def _aad(kernel_id: str) -> bytes:
    return f"2|{kernel_id}".encode("utf-8")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise HandshakeError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise HandshakeError(f"{what} is not a JSON object")
    return value


def parse_envelope(payload: bytes | str) -> Envelope:
    """
    Read a payload's outer layer without decrypting anything.

    @raise HandshakeError: for anything but a well-formed version 1 or 2
        envelope (garbage, bad base64, bad JSON, version 0 or unknown).
    """
    if isinstance(payload, str):
        payload = payload.encode("ascii", "replace")
    payload = payload.strip()
    if not payload:
        raise HandshakeError("empty payload")
    outer = _json_object(_unb64(payload, "payload"), "decoded payload")
    version = outer.get("version")
    if version is None or (type(version) is int and version == 0):
        raise HandshakeError(
            "version 0 (legacy) payloads are not accepted; use a launcher "
            "that sends version 1 or 2"
        )
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise HandshakeError(f"unsupported payload version {version!r}")
    required = ("key", "conn_info") if version == 1 else ("kernel_id", "key", "nonce", "conn_info")
    for name in required:
        if not isinstance(outer.get(name), str) or not outer[name]:
            raise HandshakeError(f"version {version} payload lacks {name!r}")
    return Envelope(version=version, kernel_id=outer.get("kernel_id", "") if version == 2 else "", fields=outer)


def open_envelope(envelope: Envelope, keys: HandshakeKeys) -> HandshakePayload:
    """
    Decrypt and check a parsed envelope.

    @raise HandshakeError: if it was encrypted to another key, was altered,
        or its content is not a connection-info object for its kernel.
    """
    if envelope.version == 1:
        return _open_v1(envelope, keys)
    return _open_v2(envelope, keys)


def decode(payload: bytes | str, keys: HandshakeKeys) -> HandshakePayload:
    """
    Parse and decrypt a payload as received from a launcher.

    @raise HandshakeError: see L{parse_envelope} and L{open_envelope}.
    """
    return open_envelope(parse_envelope(payload), keys)


def _kernel_id_of(info: dict[str, Any], what: str) -> str:
    kernel_id = info.get("kernel_id")
    if not isinstance(kernel_id, str) or not kernel_id:
        raise HandshakeError(f"{what} connection info lacks kernel_id")
    return kernel_id


def _open_v1(envelope: Envelope, keys: HandshakeKeys) -> HandshakePayload:
    wrapped = _unb64(envelope.fields["key"], "version 1 key")
    ciphertext = _unb64(envelope.fields["conn_info"], "version 1 conn_info")
    aes_key = keys._decrypt_v1_key(wrapped)
    if len(aes_key) != 16:
        raise HandshakeError("version 1 key cannot be decrypted (wrong key length)")
    if not ciphertext or len(ciphertext) % 16:
        raise HandshakeError("version 1 conn_info is not a whole number of AES blocks")
    decryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plaintext = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise HandshakeError(
            "version 1 conn_info does not decrypt (wrong key, or damaged)"
        ) from None
    info = _json_object(plaintext, "version 1 connection info")
    info.pop(TOKEN_FIELD, None)
    return HandshakePayload(1, _kernel_id_of(info, "version 1"), info, None)


def _open_v2(envelope: Envelope, keys: HandshakeKeys) -> HandshakePayload:
    kernel_id = envelope.kernel_id
    wrapped = _unb64(envelope.fields["key"], "version 2 key")
    nonce = _unb64(envelope.fields["nonce"], "version 2 nonce")
    ciphertext = _unb64(envelope.fields["conn_info"], "version 2 conn_info")
    if len(nonce) != 12:
        raise HandshakeError("version 2 nonce must be 12 bytes")
    aes_key = keys._decrypt_v2_key(wrapped)
    if len(aes_key) != 32:
        raise HandshakeError("version 2 key must be 32 bytes")
    try:
        plaintext = AESGCM(aes_key).decrypt(nonce, ciphertext, _aad(kernel_id))
    except InvalidTag:
        raise HandshakeError(
            "version 2 conn_info fails authentication (altered, or not for this kernel)"
        ) from None
    info = _json_object(plaintext, "version 2 connection info")
    token = info.pop(TOKEN_FIELD, None)
    if not isinstance(token, str) or not token:
        raise HandshakeError("version 2 connection info lacks the launch token")
    if _kernel_id_of(info, "version 2") != kernel_id:
        raise HandshakeError("version 2 connection info names another kernel")
    return HandshakePayload(2, kernel_id, info, token)


def encode_v1(conn_info: dict[str, Any], public_key_b64: str) -> bytes:
    """
    Build a version 1 payload, byte-compatible with Enterprise Gateway's
    launchers.  For tests and for launchers that must speak version 1.

    @param conn_info: the connection info, C{kernel_id} included.
    """
    aes_key = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(json.dumps(conn_info).encode("utf-8")) + padder.finalize()
    encryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    wrapped = _public_key(public_key_b64).encrypt(aes_key, PKCS1v15())
    outer = {"version": 1, "key": _b64(wrapped), "conn_info": _b64(ciphertext)}
    return base64.b64encode(json.dumps(outer).encode("utf-8"))


def encode_v2(
    conn_info: dict[str, Any], public_key_b64: str, kernel_id: str, token: str
) -> bytes:
    """
    Build a version 2 payload for C{kernel_id}, proving knowledge of the
    launch C{token}.
    """
    info = dict(conn_info, kernel_id=kernel_id)
    info[TOKEN_FIELD] = token
    aes_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    ciphertext = AESGCM(aes_key).encrypt(nonce, json.dumps(info).encode("utf-8"), _aad(kernel_id))
    wrapped = _public_key(public_key_b64).encrypt(aes_key, _oaep())
    outer = {
        "version": 2,
        "kernel_id": kernel_id,
        "key": _b64(wrapped),
        "nonce": _b64(nonce),
        "conn_info": _b64(ciphertext),
    }
    return base64.b64encode(json.dumps(outer).encode("utf-8"))
