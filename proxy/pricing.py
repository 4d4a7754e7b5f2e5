"""Pure pricing: the price table of config/pricing.toml and the cost of a request in nano-USD.

Rates in the file are USD per million tokens; in memory they are exact integers of nano-USD per
token ($3/MTok = 3000). All arithmetic is integer. The only I/O is `PriceTable.load`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

from proxy.errors import ConfigError
from proxy.metering import Usage
from proxy.money import NANOS_PER_USD

TOKENS_PER_MTOK = 1_000_000
SEARCHES_PER_1K = 1_000
REFUSE = "refuse"
PRICE_AS = "price_as:"

# (key in the file, field of Rates)
RATE_KEYS: tuple[tuple[str, str], ...] = (
    ("input_usd_mtok", "input_nanos"),
    ("output_usd_mtok", "output_nanos"),
    ("cache_write_5m_usd_mtok", "cache_write_5m_nanos"),
    ("cache_write_1h_usd_mtok", "cache_write_1h_nanos"),
    ("cache_read_usd_mtok", "cache_read_nanos"),
)
_RATE_FILE_KEYS = frozenset(key for key, _ in RATE_KEYS)
_MODEL_KEYS = _RATE_FILE_KEYS | {"aliases", "long_context", "fast"}
_LONG_CONTEXT_KEYS = _RATE_FILE_KEYS | {"threshold_tokens"}
_PRICING_KEYS = frozenset({"unknown_model", "web_search_usd_per_1k"})


@dataclass(frozen=True, slots=True)
class Rates:
    """One price tier: integer nano-USD per token."""

    input_nanos: int
    output_nanos: int
    cache_write_5m_nanos: int
    cache_write_1h_nanos: int
    cache_read_nanos: int


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model's tiers. Fast rates, when present, apply at any prompt size and win over long context
    (fast mode is priced flat across the full context window)."""

    model: str
    standard: Rates
    long_context: Rates | None = None
    long_context_threshold_tokens: int | None = None
    fast: Rates | None = None

    def __post_init__(self) -> None:
        if (self.long_context is None) != (self.long_context_threshold_tokens is None):
            raise ValueError("long_context and long_context_threshold_tokens go together")

    def rates_for(self, prompt_tokens: int, speed: str = "standard") -> Rates:
        """The tier of a request whose prompt (input + cache writes + cache reads) has this size.

        Long-context rates apply strictly above the threshold (200,000 is standard, 200,001 long).
        """
        if speed == "fast" and self.fast is not None:
            return self.fast
        if (
            self.long_context is not None
            and self.long_context_threshold_tokens is not None
            and prompt_tokens > self.long_context_threshold_tokens
        ):
            return self.long_context
        return self.standard


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Every priced model, by canonical id and alias, plus the unknown-model rule."""

    prices: Mapping[str, ModelPrice]  # canonical id -> price, in file order
    names: Mapping[str, str]  # canonical id or alias -> canonical id
    web_search_nanos: int  # one web search
    unknown_model_price_as: str | None = None  # canonical id; None refuses unknown models

    @property
    def models(self) -> tuple[str, ...]:
        """Canonical model ids, in file order."""
        return tuple(self.prices)

    def lookup(self, model: str) -> ModelPrice | None:
        """The price of a model id or alias; an unknown model gets the price_as target or None."""
        canonical = self.names.get(model)
        if canonical is not None:
            return self.prices[canonical]
        if self.unknown_model_price_as is not None:
            return self.prices[self.unknown_model_price_as]
        return None

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """Read and validate a pricing TOML file."""
        path = Path(path)
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(str(path), "(file)", "file not found") from None
        except OSError as exc:
            raise ConfigError(str(path), "(file)", f"cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), "(syntax)", str(exc)) from None
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str) -> PriceTable:
        """Validate parsed TOML; every problem is a ConfigError naming `source` and the key."""
        _check_table(data, "(top)", source)
        _check_keys(data, frozenset({"pricing", "models"}), "", source)
        pricing = _required(data, "pricing", "", source)
        _check_table(pricing, "pricing", source)
        _check_keys(pricing, _PRICING_KEYS, "pricing", source)
        models = _required(data, "models", "", source)
        _check_table(models, "models", source)
        if not models:
            raise ConfigError(source, "models", "at least one model is needed")

        prices: dict[str, ModelPrice] = {}
        aliases: dict[str, list[str]] = {}
        for model_id, table in models.items():
            prices[model_id], aliases[model_id] = _model(model_id, table, source)
        names: dict[str, str] = {model_id: model_id for model_id in prices}
        for model_id, model_aliases in aliases.items():
            for alias in model_aliases:
                if alias in names:
                    raise ConfigError(
                        source,
                        f"models.{model_id}.aliases",
                        f"{alias!r} already names model {names[alias]!r}",
                    )
                names[alias] = model_id

        web_search_nanos = _nanos_per_unit(
            _required(pricing, "web_search_usd_per_1k", "pricing", source),
            SEARCHES_PER_1K,
            "search",
            "pricing.web_search_usd_per_1k",
            source,
        )
        return cls(
            prices=MappingProxyType(prices),
            names=MappingProxyType(names),
            web_search_nanos=web_search_nanos,
            unknown_model_price_as=_unknown_model(
                _required(pricing, "unknown_model", "pricing", source), names, source
            ),
        )


def cost_nanos(usage: Usage, price: ModelPrice, web_search_nanos: int) -> int:
    """What one response costs (SPEC §3); the tier follows usage.prompt_tokens and usage.speed."""
    rates = price.rates_for(usage.prompt_tokens, usage.speed)
    return (
        usage.input_tokens * rates.input_nanos
        + usage.cache_creation_5m_input_tokens * rates.cache_write_5m_nanos
        + usage.cache_creation_1h_input_tokens * rates.cache_write_1h_nanos
        + usage.cache_read_input_tokens * rates.cache_read_nanos
        + usage.output_tokens * rates.output_nanos
        + usage.web_search_requests * web_search_nanos
    )


def worst_case_nanos(
    price: ModelPrice, input_tokens: int, max_output_tokens: int, speed: str = "standard"
) -> int:
    """The admission estimate (SPEC §7): input at the input rate plus max_tokens of output, at the
    tier the input estimate falls in."""
    rates = price.rates_for(input_tokens, speed)
    return input_tokens * rates.input_nanos + max_output_tokens * rates.output_nanos


def _model(model_id: str, table: Any, source: str) -> tuple[ModelPrice, list[str]]:
    prefix = f"models.{model_id}"
    if not model_id or model_id != model_id.strip():
        raise ConfigError(source, prefix, "a model id must be non-empty without surrounding spaces")
    _check_table(table, prefix, source)
    _check_keys(table, _MODEL_KEYS, prefix, source)
    aliases = _aliases(table.get("aliases", []), f"{prefix}.aliases", source)

    long_context = threshold_tokens = None
    if "long_context" in table:
        lc_prefix = f"{prefix}.long_context"
        lc_table = table["long_context"]
        _check_table(lc_table, lc_prefix, source)
        _check_keys(lc_table, _LONG_CONTEXT_KEYS, lc_prefix, source)
        threshold_tokens = _threshold(
            _required(lc_table, "threshold_tokens", lc_prefix, source), lc_prefix, source
        )
        long_context = _rates(lc_table, lc_prefix, source)

    fast = None
    if "fast" in table:
        fast_table = table["fast"]
        _check_table(fast_table, f"{prefix}.fast", source)
        _check_keys(fast_table, _RATE_FILE_KEYS, f"{prefix}.fast", source)
        fast = _rates(fast_table, f"{prefix}.fast", source)

    price = ModelPrice(
        model=model_id,
        standard=_rates(table, prefix, source),
        long_context=long_context,
        long_context_threshold_tokens=threshold_tokens,
        fast=fast,
    )
    return price, aliases


def _rates(table: Mapping[str, Any], prefix: str, source: str) -> Rates:
    fields = {
        field: _nanos_per_unit(
            _required(table, key, prefix, source),
            TOKENS_PER_MTOK,
            "token",
            f"{prefix}.{key}",
            source,
        )
        for key, field in RATE_KEYS
    }
    return Rates(**fields)


def _nanos_per_unit(value: Any, units: int, unit: str, key: str, source: str) -> int:
    """A USD price for `units` units (1,000,000 tokens, 1,000 searches) as exact nanos per unit."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(source, key, f"expected a number of USD, got {value!r}")
    amount = Decimal(str(value))  # str() first: 0.3 stays 0.3, not 0.29999999999999998889...
    if not amount.is_finite():
        raise ConfigError(source, key, f"expected a finite number, got {value!r}")
    if amount < 0:
        raise ConfigError(source, key, f"must not be negative, got {value!r}")
    nanos = amount * NANOS_PER_USD / units
    if nanos != nanos.to_integral_value():
        raise ConfigError(
            source, key, f"{value} is {nanos.normalize()} nano-USD per {unit}; need a whole number"
        )
    return int(nanos)


