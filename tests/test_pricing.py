"""Pricing: the real price table, the cost formula and the loader's refusals. Pure, table-driven."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import ConfigError
from proxy.metering import Usage
from proxy.pricing import ModelPrice, PriceTable, Rates, cost_nanos, worst_case_nanos

PRICING_TOML = Path(__file__).resolve().parent.parent / "config" / "pricing.toml"
SEARCH_NANOS = 10_000_000  # $10 per 1,000 searches


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load(PRICING_TOML)


def price_of(table: PriceTable, model: str) -> ModelPrice:
    price = table.lookup(model)
    assert price is not None, model
    return price


# Every cell of the seed table, priced through cost_nanos, against hand-computed nanos.
# "cache write" in the seed is the 5-minute write. Sonnet 4 / 4.5 standard cells use a 200,000-token
# prompt (the largest standard one); their long cells a 1,000,000-token prompt; the long output
# cell needs a long prompt too, so it is 1M input + 1M output ($6 + $22.50).
M = 1_000_000


def inp(tokens: int) -> Usage:
    return Usage(input_tokens=tokens)


def out(tokens: int) -> Usage:
    return Usage(output_tokens=tokens)


def w5m(tokens: int) -> Usage:
    return Usage(cache_creation_5m_input_tokens=tokens)


def read(tokens: int) -> Usage:
    return Usage(cache_read_input_tokens=tokens)


SEED_CELLS: list[tuple[str, str, Usage, int]] = [
    ("claude-haiku-4-5", "input", inp(M), 1_000_000_000),
    ("claude-haiku-4-5", "output", out(M), 5_000_000_000),
    ("claude-haiku-4-5", "cache write", w5m(M), 1_250_000_000),
    ("claude-haiku-4-5", "cache read", read(M), 100_000_000),
    ("claude-sonnet-4-5", "input", inp(200_000), 600_000_000),
    ("claude-sonnet-4-5", "output", out(M), 15_000_000_000),
    ("claude-sonnet-4-5", "cache write", w5m(200_000), 750_000_000),
    ("claude-sonnet-4-5", "cache read", read(200_000), 60_000_000),
    ("claude-sonnet-4-5", "long input", inp(M), 6_000_000_000),
    ("claude-sonnet-4-5", "long output", Usage(input_tokens=M, output_tokens=M), 28_500_000_000),
    ("claude-sonnet-4-5", "long cache write", w5m(M), 7_500_000_000),
    ("claude-sonnet-4-5", "long cache read", read(M), 600_000_000),
    ("claude-opus-4-1", "input", inp(M), 15_000_000_000),
    ("claude-opus-4-1", "output", out(M), 75_000_000_000),
    ("claude-opus-4-1", "cache write", w5m(M), 18_750_000_000),
    ("claude-opus-4-1", "cache read", read(M), 1_500_000_000),
    ("claude-sonnet-4-0", "input", inp(200_000), 600_000_000),
    ("claude-sonnet-4-0", "output", out(M), 15_000_000_000),
    ("claude-sonnet-4-0", "cache write", w5m(200_000), 750_000_000),
    ("claude-sonnet-4-0", "cache read", read(200_000), 60_000_000),
    ("claude-sonnet-4-0", "long input", inp(M), 6_000_000_000),
    ("claude-sonnet-4-0", "long output", Usage(input_tokens=M, output_tokens=M), 28_500_000_000),
    ("claude-sonnet-4-0", "long cache write", w5m(M), 7_500_000_000),
    ("claude-sonnet-4-0", "long cache read", read(M), 600_000_000),
    ("claude-opus-4-0", "input", inp(M), 15_000_000_000),
    ("claude-opus-4-0", "output", out(M), 75_000_000_000),
    ("claude-opus-4-0", "cache write", w5m(M), 18_750_000_000),
    ("claude-opus-4-0", "cache read", read(M), 1_500_000_000),
    ("claude-3-7-sonnet-20250219", "input", inp(M), 3_000_000_000),
    ("claude-3-7-sonnet-20250219", "output", out(M), 15_000_000_000),
    ("claude-3-7-sonnet-20250219", "cache write", w5m(M), 3_750_000_000),
    ("claude-3-7-sonnet-20250219", "cache read", read(M), 300_000_000),
    ("claude-3-opus-20240229", "input", inp(M), 15_000_000_000),
    ("claude-3-opus-20240229", "output", out(M), 75_000_000_000),
    # Not in the seed: the API's documented Opus 3 cache prices.
    ("claude-3-opus-20240229", "cache write", w5m(M), 18_750_000_000),
    ("claude-3-opus-20240229", "cache read", read(M), 1_500_000_000),
]


@pytest.mark.parametrize(
    ("model", "cell", "usage", "expected_nanos"),
    SEED_CELLS,
    ids=[f"{model}-{cell}" for model, cell, _, _ in SEED_CELLS],
)
def test_seed_table_cells(
    table: PriceTable, model: str, cell: str, usage: Usage, expected_nanos: int
) -> None:
    assert cost_nanos(usage, price_of(table, model), table.web_search_nanos) == expected_nanos


# Nanos per token ($/MTok x 1000): input, output, 5m write, 1h write, read.
STANDARD_RATES: list[tuple[str, Rates]] = [
    ("claude-opus-4-8", Rates(5_000, 25_000, 6_250, 10_000, 500)),
    ("claude-opus-4-7", Rates(5_000, 25_000, 6_250, 10_000, 500)),
    ("claude-opus-4-6", Rates(5_000, 25_000, 6_250, 10_000, 500)),
    ("claude-opus-4-5", Rates(5_000, 25_000, 6_250, 10_000, 500)),
    ("claude-sonnet-4-6", Rates(3_000, 15_000, 3_750, 6_000, 300)),
    ("claude-haiku-4-5", Rates(1_000, 5_000, 1_250, 2_000, 100)),
    ("claude-sonnet-4-5", Rates(3_000, 15_000, 3_750, 6_000, 300)),
    ("claude-opus-4-1", Rates(15_000, 75_000, 18_750, 30_000, 1_500)),
    ("claude-3-5-haiku-20241022", Rates(800, 4_000, 1_000, 1_600, 80)),
    ("claude-3-haiku-20240307", Rates(250, 1_250, 300, 500, 30)),
    ("claude-3-opus-20240229", Rates(15_000, 75_000, 18_750, 30_000, 1_500)),
]


@pytest.mark.parametrize(("model", "expected"), STANDARD_RATES, ids=[m for m, _ in STANDARD_RATES])
def test_standard_rates(table: PriceTable, model: str, expected: Rates) -> None:
    assert price_of(table, model).standard == expected


def test_long_context_rates(table: PriceTable) -> None:
    # $6 / $22.50 / $7.50 / $12 (2x long input) / $0.60
    for model in ("claude-sonnet-4-5", "claude-sonnet-4-0"):
        assert price_of(table, model).long_context == Rates(6_000, 22_500, 7_500, 12_000, 600)


FAST_RATES: list[tuple[str, Rates]] = [
    ("claude-opus-4-6", Rates(30_000, 150_000, 37_500, 60_000, 3_000)),  # 6x
    ("claude-opus-4-7", Rates(30_000, 150_000, 37_500, 60_000, 3_000)),  # 6x
    ("claude-opus-4-8", Rates(10_000, 50_000, 12_500, 20_000, 1_000)),  # 2x
]


@pytest.mark.parametrize(("model", "expected"), FAST_RATES, ids=[m for m, _ in FAST_RATES])
def test_fast_rate_tables(table: PriceTable, model: str, expected: Rates) -> None:
    assert price_of(table, model).fast == expected


# Sonnet 4.5, prompt split evenly over input / 5m write / 1h write / read, 10,000 output tokens.
# 200,000: 50,000 x (3000 + 3750 + 6000 + 300) + 10,000 x 15000 = 802,500,000.
# 200,001 (one more input token): every token moves to the long rates, output included:
# 50,001 x 6000 + 50,000 x (7500 + 12000 + 600) + 10,000 x 22500 = 1,530,006,000.
LONG_CONTEXT_EDGE = [
    ("claude-sonnet-4-5", 50_000, 802_500_000),
    ("claude-sonnet-4-5", 50_001, 1_530_006_000),
    ("claude-sonnet-4-0", 50_000, 802_500_000),
    ("claude-sonnet-4-0", 50_001, 1_530_006_000),
]


@pytest.mark.parametrize(("model", "input_tokens", "expected_nanos"), LONG_CONTEXT_EDGE)
def test_long_context_edge(
    table: PriceTable, model: str, input_tokens: int, expected_nanos: int
) -> None:
    usage = Usage(
        input_tokens=input_tokens,
        cache_creation_5m_input_tokens=50_000,
        cache_creation_1h_input_tokens=50_000,
        cache_read_input_tokens=50_000,
        output_tokens=10_000,
    )
    assert usage.prompt_tokens == 150_000 + input_tokens
    assert cost_nanos(usage, price_of(table, model), table.web_search_nanos) == expected_nanos


def test_long_context_tier_choice(table: PriceTable) -> None:
    price = price_of(table, "claude-sonnet-4-5")
    assert price.long_context_threshold_tokens == 200_000
    assert price.rates_for(200_000, "standard") is price.standard
    assert price.rates_for(200_001, "standard") is price.long_context


def test_models_without_tier_stay_standard_at_any_size(table: PriceTable) -> None:
    # Opus 4.6 / Sonnet 4.6 / Opus 4.8: 1M context at standard rates (docs since 2026-03-13).
    for model in ("claude-opus-4-6", "claude-sonnet-4-6", "claude-opus-4-8"):
        price = price_of(table, model)
        assert price.long_context is None
        assert price.rates_for(900_000, "standard") is price.standard


def test_haiku_5_5_prompt_tier_at_100k(table: PriceTable) -> None:
    price = price_of(table, "claude-haiku-5-5")
    # 100,000 x 100 + 1,000 x 500 ; 100,001 x 500 + 1,000 x 2500
    assert cost_nanos(Usage(input_tokens=100_000, output_tokens=1_000), price, 0) == 10_500_000
    assert cost_nanos(Usage(input_tokens=100_001, output_tokens=1_000), price, 0) == 52_500_500


def test_cache_breakdown_mix_and_web_search(table: PriceTable) -> None:
    usage = Usage(
        input_tokens=1_234,
        cache_creation_5m_input_tokens=10_000,
        cache_creation_1h_input_tokens=20_000,
        cache_read_input_tokens=300_000,
        output_tokens=5_678,
        web_search_requests=3,
    )
    # Opus 4.8: 1,234 x 5000 = 6,170,000; 10,000 x 6250 = 62,500,000;
    # 20,000 x 10000 = 200,000,000; 300,000 x 500 = 150,000,000; 5,678 x 25000 = 141,950,000;
    # 3 searches x 10,000,000 = 30,000,000. Total 590,620,000.
    assert (
        cost_nanos(usage, price_of(table, "claude-opus-4-8"), table.web_search_nanos) == 590_620_000
    )


def test_web_search_price(table: PriceTable) -> None:
    assert table.web_search_nanos == SEARCH_NANOS
    usage = Usage(web_search_requests=1_000)
    assert cost_nanos(usage, price_of(table, "claude-haiku-4-5"), table.web_search_nanos) == (
        10_000_000_000
    )


def test_cache_creation_without_breakdown_counts_as_5m(table: PriceTable) -> None:
    usage = Usage.from_api({"input_tokens": 10, "cache_creation_input_tokens": 1_000})
    # 10 x 3000 + 1,000 x 3750
    assert cost_nanos(usage, price_of(table, "claude-sonnet-4-5"), 0) == 3_780_000


FAST_CASES = [
    # model, speed, expected: 10,000 input + 1,000 cache read + 2,000 output
    ("claude-opus-4-6", "fast", 603_000_000),  # 10,000 x 30000 + 1,000 x 3000 + 2,000 x 150000
    ("claude-opus-4-7", "fast", 603_000_000),
    ("claude-opus-4-8", "fast", 201_000_000),  # 10,000 x 10000 + 1,000 x 1000 + 2,000 x 50000
    ("claude-opus-4-8", "standard", 100_500_000),  # 10,000 x 5000 + 1,000 x 500 + 2,000 x 25000
    ("claude-opus-5-5", "fast", 160_400_000),  # 10,000 x 8000 + 1,000 x 400 + 2,000 x 40000
    ("claude-sonnet-4-5", "fast", 60_300_000),  # no fast rates: standard, 3000 / 300 / 15000
]


@pytest.mark.parametrize(("model", "speed", "expected_nanos"), FAST_CASES)
def test_fast_rates(table: PriceTable, model: str, speed: str, expected_nanos: int) -> None:
    usage = Usage(
        input_tokens=10_000, cache_read_input_tokens=1_000, output_tokens=2_000, speed=speed
    )
    assert cost_nanos(usage, price_of(table, model), table.web_search_nanos) == expected_nanos


def test_fast_rates_apply_at_any_prompt_size(table: PriceTable) -> None:
    price = price_of(table, "claude-opus-4-6")
    assert price.rates_for(900_000, "fast") is price.fast


WORST_CASES = [
    # model, input estimate, max_tokens, speed, expected
    ("claude-sonnet-4-5", 150_000, 64_000, "standard", 1_410_000_000),  # 3000 / 15000
    ("claude-sonnet-4-5", 250_000, 64_000, "standard", 2_940_000_000),  # 6000 / 22500
    ("claude-opus-4-8", 100_000, 32_000, "fast", 2_600_000_000),  # 10000 / 50000
    ("claude-opus-4-8", 100_000, 32_000, "standard", 1_300_000_000),  # 5000 / 25000
]


@pytest.mark.parametrize(("model", "input_tokens", "max_tokens", "speed", "expected"), WORST_CASES)
def test_worst_case(
    table: PriceTable, model: str, input_tokens: int, max_tokens: int, speed: str, expected: int
) -> None:
    assert worst_case_nanos(price_of(table, model), input_tokens, max_tokens, speed) == expected


ALIASES = [
    ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("claude-opus-4-1-20250805", "claude-opus-4-1"),
    ("claude-sonnet-4-20250514", "claude-sonnet-4-0"),
    ("claude-opus-4-20250514", "claude-opus-4-0"),
    ("claude-3-7-sonnet-latest", "claude-3-7-sonnet-20250219"),
    ("claude-3-opus-latest", "claude-3-opus-20240229"),
    ("claude-opus-4-5-20251101", "claude-opus-4-5"),
    ("claude-3-5-haiku-latest", "claude-3-5-haiku-20241022"),
]


@pytest.mark.parametrize(("alias", "canonical"), ALIASES)
def test_aliases_resolve_to_the_same_price(table: PriceTable, alias: str, canonical: str) -> None:
    price = price_of(table, alias)
    assert price is price_of(table, canonical)
    assert price.model == canonical
    assert alias not in table.models
    assert canonical in table.models


def test_claude_code_default_resolves(table: PriceTable) -> None:
    price = price_of(table, "claude-opus-4-8")
    assert price.model == "claude-opus-4-8"
    assert price.standard.input_nanos == 5_000
    assert price.standard.output_nanos == 25_000


def test_current_models_are_priced(table: PriceTable) -> None:
    for model in (
        "claude-opus-4-5",
        "claude-opus-4-6",
        "claude-opus-4-7",
        "claude-opus-4-8",
        "claude-sonnet-4-6",
        "claude-3-5-haiku-20241022",
        "claude-3-haiku-20240307",
    ):
        assert table.lookup(model) is not None, model


def test_unknown_model_refused(table: PriceTable) -> None:
    assert table.lookup("claude-unknown-9") is None
    assert table.lookup("CLAUDE-OPUS-4-8") is None  # ids are exact


def test_unknown_model_priced_as_target() -> None:
    data = real_mapping()
    data["pricing"]["unknown_model"] = "price_as:claude-sonnet-4-5-20250929"  # an alias is fine
    table = PriceTable.from_mapping(data, "pricing.toml")
    price = table.lookup("claude-unknown-9")
    assert price is not None
    assert price.model == "claude-sonnet-4-5"
    assert table.unknown_model_price_as == "claude-sonnet-4-5"
    assert price_of(table, "claude-haiku-4-5").model == "claude-haiku-4-5"


def test_real_table_has_positive_integer_rates(table: PriceTable) -> None:
    assert len(table.models) == len(set(table.models)) >= 20
    for model in table.models:
        price = price_of(table, model)
        assert price.model == model
        tiers = [price.standard, price.long_context, price.fast]
        for rates in (tier for tier in tiers if tier is not None):
            for value in (
                rates.input_nanos,
                rates.output_nanos,
                rates.cache_write_5m_nanos,
                rates.cache_write_1h_nanos,
                rates.cache_read_nanos,
            ):
                assert type(value) is int and value > 0, model
        if price.long_context is not None:
            assert price.long_context_threshold_tokens is not None
            assert price.long_context_threshold_tokens > 0


# --- the loader's refusals ------------------------------------------------------------------------


def minimal() -> dict[str, Any]:
    rates = {
        "input_usd_mtok": 3,
        "output_usd_mtok": 15,
        "cache_write_5m_usd_mtok": 3.75,
        "cache_write_1h_usd_mtok": 6,
        "cache_read_usd_mtok": 0.30,
    }
    return {
        "pricing": {"unknown_model": "refuse", "web_search_usd_per_1k": 10},
        "models": {
            "m": {
                "aliases": ["m-1"],
                **rates,
                "long_context": {"threshold_tokens": 200_000, **rates},
            },
            "n": {"aliases": ["n-1"], **rates, "fast": dict(rates)},
        },
    }


def real_mapping() -> dict[str, Any]:
    return tomllib.loads(PRICING_TOML.read_text())


def test_minimal_mapping_loads() -> None:
    table = PriceTable.from_mapping(minimal(), "t.toml")
    assert table.models == ("m", "n")
    assert table.lookup("m-1") is table.lookup("m")
    assert price_of(table, "n").fast == Rates(3000, 15000, 3750, 6000, 300)


Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for name in parents:
            node = node[name]
        node[last] = value

    return edit


def _delete(path: str) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for name in parents:
            node = node[name]
        del node[last]

    return edit


BAD_CONFIGS = [
    (
        "finer than a nano per token",
        _set("models.m.input_usd_mtok", 0.0001),
        "models.m.input_usd_mtok",
    ),
    ("missing rate", _delete("models.m.output_usd_mtok"), "models.m.output_usd_mtok"),
    ("unknown key", _set("models.m.colour", "red"), "models.m.colour"),
    ("negative rate", _set("models.n.cache_read_usd_mtok", -0.3), "models.n.cache_read_usd_mtok"),
    ("rate as a string", _set("models.n.input_usd_mtok", "3"), "models.n.input_usd_mtok"),
    ("rate as a bool", _set("models.n.input_usd_mtok", True), "models.n.input_usd_mtok"),
    ("duplicate alias", _set("models.n.aliases", ["m-1"]), "models.n.aliases"),
    ("alias is another model's id", _set("models.n.aliases", ["m"]), "models.n.aliases"),
    (
        "bad price_as target",
        _set("pricing.unknown_model", "price_as:nope"),
        "pricing.unknown_model",
    ),
    ("bad unknown_model", _set("pricing.unknown_model", "maybe"), "pricing.unknown_model"),
    ("missing unknown_model", _delete("pricing.unknown_model"), "pricing.unknown_model"),
    (
        "search finer than a nano",
        _set("pricing.web_search_usd_per_1k", 1e-7),
        "pricing.web_search_usd_per_1k",
    ),
    ("unknown pricing key", _set("pricing.currency", "EUR"), "pricing.currency"),
    ("unknown top-level key", _set("extra", {}), "extra"),
    (
        "long context without threshold",
        _delete("models.m.long_context.threshold_tokens"),
        "models.m.long_context.threshold_tokens",
    ),
    (
        "long context rate missing",
        _delete("models.m.long_context.cache_read_usd_mtok"),
        "models.m.long_context.cache_read_usd_mtok",
    ),
    (
        "fast rate too fine",
        _set("models.n.fast.output_usd_mtok", 15.0001),
        "models.n.fast.output_usd_mtok",
    ),
    (
        "fast unknown key",
        _set("models.n.fast.threshold_tokens", 1),
        "models.n.fast.threshold_tokens",
    ),
    ("aliases not a list", _set("models.m.aliases", "m-1"), "models.m.aliases"),
    ("model not a table", _set("models.m", 3), "models.m"),
    ("no models", _set("models", {}), "models"),
]


@pytest.mark.parametrize(
    ("case", "edit", "key"), BAD_CONFIGS, ids=[case for case, _, _ in BAD_CONFIGS]
)
def test_config_errors_name_the_key(case: str, edit: Edit, key: str) -> None:
    data = copy.deepcopy(minimal())
    edit(data)
    with pytest.raises(ConfigError) as caught:
        PriceTable.from_mapping(data, "pricing.toml")
    assert caught.value.key == key
    assert caught.value.source == "pricing.toml"
    assert key in str(caught.value)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        PriceTable.load(tmp_path / "nope.toml")
    assert caught.value.key == "(file)"


def test_load_bad_syntax(tmp_path: Path) -> None:
    path = tmp_path / "pricing.toml"
    path.write_text("[pricing\n")
    with pytest.raises(ConfigError) as caught:
        PriceTable.load(path)
    assert caught.value.key == "(syntax)"
    assert caught.value.source == str(path)


def test_model_price_needs_threshold_with_long_context() -> None:
    rates = Rates(1, 1, 1, 1, 1)
    with pytest.raises(ValueError):
        ModelPrice(model="x", standard=rates, long_context=rates)
