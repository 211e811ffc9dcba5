"""How a memory plan is shown: the table ``kvpilot plan`` prints and ``build_app`` logs.

Kept apart from ``cluster/cli/kvpilot.py`` so that the Serve glue (``deployments/app.py``)
renders the same table without importing the command line.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from cluster.planning.hardware import GIB
from cluster.planning.planner import Plan


def gib(n: int) -> str:
    """``n`` bytes as ``12.34 GiB``."""
    return f"{n / GIB:.2f} GiB"


def render_plan(plan: Plan, console: Console) -> None:
    """Print ``plan``: the per-GPU table, its assumptions and warnings, and what to try when it does not fit."""
    verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    title = (
        f"{plan.name} ({plan.source}) on {plan.gpu}, {plan.quantization}, TP={plan.tensor_parallel_size}"
        + (f" PP={plan.pipeline_parallel_size}" if plan.pipeline_parallel_size > 1 else "")
        + f": {verdict}"
    )
    t = Table(title=title, show_header=False, title_justify="left")
    g = plan.per_gpu
    unit = "per GPU" if plan.gpu != "cpu" else "per CPU worker"
    t.add_row(f"budget ({unit})", gib(g.budget_bytes))
    t.add_row("weights", gib(g.weights_bytes))
    t.add_row("activation peak (est.)", gib(g.activation_bytes))
    t.add_row("runtime overhead (est.)", gib(g.overhead_bytes))
    if g.lora_bytes:
        t.add_row("LoRA slots", gib(g.lora_bytes))
    t.add_row("KV cache", gib(g.kv_cache_bytes))
    t.add_row("KV bytes per token", f"{plan.kv_bytes_per_token:,} ({plan.kv_cache_dtype})")
    t.add_row("KV blocks", f"{plan.num_blocks:,} × {plan.block_size} tokens")
    t.add_row("KV cache tokens", f"{plan.kv_cache_tokens:,}")
    t.add_row(f"max concurrency at {plan.max_model_len:,} tokens", f"{plan.max_concurrency:.2f}x")
    console.print(t)
    for a in plan.assumptions:
        console.print(f"  assumes: {a}", highlight=False)
    for n in plan.notes:
        console.print(f"  [yellow]warning:[/yellow] {n}", highlight=False)
    if not plan.fits:
        console.print(
            f"  [red]short by {plan.shortfall_bytes / GIB:.2f} GiB per GPU[/red] to hold weights and one "
            f"{plan.max_model_len:,}-token request",
            highlight=False,
        )
        for s in plan.suggestions:
            console.print(f"  try: {s}", highlight=False)
