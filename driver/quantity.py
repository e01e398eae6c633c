"""Sizes that people type (`stowagectl --size`, driver flags) in Kubernetes quantity syntax,
parsed by the Kubernetes client's own parser so that `1Gi` = 2^30 and `1G` = 10^9 bytes, exactly
as in a PVC."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

HINT = "use a Kubernetes quantity such as 512Mi, 1Gi or 10G (Gi = 2^30 bytes, G = 10^9 bytes)"


def parse_bytes(text: str, *, allow_zero: bool = False) -> int:
    """A whole, non-negative number of bytes (positive unless `allow_zero`), or ValueError with a
    message a person can act on."""
    # Imported here: the kubernetes package takes about a second to import, and only a size
    # argument needs it.
    from kubernetes.utils.quantity import parse_quantity as untyped

    parse_quantity: Callable[[str], Decimal] = untyped

    try:
        if not text or any(c.isspace() for c in text):  # Kubernetes refuses spaces; so do we
            raise ValueError(text)
        value = parse_quantity(text)
    except (ValueError, TypeError, ArithmeticError):
        raise ValueError(f"invalid size {text!r}: {HINT}") from None
    if value != int(value):
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    size = int(value)
    if size < 0 or (size == 0 and not allow_zero):
        raise ValueError(f"invalid size {text!r}: must be {'0 or ' if allow_zero else ''}positive")
    return size
