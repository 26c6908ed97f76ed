"""
Kernel messages cut to what a client takes in one WebSocket message
(L{egateway.api.ws_limits}); the end-to-end case, through a real
C{jupyter server}, is in C{test_jupyter_server}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from egateway.api.ws_limits import ENVELOPE_ALLOWANCE, TORNADO_MAX_MESSAGE, client_limit, fit
from egateway.wire.protocol import Message
from egateway.wire.ws_formats import legacy_encode

PARENT = {"msg_id": "request-1", "msg_type": "execute_request", "session": "s", "username": "u"}

LIMIT = 200_000


def stream(text: str, name: str = "stdout") -> Message:
    return Message.build("stream", {"name": name, "text": text}, "kernel-session", PARENT)


def framed_size(message: Message) -> int:
    return len(legacy_encode(message, "iopub", 12345)[0])


class ClientLimitTests(SynchronousTestCase):
    def test_tornado_clients_get_tornados_limit(self) -> None:
        """
        jupyter_server's gateway client connects through Tornado, which
        names itself in C{User-Agent} and takes at most 10 MiB.
        """
        self.assertEqual(client_limit(b"Tornado/6.5.2", 0), TORNADO_MAX_MESSAGE)

    def test_others_unlimited_unless_configured(self) -> None:
        self.assertIsNone(client_limit(None, 0))
        self.assertIsNone(client_limit(b"Python/3.11 websockets/15.0", 0))
        self.assertEqual(client_limit(None, 5_000_000), 5_000_000)
        self.assertEqual(client_limit(b"Tornado/6.5.2", 20_000_000), 20_000_000)


class StreamCutTests(SynchronousTestCase):
    def assertCut(self, text: str) -> list[Message]:
        original = stream(text)
        pieces = list(fit(original, framed_size(original), LIMIT))
        self.assertGreater(len(pieces), 1)
        self.assertEqual("".join(p.content()["text"] for p in pieces), text)
        for piece in pieces:
            self.assertLessEqual(framed_size(piece), LIMIT)
            self.assertEqual(piece.msg_type, "stream")
            self.assertEqual(piece.content()["name"], "stdout")
            self.assertEqual(piece.parent_header(), PARENT)
            self.assertEqual(piece.header["session"], original.header["session"])
        ids = [p.msg_id for p in pieces]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertTrue(all(i.startswith(original.msg_id + ".") for i in ids))
        return pieces

    def test_ascii_text_in_pieces_that_fit(self) -> None:
        pieces = self.assertCut("0123456789\n" * 100_000)
        # Pieces are filled, not cut to a worst case.
        self.assertLessEqual(len(pieces), 1_100_000 // (LIMIT - ENVELOPE_ALLOWANCE) + 2)

    def test_escaped_and_wide_characters(self) -> None:
        """
        Characters whose JSON takes several bytes each (control
        characters, quotes, non-ASCII, astral) still give pieces under the
        limit, cut between characters.
        """
        self.assertCut(("é\u0001\"\\\t😀" * 3000 + "plain text " * 3000) * 10)

    def test_small_stream_is_one_piece(self) -> None:
        original = stream("hello\n")
        [piece] = fit(original, 10, LIMIT)
        self.assertEqual(piece.content()["text"], "hello\n")


class NoticeTests(SynchronousTestCase):
    def test_other_messages_replaced_by_a_notice(self) -> None:
        """
        A display cannot be cut without changing what it says: a notice on
        stderr takes its place, under the same parent.
        """
        original = Message.build(
            "display_data", {"data": {"text/plain": "y" * 300_000}, "metadata": {}}, "kernel-session", PARENT
        )
        [notice] = fit(original, framed_size(original), LIMIT)
        self.assertEqual(notice.msg_type, "stream")
        self.assertEqual(notice.content()["name"], "stderr")
        self.assertIn("a display_data message of 0.3 MiB was not sent", notice.content()["text"])
        self.assertEqual(notice.parent_header(), PARENT)
        self.assertNotEqual(notice.msg_id, original.msg_id)
