"""Tables and summary lines shared by the commands: rendering only, from reports' JSON forms."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table

from wsconvert.cli._common import Output, escape
from wsconvert.cli._errors import cli_text
from wsconvert.errors import ParityFailure

if TYPE_CHECKING:
    from wsconvert.parity import ParityReport

__all__ = ["drift_lines", "fmt", "layer_table", "norm_table", "op_line", "parity_lines",
           "parity_table", "stage_lines", "translated", "verdict"]


def fmt(value: float | None, spec: str = ".3g") -> str:
    """A metric, or ``n/a`` where none exists (shape or output-count mismatch)."""
    return "n/a" if value is None or value != value else format(value, spec)


def op_line(hist: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(hist.items(), key=lambda kv: -kv[1]))


def layer_table(layers: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("layer", "kind", "shape", "fan-in", "status", "detail"):
        table.add_column(col, justify="right" if col == "fan-in" else "left")
    for r in layers:
        detail = (f"{r['convention']} eps={r['eps']:g} init={r['init']}"
                  if r["status"] == "converted" else cli_text(r["reason"]))
        style = "green" if r["status"] == "converted" else "yellow"
        table.add_row(escape(r["name"] or "<root>"), r["kind"],
                      "x".join(str(s) for s in r["shape"]), str(r["fan_in"]),
                      f"[{style}]{r['status']}[/]", escape(detail))
    return table


def norm_table(norms: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("norm", "kind", "channels", "groups", "status", "follows", "detail"):
        table.add_column(col, justify="right" if col in ("channels", "groups") else "left")
    for r in norms:
        style = "green" if r["status"] == "swapped" else "yellow"
        table.add_row(escape(r["name"]), r["kind"], str(r["channels"]),
                      "" if r["groups"] is None else str(r["groups"]),
                      f"[{style}]{r['status']}[/]", escape(r["follows"]), escape(r["reason"]))
    return table


def _pct(x: float) -> str:
    if x != x or x == float("inf"):
        return str(x)
    return f"{100 * x:.3g}%" if x < 10 else f"{x:.3g}x"


def _drift_line(label: str, d: dict[str, Any], threshold: float) -> str:
    line = (f"{label}: output changed by {_pct(d['output_relative'])} (relative L2; max abs "
            f"{d['output_max_abs']:.3g}) on {d['samples']} sample(s)")
    first = next((r for r in d["layers"] if r["relative"] > threshold), None)
    worst, jump = d["worst_layer"], d["divergence_layer"]
    if first is not None:
        line += f"; first layer above {_pct(threshold)}: {escape(first['name'])} " \
                f"({first['converted_kind']}, {_pct(first['relative'])})"
    if jump is not None and jump["jump"] > 0:
        line += f"; largest jump at {escape(jump['name'])} (+{_pct(jump['jump'])})"
    if worst is not None:
        line += f"; largest at {escape(worst['name'])} ({_pct(worst['relative'])})"
    return line


def drift_lines(check: dict[str, Any]) -> list[str]:
    """Human summary of a drift check's JSON form."""
    threshold = check["threshold"]
    before = check["before"]
    lines = [f"[bold]drift[/] on {escape(before['source'])}",
             _drift_line("  after conversion", before, threshold)]
    cal = check["calibration"]
    if cal is not None:
        lines.append(f"  calibrated {len(cal['layers'])} BatchNorm(s) on {cal['batches']} "
                     f"batch(es), {cal['samples']} sample(s)")
        lines.append(_drift_line("  after calibration", check["after"], threshold))
    colour = "yellow" if check["large"] else "green"
    verdict = "large" if check["large"] else "small"
    lines.append(f"  [{colour}]drift is {verdict}[/] (threshold {_pct(threshold)})")
    if check["suggestion"]:
        lines.append(f"  [yellow]suggestion:[/] {escape(check['suggestion'])}")
    return lines


