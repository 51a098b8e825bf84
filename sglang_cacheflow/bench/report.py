"""Readable tables of plans: what each policy does per request and what it predicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.table import Table

from sglang_cacheflow.planner import Bound, Plan, Request


def print_plans(
    plans: Mapping[str, Plan],
    requests: Sequence[Request],
    bound: Bound,
    num_layers: int,
    title: str = "",
    console: Console | None = None,
) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)
    table = Table(title=title or None, show_lines=False)
    table.add_column("policy")
    table.add_column("request")
    table.add_column("evicted", justify="right")
    table.add_column("restore shape (recompute+load)")
    table.add_column("recomputed", justify="right")
    table.add_column("loaded (tier: tokens)")
    table.add_column("TTFT s", justify="right")
    for name, pl in plans.items():
        for i, r in enumerate(requests):
            rp = pl.requests[r.id]
            by = rp.tokens_by_action(num_layers)
            loaded = ", ".join(
                f"{k.split(':', 1)[1]}: {v:.0f}" for k, v in by.items() if k.startswith("load:")
            )
            table.add_row(
                name if i == 0 else "",
                r.id,
                str(r.evicted_tokens),
                rp.shape,
                f"{by.get('recompute', 0):.0f}",
                loaded or "-",
                f"{rp.predicted_ttft_s:.4f}",
                end_section=i == len(requests) - 1,
            )
    console.print(table)
    summary = Table(title="summary" + (f": {title}" if title else ""))
    summary.add_column("policy")
    summary.add_column("mean TTFT s", justify="right")
    summary.add_column("makespan s", justify="right")
    summary.add_column("vs bound (mean)", justify="right")
    summary.add_column("planner ms", justify="right")
    for name, pl in plans.items():
        ratio = pl.mean_ttft_s / bound.mean_ttft_s if bound.mean_ttft_s else float("nan")
        summary.add_row(
            name,
            f"{pl.mean_ttft_s:.4f}",
            f"{pl.makespan_s:.4f}",
            f"{ratio:.2f}x",
            f"{pl.planner_time_ms:.2f}",
        )
    summary.add_row(
        "fluid bound", f"{bound.mean_ttft_s:.4f}", f"{bound.makespan_s:.4f}", "1.00x", "-"
    )
    console.print(summary)
