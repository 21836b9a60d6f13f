"""RFC 6455 framing of server-to-client text frames, built once per message.

Frames a server sends are never masked, so the bytes of one frame are the
same for every uncompressed connection: the outbox frames a message once, for
the first connection it goes to, and the others write the same object.
``websockets`` still owns the handshake, reading, control frames and the
closing handshake. The reference is ``websockets.frames.Frame(Opcode.TEXT,
payload).serialize(mask=False)``, which gives the same bytes four times
slower (``tests/test_codec.py`` checks ours against websockets' parser).
"""

from __future__ import annotations

import struct

_FIN_TEXT = 0x81
_U16 = struct.Struct("!BBH")
_U64 = struct.Struct("!BBQ")


def text_frame(payload: bytes) -> bytes:
    """Return a complete, unmasked, unfragmented text frame carrying ``payload``."""
    length = len(payload)
    if length < 126:
        return bytes((_FIN_TEXT, length)) + payload
    if length < 65536:
        return _U16.pack(_FIN_TEXT, 126, length) + payload
    return _U64.pack(_FIN_TEXT, 127, length) + payload
