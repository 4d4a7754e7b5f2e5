"""Money is an integer of nano-USD (1e-9 USD). Decimal only at the edges: parsing and rendering."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
# Amounts are stored as 64-bit integers; a billion dollars is far beyond any sane setting.
MAX_USD = 1_000_000_000


class MoneyError(ValueError):
    """A USD amount that cannot be held exactly in nanos (or is not a number at all)."""


def usd_to_nanos(value: str | int | float | Decimal) -> int:
    """Parse a USD amount ("1.25", 3, 0.3) into exact nanos; refuse anything finer than 1e-9."""
    if isinstance(value, bool):
        raise MoneyError(f"not an amount: {value!r}")
    try:
        # str() first: 0.3 as a float would otherwise become 0.29999999999999998889...
        amount = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise MoneyError(f"not an amount: {value!r}") from None
    if not amount.is_finite():
        raise MoneyError(f"not a finite amount: {value!r}")
    if abs(amount) > MAX_USD:
        raise MoneyError(f"more than {MAX_USD:,} USD: {value!r}")
    nanos = amount * NANOS_PER_USD
    if nanos != nanos.to_integral_value():
        raise MoneyError(f"finer than a nano-USD: {value!r}")
    return int(nanos)


def format_usd(nanos: int) -> str:
    """Render nanos as a USD string with trailing zeros trimmed: 1250000000 -> "1.25"."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")
