"""The checks every publish passes, whichever front-end it came through.

One pure function, called by the WebSocket session and by the HTTP API, so
both refuse the same things with the same words.
"""

from __future__ import annotations

from broker import codec
from broker.channels import check_channel
from broker.exceptions import TooLarge

__all__ = ["validate_publish"]


def validate_publish(channel: str, data: object, max_data_bytes: int) -> bytes:
    """Check a publish's channel and size and serialize its ``data``, once.

    Returns the serialized data, the bytes every subscriber will get. Raises
    ``BadChannel`` (not a channel, or a pattern), ``BadRequest`` (data that
    cannot be serialized) or ``TooLarge`` (over ``max_data_bytes``).
    """
    check_channel(channel)
    encoded = codec.encode_data(data)
    if len(encoded) > max_data_bytes:
        raise TooLarge(
            f"data is {len(encoded)} bytes serialized, over the {max_data_bytes}-byte cap"
        )
    return encoded
