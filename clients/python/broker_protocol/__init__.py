"""Facts of the broker's wire protocol shared by the server and the Python client.

Pure constants, no I/O and no dependencies, so the server's core can import
them without loading the client's networking code.
"""

from .codes import CloseCode, ErrorCode

__all__ = ["CloseCode", "ErrorCode"]