def parity_table(report: ParityReport) -> Table:
    from wsconvert.parity import fmt_up

    top = any(c.classifier for c in report.comparisons)
    table = Table(title=f"Parity (|got - ref| <= {report.atol:g} + {report.rtol:g} * |ref|)",
                  title_justify="left")
    cols = ["stage", "inputs", "output", "max abs", "max rel", "out of tol", "cosine", "min atol",
            "min rtol", *(["top-1"] if top else []), ""]
    for col in cols:
        table.add_column(col, justify="right" if col.startswith(
            ("max", "out", "cos", "min", "top")) else "left")
    for c in report.comparisons:
        mark = "[green]pass[/]" if c.passed else f"[red]FAIL[/] {escape(c.reason)}"
        table.add_row(c.stage, escape(c.input_set), escape(c.output), fmt(c.max_abs),
                      fmt(c.max_rel), fmt(100 * c.frac_out) + "%", fmt(c.cosine, ".7f"),
                      fmt_up(c.min_atol), fmt_up(c.min_rtol),
                      *([fmt(c.top1, ".3f")] if top else []), mark)
    return table


def stage_lines(report: ParityReport) -> list[str]:
    """Per stage: ``cases within tolerance, max abs, max rel``, the tolerances that would pass,
    and the lowest top-1 agreement where there are classifier outputs."""
    from wsconvert.parity import fmt_up

    lines = []
    for s in report.stage_summary().values():
        line = (f"{s['cases'] - s['failed']}/{s['cases']} within tolerance, max abs "
                f"{fmt(s['max_abs'])}, max rel {fmt(s['max_rel'])}; would pass at atol "
                f"{fmt_up(s['min_atol'])} or rtol {fmt_up(s['min_rtol'])}")
        if s["min_top1"] is not None:
            line += f"; top-1 agreement >= {s['min_top1']:.4g}"
        lines.append(line)
    return lines


def parity_lines(out: Output, report: ParityReport) -> None:
    """The parity table, one summary line per stage, and where it diverges (when located)."""
    out.result(parity_table(report))
    for stage, line in zip(report.stages, stage_lines(report), strict=True):
        out.result(f"  {stage}: {line}")
    if report.localizations:
        out.result("[bold]where it diverges[/]")
    for loc in report.localizations:
        text = escape(cli_text(loc.describe()))
        if loc.divergence is not None:
            where = escape(loc.divergence.where)
            text = text.replace(where, f"[bold red]{where}[/]", 1)
        out.result("  " + text.replace("\n", "\n  "))


def verdict(out: Output, report: ParityReport) -> None:
    """Say the gate holds, or raise the failure (exit 1)."""
    if report.passed():
        out.result("[green]✓ parity holds[/]")
        return
    n = len(report.failures)
    stages = ", ".join(sorted({c.stage for c in report.failures}))
    saved = report.meta.get("failing_inputs_saved_to")
    where = f"; failing inputs saved to {saved}" if saved else ""
    located = [f"{loc.stage} stage first diverges at {loc.divergence.where}"
               for loc in report.localizations if loc.divergence is not None]
    if located:
        where = "; " + "; ".join(located) + where
    nonfinite = sum("non-finite" in c.reason for c in report.failures)
    why = (f"{nonfinite} with non-finite values (NaN or inf)" if nonfinite == n else
           f"out of tolerance, {nonfinite} of them non-finite" if nonfinite else
           "out of tolerance")
    raise ParityFailure(f"parity fails: {n} output(s) {why} ({stages} stage){where}")


def translated(payload: dict[str, Any]) -> dict[str, Any]:
    """A result's JSON form with the drift-skip and layer-skip reasons in command-line
    wording."""
    drift = payload.get("drift")
    if isinstance(drift, dict) and "skipped" in drift:
        payload = {**payload, "drift": {"skipped": cli_text(drift["skipped"])}}
    layers = payload.get("layers")
    if isinstance(layers, list):
        payload = {**payload, "layers": [
            {**r, "reason": cli_text(r["reason"])} if isinstance(r, dict) and r.get("reason")
            else r for r in layers]}
    return payload
