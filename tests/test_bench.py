"""`usage-proxy bench`: the command end to end in its quick mode, and its pure parts.

Nothing here asserts on timing: only that every section is there, every request was counted and
answered, and the numbers are of the right kind."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import pytest

from proxy.__main__ import main
from proxy.bench import Pinning, Target, _redacted, percentile, render_table, turns

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
TARGETS = {
    "throughput_ratio",
    "throughput_ratio_per_cpu_s",
    "added_latency_ms_p50",
    "added_latency_ms_p99",
    "stream_added_ttfb_ms_p99",
    "kb_per_stream",
    "rss_growth_kb_per_1000_requests",
}


def _bench(*args: str) -> list[str]:
    return ["bench", "--pricing", str(CONFIG_DIR / "pricing.toml"), *args]


def test_quick_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = main(
        _bench(
            "--quick",
            "--requests", "200",
            "--streams", "50",
            "--latency-requests", "20",
            "--open-streams", "40",
            "--hold-s", "2",
            "--leak-requests", "100",
            "--warmup-requests", "10",
            "--json", str(out),
        )
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "targets" in printed and "QUICK RUN" in printed
    report = json.loads(out.read_text())

    env = report["environment"]
    assert env["cores"] >= 1
    assert env["python_version"] == platform.python_version()
    assert env["store"] == "sqlite" and env["store_leases"] is False
    assert env["pinning"]["enabled"] == (env["cores"] >= 2)
    assert isinstance(env["uvloop_proxy"], bool)
    assert report["options"]["quick"] is True

    ns = report["non_streaming"]
    assert ns["concurrency"] == 32 and ns["rounds"] == 2
    assert len(ns["ratio_proxy_to_bare_requests_per_cpu_s_rounds"]) == 2
    assert all(r > 0 for r in ns["ratio_proxy_to_bare_requests_per_cpu_s_rounds"])
    for name in ("direct", "bare", "proxy"):
        row = ns[name]
        assert (row["requests"], row["ok"], row["failed"]) == (200, 200, 0), row
        assert row["statuses"] == {"200": 200} and row["errors"] == {}
        assert row["requests_per_s"] > 0
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p99"]
        assert row["cpu_ms_per_request"] >= 0 and row["rss_kb"] > 0
    assert ns["proxy"]["cpu_ms_per_request"] > 0
    assert ns["ratio_proxy_to_bare_requests_per_s"] > 0
    assert ns["ratio_proxy_to_bare_cpu_ms_per_request"] > 0
    assert ns["ratio_proxy_to_bare_requests_per_cpu_s"] > 0
    assert ns["proxy"]["cpu_pct"] > 0

    c1 = report["latency_c1"]
    assert c1["rounds"] == 2
    for name in ("direct", "bare", "proxy"):
        assert (c1[name]["requests"], c1[name]["ok"]) == (20, 20)
        assert 0 < c1[name]["latency_ms_p50"] <= c1[name]["latency_ms_p99"]
    for key in ("bare_added_ms_p50", "bare_added_ms_p99", "proxy_added_ms_p50"):
        assert isinstance(c1[key], float)

    st = report["streaming"]
    assert (st["deltas"], st["delta_interval_ms"], st["concurrency"]) == (20, 5, 64)
    assert st["rounds"] == 2
    for name in ("direct", "bare", "proxy"):
        row = st[name]
        assert (row["requests"], row["ok"]) == (50, 50), row
        assert 0 < row["ttfb_ms_p50"] <= row["ttlb_ms_p50"]
        assert row["reads_per_stream_p50"] >= 1
        assert row["cpu_pct"] >= 0
    assert st["proxy"]["cpu_pct"] > 0
    assert isinstance(st["proxy_added_ttfb_ms_p99"], float)
    st["bare_added_ttfb_ms_p99"] = 5.0  # a bare relay past the target says so under the table
    assert "note: the bare pass-through itself added 5.00 ms" in render_table(report)
    st["bare_added_ttfb_ms_p99"] = 1.0
    assert "itself added" not in render_table(report)

    memory = report["memory"]
    for name in ("bare", "proxy"):
        row = memory[name]
        assert (row["requests"], row["ok"]) == (40, 40), row
        assert 0 < row["streams_open"] <= 40
        assert row["rss_kb_idle"] > 0 and row["rss_kb_streams_open"] > 0
        assert isinstance(row["all_open"], bool)
    leak = memory["leak"]
    assert (leak["requests"], leak["ok"], leak["failed"]) == (200, 200, 0)
    assert min(leak["rss_kb_start"], leak["rss_kb_after_n"], leak["rss_kb_after_2n"]) > 0

    accounting = report["accounting"]
    assert accounting["requests_sent"] > 0
    assert (
        accounting["requests_recorded"] == accounting["requests_ok"] == accounting["requests_sent"]
    )
    assert accounting["verify_ok"] is True
    assert (accounting["pending_reservations"], accounting["mismatches"]) == (0, 0)

    assert set(report["targets"]) == TARGETS
    for target in report["targets"].values():
        assert target["rule"] in (">=", "<")
        assert isinstance(target["value"], float) and isinstance(target["pass"], bool)
    assert report["targets"]["throughput_ratio"]["limit"] == 0.6
    assert report["all_ok"] is True


@pytest.mark.skipif(
    shutil.which("valgrind") is None, reason="valgrind is not installed (apt-get install valgrind)"
)
def test_instructions_quick_run_counts_a_request_and_a_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "instructions.json"
    code = main(_bench("--instructions", "--quick", "--json", str(out)))
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "M instructions a request" in printed and "M instructions a stream" in printed
    report = json.loads(out.read_text())
    ns, st = report["non_streaming"], report["streaming"]
    assert (ns["requests"], ns["ok"], st["requests"], st["ok"]) == (20, 20, 5, 5)
    assert (ns["concurrency"], st["concurrency"]) == (32, 1)
    assert report["options"]["instructions"] is True and report["all_ok"] is True
    assert report["environment"]["valgrind_version"].startswith("valgrind-")
    # each dump counted its own run: a stream (26 chunks relayed and metered, then settled)
    # runs more of the proxy than a whole non-streaming request, and both run millions
    assert 0.5 < ns["instructions_m_per_request"] < st["instructions_m_per_request"] < 50
    assert ns["instructions"] == pytest.approx(ns["instructions_m_per_request"] * 20e6, rel=0.01)


def test_a_proxy_that_cannot_start_is_one_line_and_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_bench("--quick", "--store", "postgresql://bench@127.0.0.1:1/none"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("usage-proxy: bench: the proxy "), err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--store", "mysql://x"], "--store: must start with sqlite:/// or postgresql://"),
        (["--pricing", "/nonexistent/pricing.toml"], "--pricing: /nonexistent/pricing.toml"),
        (["--hold-s", "0"], "--hold-s: must be more than 0"),
        (["--quick", "--rounds", "60"], "--rounds: at most --requests, --latency-requests and"),
        (["--instructions", "--profile", "p.txt"], "--instructions counts, --profile samples"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", *args] if "--pricing" in args else _bench(*args)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"usage-proxy: bench: {message}"), err


def test_help_names_what_it_measures(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--requests", "--store", "--json", "--quick", "--open-streams"):
        assert option in text


@pytest.mark.parametrize(
    ("cpus", "enabled", "expected"),
    [
        ([0], True, Pinning()),
        ([0, 1], False, Pinning()),
        ([0, 1], True, Pinning(target=(0,), mock=(1,), load=(1,))),
        ([2, 5, 7], True, Pinning(target=(2,), mock=(5,), load=(7,))),
        ([0, 1, 2, 3], True, Pinning(target=(0,), mock=(1,), load=(2, 3))),
    ],
)
def test_pinning_gives_the_proxy_a_core_of_its_own(
    cpus: list[int], enabled: bool, expected: Pinning
) -> None:
    assert Pinning.plan(cpus, enabled=enabled) == expected


def test_targets_take_turns_in_rotating_order_with_the_requests_split_evenly() -> None:
    direct, bare, proxy = (Target(name, "", 0, ()) for name in ("direct", "bare", "proxy"))
    runs = list(turns((direct, bare, proxy), 10, 3))
    assert [(label, target.name, n) for label, target, n in runs] == [
        ("round 1/3", "direct", 4),
        ("round 1/3", "bare", 4),
        ("round 1/3", "proxy", 4),
        ("round 2/3", "bare", 3),
        ("round 2/3", "proxy", 3),
        ("round 2/3", "direct", 3),
        ("round 3/3", "proxy", 3),
        ("round 3/3", "direct", 3),
        ("round 3/3", "bare", 3),
    ]


@pytest.mark.parametrize(
    ("values", "pct", "expected"),
    [
        ([], 50, 0.0),
        ([3.0], 99, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        (list(range(1, 101)), 99, 99),
        (list(range(1, 101)), 100, 100),
        ([5.0, 1.0, 3.0], 50, 3.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], pct: float, expected: float) -> None:
    assert percentile(values, pct) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///proxy.db", "sqlite:///proxy.db"),
        ("postgresql://bench:secret@db:5432/x", "postgresql://bench@db:5432/x"),
        ("postgresql://db/x", "postgresql://db/x"),
    ],
)
def test_store_urls_are_shown_without_passwords(url: str, expected: str) -> None:
    assert _redacted(url) == expected
