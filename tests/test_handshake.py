"""
Tests for the connection-info codec (L{egateway.clusters.handshake}).
"""

from __future__ import annotations

import base64
import json

from Cryptodome.Cipher import AES, PKCS1_v1_5
from Cryptodome.PublicKey import RSA
from Cryptodome.Util.Padding import pad
from twisted.trial.unittest import SynchronousTestCase

from egateway.clusters.handshake import (
    HandshakeError,
    HandshakeKeys,
    decode,
    encode_v1,
    encode_v2,
    parse_envelope,
)

KERNEL_ID = "f88bdc84-04c6-4021-963d-6811a61eca18"
INFO = {
    "shell_port": 51234,
    "iopub_port": 51235,
    "stdin_port": 51236,
    "control_port": 51237,
    "hb_port": 51238,
    "ip": "0.0.0.0",
    "key": "6f1c0b6e-2a4c-4c43-8a57-0f4a7f6c1e2d",
    "transport": "tcp",
    "signature_scheme": "hmac-sha256",
    "kernel_name": "",
    "pid": 4242,
    "pgid": 4242,
    "comm_port": 51239,
    "kernel_id": KERNEL_ID,
}

_KEYS: list[HandshakeKeys] = []


def keys(index: int = 0) -> HandshakeKeys:
    """
    Key pairs shared by the module's tests: generating RSA keys is slow.
    """
    while len(_KEYS) <= index:
        _KEYS.append(HandshakeKeys.generate())
    return _KEYS[index]


def outer(payload: bytes) -> dict:
    return json.loads(base64.b64decode(payload))


def rewrap(fields: dict) -> bytes:
    return base64.b64encode(json.dumps(fields).encode())


def flip(b64_text: str, index: int = -1) -> str:
    raw = bytearray(base64.b64decode(b64_text))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def pycryptodome_v1(info: dict, public_key_b64: str) -> bytes:
    """
    A version 1 payload built the way Enterprise Gateway's launchers build
    it, with PyCryptodome, independently of our encoder.
    """
    aes_key = bytes(range(16))
    ciphertext = AES.new(aes_key, AES.MODE_ECB).encrypt(pad(json.dumps(info).encode(), 16))
    wrapped = PKCS1_v1_5.new(RSA.importKey(base64.b64decode(public_key_b64))).encrypt(aes_key)
    fields = {
        "version": 1,
        "key": base64.b64encode(wrapped).decode(),
        "conn_info": base64.b64encode(ciphertext).decode(),
    }
    return base64.b64encode(json.dumps(fields).encode("utf-8"))


class KeysTests(SynchronousTestCase):
    def test_public_key_is_base64_der_importable_by_pycryptodome(self) -> None:
        """
        The public key is what Enterprise Gateway's launchers expect: base64
        DER SubjectPublicKeyInfo of a 2048-bit RSA key.
        """
        public = keys().public_key_b64
        self.assertNotIn("\n", public)
        self.assertNotIn("BEGIN", public)
        imported = RSA.importKey(base64.b64decode(public))
        self.assertEqual(imported.size_in_bits(), 2048)
        self.assertFalse(imported.has_private())


