"""Number formatting and markdown tables for the report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .workloads import workload_from_spec


def us(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100_000:
        return f"{value / 1000:,.0f} ms"
    if value >= 1000:
        return f"{value / 1000:,.1f} ms"
    return f"{value:.1f} us" if value < 100 else f"{value:.0f} us"


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def ratio(value: float | None, ours: float | None) -> str:
    if value is None or ours is None or ours == 0:
        return "-"
    r = value / ours
    return f"{r:,.0f}x" if r >= 100 else f"{r:,.1f}x"


def percent(value: float, target: float) -> str:
    """A percentage, with two decimals when whole percents would hide which side of the
    target it falls on."""
    return f"{value:.2%}" if abs(value - target) < 0.01 else f"{value:.0%}"


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def stat(result: Mapping[str, Any], hook: str, name: str) -> float | None:
    value = result["hooks"][hook].get(name)
    return float(value) if value is not None else None


def p50_p99(result: Mapping[str, Any], hook: str) -> str:
    return f"{us(stat(result, hook, 'p50_us'))} / {us(stat(result, hook, 'p99_us'))}"


def tails(stats: Mapping[str, Any]) -> str:
    """p50 / p99 / p99.9 / max of one hook's summary."""
    return " / ".join(us(stats.get(k)) for k in ("p50_us", "p99_us", "p999_us", "max_us"))


def dropped_total(status: Mapping[str, Any]) -> int:
    dropped = status.get("dropped") or {}
    return int(sum(dropped.values())) if isinstance(dropped, Mapping) else int(dropped)


def dropped_text(status: Mapping[str, Any]) -> str:
    dropped = status.get("dropped") or {}
    total = dropped_total(status)
    if not total:
        return "0"
    reasons = ", ".join(f"{k}: {v:,}" for k, v in dropped.items()) if dropped else ""
    return f"{total:,} ({reasons})" if reasons else f"{total:,}"


def count(status: Mapping[str, Any], key: str) -> str:
    value = status.get(key)
    return "n/a" if value is None else f"{value:,}"


def delivered(result: Mapping[str, Any]) -> str:
    rb = result.get("readback")
    if rb is None:
        return "-"
    expected = workload_from_spec(result["workload"]).expected()
    points = rb["step_points"] + rb["summary_points"]
    return (
        f"{rb['runs']}/{expected.runs} runs, {points}/{expected.points} points, "
        f"{rb['nested']}/{expected.nested} nested, {rb['artifacts']}/{expected.artifacts} "
        "artifacts"
    )
