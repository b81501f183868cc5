"""Shared by every conversation on the bus: msgpack encode/decode and the error every reply can carry.

Each conversation has its own module of msgspec Structs (client, worker, cut, kv, reconfiguration,
control). ``forbid_unknown_fields`` is off on purpose: a newer peer may add optional fields
without breaking an older one (subjects carry the major version). Structs are untagged, so a class
name never travels: renaming one keeps the bytes on the wire."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from nitsum_core.errors import NitsumError, ProtocolError, error_class


class ErrorInfo(msgspec.Struct):
    """An error on the wire: a stable machine code and a message that says what to do."""

    code: str
    message: str

    @classmethod
    def from_exc(cls, exc: NitsumError) -> ErrorInfo:
        return cls(code=exc.code, message=exc.message)

    def to_exc(self) -> NitsumError:
        return error_class(self.code)(self.message)


_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}

T = TypeVar("T", bound=msgspec.Struct)


def encode(msg: msgspec.Struct) -> bytes:
    """Encode any protocol message to msgpack bytes."""
    return _encoder.encode(msg)


def decode(cls: type[T], data: bytes) -> T:
    """Decode ``data`` as ``cls``; raise ProtocolError saying what was wrong on any bad input."""
    dec = _decoders.get(cls)
    if dec is None:
        dec = _decoders[cls] = msgspec.msgpack.Decoder(cls)
    try:
        return dec.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {cls.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed {cls.__name__} (not msgpack of the expected shape): {exc}") from None
