"""
What a client takes in one WebSocket message, and kernel messages cut to fit.

jupyter_server's gateway client (what C{jupyter server --gateway-url} uses,
and so every JupyterLab behind it) opens its connection to the gateway with
Tornado's C{websocket_connect} at Tornado's default C{max_message_size},
10 MiB, and has no setting to change it.  A larger message from the gateway
makes Tornado close the connection: the notebook server reconnects, the
output is lost, and as the reply behind it is lost too the cell stays busy
(seen with a 20 MB C{print} through C{jupyter server}).  Enterprise Gateway,
behind the same client, has the same limit.

So for a client whose upgrade request says it is Tornado (C{User-Agent:
Tornado/...}, which Tornado's HTTP client sends unless told otherwise), or
for every client when C{client_message_limit} is set, a kernel message
larger than the limit is cut to fit before it is sent:

  - a C{stream} message becomes several C{stream} messages with the same
    name and parent whose texts, joined, are the original one: consecutive
    stream outputs are one output to a notebook (JupyterLab's output area
    and nbformat merge them);
  - any other message cannot be cut without changing what it says: in its
    place the client gets a C{stream} on stderr, under the same parent,
    saying what was not sent and why, so the cell's reply still arrives and
    the notebook stays usable.  The gateway logs it.

Other clients (JupyterLab's own WebSocket is to the notebook server, not
here; Autobahn, C{websockets}, browsers) take messages of any size and get
them whole.
"""

from __future__ import annotations

from typing import Iterator

from egateway.wire.protocol import Message, dumps

TORNADO_MAX_MESSAGE = 10 * 1024 * 1024
"""
Tornado's default C{max_message_size} for a WebSocket client.
"""

ENVELOPE_ALLOWANCE = 64 * 1024
"""
Bytes of a framed message that are not its content: header, parent,
metadata, channel and sequence number (a few hundred bytes), with room to
spare.
"""


def client_limit(user_agent: bytes | None, configured: int) -> int | None:
    """
    The largest message, in bytes, to send to a client in one WebSocket
    message, or C{None} for no limit.

    @param user_agent: the client's C{User-Agent} on its upgrade request.
    @param configured: C{client_message_limit}; 0 means Tornado's default
        for Tornado clients and none for others.
    """
    if configured > 0:
        return configured
    if user_agent is not None and user_agent.startswith(b"Tornado/"):
        return TORNADO_MAX_MESSAGE
    return None


def fit(message: Message, size: int, limit: int) -> Iterator[Message]:
    """
    C{message} (C{size} bytes as framed) as messages that each fit in
    C{limit} bytes: its text in pieces for a stream, else a notice in its
    place.
    """
    budget = max(limit - ENVELOPE_ALLOWANCE, 1024)
    if message.msg_type == "stream" and not message.buffers:
        content = message.content()
        text = content.get("text")
        if isinstance(text, str) and text:
            yield from _stream_pieces(message, content, text, budget)
            return
    yield _notice(message, size, limit)


def _stream_pieces(message: Message, content: dict, text: str, budget: int) -> Iterator[Message]:
    """
    The stream C{message}'s C{text} cut into messages whose content fits in
    C{budget} bytes, each numbered after the original's C{msg_id}.
    """
    # Characters per piece from the whole text's encoded size, checked per
    # piece and halved where escaping makes one larger than the average.
    encoded = len(dumps(text))
    step = max(1, int(len(text) * budget / encoded * 0.95))
    header = message.header
    start = 0
    number = 0
    while start < len(text):
        length = step
        while True:
            piece = dumps({**content, "text": text[start : start + length]})
            if len(piece) <= budget or length == 1:
                break
            length //= 2
        number += 1
        yield _with_content(message, header, f"{header.get('msg_id', '')}.{number}", piece)
        start += length


def _notice(message: Message, size: int, limit: int) -> Message:
    """
    A stderr stream, under C{message}'s parent, saying that C{message} was
    not sent.
    """
    header = message.header
    text = (
        f"[egateway] a {message.msg_type} message of {size / 2**20:.1f} MiB was not sent: this client takes "
        f"at most {limit / 2**20:.1f} MiB in one WebSocket message (jupyter_server's gateway client is held "
        f"to 10 MiB by Tornado). Save large results to a file, or display less of them.\n"
    )
    notice = {**header, "msg_id": f"{header.get('msg_id', '')}.notice", "msg_type": "stream"}
    return Message(
        [dumps(notice), message.parts[1], dumps({}), dumps({"name": "stderr", "text": text})]
    )


def _with_content(message: Message, header: dict, msg_id: str, content: bytes) -> Message:
    """
    A copy of C{message} with its own C{msg_id} and C{content}.
    """
    return Message([dumps({**header, "msg_id": msg_id}), message.parts[1], message.parts[2], content])
