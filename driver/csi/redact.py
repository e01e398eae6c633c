"""Make a request safe to log: every field the CSI proto marks csi_secret is blanked."""

from __future__ import annotations

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from csi_proto import csi_pb2

MASK = "***stripped***"


def _is_secret(field: FieldDescriptor) -> bool:
    return bool(field.GetOptions().Extensions[csi_pb2.csi_secret])


def redact(msg: Message) -> Message:
    """A copy of `msg` with secret fields replaced by a mask (map keys are kept)."""
    out = type(msg)()
    out.CopyFrom(msg)
    _scrub(out)
    return out


def _scrub(msg: Message) -> None:
    for field, value in msg.ListFields():
        if _is_secret(field):
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                keys = list(value.keys())
                for key in keys:
                    value[key] = MASK
            elif field.type == FieldDescriptor.TYPE_STRING:
                setattr(msg, field.name, MASK)
            else:
                msg.ClearField(field.name)
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                continue
            if field.is_repeated:
                for item in value:
                    _scrub(item)
            else:
                _scrub(value)


def loggable(msg: Message) -> str:
    """One log line for a request; if redaction itself fails, nothing of the request is shown."""
    try:
        return text_format.MessageToString(redact(msg), as_one_line=True)
    except Exception:  # noqa: BLE001 - never let a secret through on an unexpected shape
        return f"<{type(msg).__name__}: not loggable>"