def _aliases(value: Any, key: str, source: str) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(source, key, f"expected a list of model ids, got {value!r}")
    for alias in value:
        if not isinstance(alias, str) or not alias or alias != alias.strip():
            raise ConfigError(source, key, f"not a model id: {alias!r}")
    if len(set(value)) != len(value):
        raise ConfigError(source, key, "lists an alias twice")
    return list(value)


def _threshold(value: Any, prefix: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(
            source, f"{prefix}.threshold_tokens", f"expected a positive whole number, got {value!r}"
        )
    return value


def _unknown_model(value: Any, names: Mapping[str, str], source: str) -> str | None:
    key = "pricing.unknown_model"
    if value == REFUSE:
        return None
    if isinstance(value, str) and value.startswith(PRICE_AS):
        target = value.removeprefix(PRICE_AS).strip()
        if target not in names:
            raise ConfigError(
                source, key, f"price_as target {target!r} is not a model in the table"
            )
        return names[target]
    raise ConfigError(source, key, f"expected 'refuse' or 'price_as:<model>', got {value!r}")


def _required(table: Mapping[str, Any], name: str, prefix: str, source: str) -> Any:
    if name not in table:
        raise ConfigError(source, f"{prefix}.{name}" if prefix else name, "missing")
    return table[name]


def _check_table(value: Any, key: str, source: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(source, key, "must be a table")


def _check_keys(
    table: Mapping[str, Any], allowed: frozenset[str], prefix: str, source: str
) -> None:
    for name in table:
        if name not in allowed:
            raise ConfigError(source, f"{prefix}.{name}" if prefix else name, "unknown key")