class Version1Tests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        A version 1 payload decodes to the connection info it carried.
        """
        result = decode(encode_v1(INFO, keys().public_key_b64), keys())
        self.assertEqual((result.version, result.kernel_id, result.token), (1, KERNEL_ID, None))
        self.assertEqual(result.conn_info, INFO)

    def test_accepts_pycryptodome_payload(self) -> None:
        """
        A payload encrypted with PyCryptodome exactly as Enterprise
        Gateway's launch_ipykernel.py does it is accepted.
        """
        result = keys().decode(pycryptodome_v1(INFO, keys().public_key_b64))
        self.assertEqual(result.conn_info, INFO)

    def test_accepts_str_and_trailing_newline(self) -> None:
        """
        Payloads arrive as bytes, but a text payload or a trailing newline
        is tolerated.
        """
        payload = encode_v1(INFO, keys().public_key_b64)
        self.assertEqual(decode(payload.decode() + "\n", keys()).kernel_id, KERNEL_ID)

    def test_wrong_key(self) -> None:
        """
        A payload encrypted to another gateway's key is refused.
        """
        payload = encode_v1(INFO, keys(1).public_key_b64)
        self.assertRaises(HandshakeError, decode, payload, keys())

    def test_missing_kernel_id(self) -> None:
        """
        Version 1 connection info must name its kernel.
        """
        info = {k: v for k, v in INFO.items() if k != "kernel_id"}
        error = self.assertRaises(HandshakeError, decode, encode_v1(info, keys().public_key_b64), keys())
        self.assertIn("kernel_id", str(error))

    def test_ciphertext_damaged(self) -> None:
        """
        A truncated ciphertext is refused rather than half-decoded.
        """
        fields = outer(encode_v1(INFO, keys().public_key_b64))
        fields["conn_info"] = base64.b64encode(base64.b64decode(fields["conn_info"])[:-3]).decode()
        self.assertRaises(HandshakeError, decode, rewrap(fields), keys())


class Version2Tests(SynchronousTestCase):
    def encode(self) -> bytes:
        return encode_v2(INFO, keys().public_key_b64, KERNEL_ID, "the-token")

    def test_round_trip(self) -> None:
        """
        A version 2 payload decodes to its connection info and token; the
        token is not left in the connection info.
        """
        result = decode(self.encode(), keys())
        self.assertEqual((result.version, result.kernel_id, result.token), (2, KERNEL_ID, "the-token"))
        self.assertEqual(result.conn_info, INFO)

    def test_kernel_id_in_clear(self) -> None:
        """
        The kernel id can be read without decrypting, to refuse early.
        """
        envelope = parse_envelope(self.encode())
        self.assertEqual((envelope.version, envelope.kernel_id), (2, KERNEL_ID))

    def test_wrong_key(self) -> None:
        """
        A version 2 payload encrypted to another key is refused.
        """
        payload = encode_v2(INFO, keys(1).public_key_b64, KERNEL_ID, "t")
        error = self.assertRaises(HandshakeError, decode, payload, keys())
        self.assertIn("cannot be decrypted", str(error))

    def test_tampered_ciphertext(self) -> None:
        """
        Flipping one bit of the ciphertext is detected.
        """
        fields = outer(self.encode())
        fields["conn_info"] = flip(fields["conn_info"], 3)
        error = self.assertRaises(HandshakeError, decode, rewrap(fields), keys())
        self.assertIn("authentication", str(error))

    def test_tampered_nonce(self) -> None:
        """
        Altering the nonce is detected.
        """
        fields = outer(self.encode())
        fields["nonce"] = flip(fields["nonce"], 0)
        self.assertRaises(HandshakeError, decode, rewrap(fields), keys())

    def test_relabelled_kernel(self) -> None:
        """
        A payload moved to another kernel id fails authentication.
        """
        fields = outer(self.encode())
        fields["kernel_id"] = "another-kernel"
        error = self.assertRaises(HandshakeError, decode, rewrap(fields), keys())
        self.assertIn("authentication", str(error))

    def test_relabelled_version(self) -> None:
        """
        A version 2 payload relabelled as version 1 is not accepted.
        """
        fields = outer(self.encode())
        fields["version"] = 1
        self.assertRaises(HandshakeError, decode, rewrap(fields), keys())

    def test_tokenless_plaintext(self) -> None:
        """
        A well-encrypted payload without a launch token is refused: the
        token is what makes it more than an encryption to a public key.
        """
        import os

        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from egateway.clusters import handshake

        aes_key = os.urandom(32)
        nonce = os.urandom(12)
        public = handshake._public_key(keys().public_key_b64)
        fields = {
            "version": 2,
            "kernel_id": KERNEL_ID,
            "key": base64.b64encode(public.encrypt(aes_key, handshake._oaep())).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "conn_info": base64.b64encode(
                AESGCM(aes_key).encrypt(nonce, json.dumps(INFO).encode(), f"2|{KERNEL_ID}".encode())
            ).decode(),
        }
        error = self.assertRaises(HandshakeError, decode, rewrap(fields), keys())
        self.assertIn("launch token", str(error))

    def test_missing_field(self) -> None:
        """
        A version 2 envelope without its nonce is malformed.
        """
        fields = outer(self.encode())
        del fields["nonce"]
        error = self.assertRaises(HandshakeError, decode, rewrap(fields), keys())
        self.assertIn("nonce", str(error))


class MalformedTests(SynchronousTestCase):
    def assertRefused(self, payload: bytes, fragment: str) -> None:
        error = self.assertRaises(HandshakeError, decode, payload, keys())
        self.assertIn(fragment, str(error))

    def test_empty(self) -> None:
        """
        An empty payload is refused.
        """
        self.assertRefused(b"", "empty")

    def test_not_base64(self) -> None:
        """
        Text that is not base64 is refused as such.
        """
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "base64")

    def test_binary_garbage(self) -> None:
        """
        Random binary data is refused.
        """
        self.assertRefused(bytes(range(256)), "base64")

    def test_base64_not_json(self) -> None:
        """
        Base64 of something that is not JSON is refused.
        """
        self.assertRefused(base64.b64encode(b"\x00\x01 not json"), "not JSON")

    def test_json_not_object(self) -> None:
        """
        Base64 JSON that is not an object is refused.
        """
        self.assertRefused(base64.b64encode(b"[1, 2]"), "not a JSON object")

    def test_version_0(self) -> None:
        """
        Legacy version 0 (no version field, or 0) is refused.
        """
        self.assertRefused(rewrap({"key": "a", "conn_info": "b"}), "version 0")
        self.assertRefused(rewrap({"version": 0, "key": "a", "conn_info": "b"}), "version 0")

    def test_unknown_version(self) -> None:
        """
        Versions we do not know, and non-integer versions, are refused.
        """
        self.assertRefused(rewrap({"version": 3, "key": "a", "conn_info": "b"}), "unsupported")
        self.assertRefused(rewrap({"version": "1", "key": "a", "conn_info": "b"}), "unsupported")
        self.assertRefused(rewrap({"version": True, "key": "a", "conn_info": "b"}), "unsupported")

    def test_fields_not_base64(self) -> None:
        """
        Inner fields that are not base64 are refused.
        """
        self.assertRefused(rewrap({"version": 1, "key": "!!", "conn_info": "AAAA"}), "base64")

    def test_garbage_key(self) -> None:
        """
        A key field of random bytes does not decrypt.
        """
        fields = {"version": 1, "key": base64.b64encode(b"x" * 256).decode(), "conn_info": "AAAA"}
        self.assertRaises(HandshakeError, decode, rewrap(fields), keys())
