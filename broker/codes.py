"""The wire's error and close codes (``ErrorCode``, ``CloseCode``).

Defined once, in ``broker_protocol`` (shipped with the client distribution,
which the server depends on): the server's exception tree, frame models, JSON
Schema and metrics derive from these enums, and so does the Python client.
"""

from __future__ import annotations

from broker_protocol import CloseCode, ErrorCode

__all__ = ["ERROR_CODES", "CloseCode", "ErrorCode"]

#: Every wire error code, in the order of the protocol document.
ERROR_CODES: tuple[str, ...] = tuple(code.value for code in ErrorCode)
