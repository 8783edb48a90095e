"""The search cost in the command line's tables: columns per NFE and a line for the whole study (the
``StudyCost.as_dict()`` form, as ``--json`` prints it)."""

from __future__ import annotations

from rich.table import Table

from steptune.cli.console import out
from steptune.search_cost import seconds_text, study_cost

COLUMNS = ("evals", "model calls", "wall", "device s")


def load_cost(url: str | None, study: str) -> dict:
    """The cost of ``study`` in the database at ``url``, read after a run."""
    from steptune.storage import connect

    with connect(url, must_exist=True) as store:
        return study_cost(store.trials(study)).as_dict()


def add_columns(table: Table) -> None:
    for col in COLUMNS:
        table.add_column(col, justify="right")


def cells(cost: dict, nfe: int) -> list[str]:
    """The cost columns of ``nfe``'s row."""
    c = next((c for c in cost["per_nfe"] if c["nfe"] == nfe), None)
    if c is None:
        return ["—"] * len(COLUMNS)
    return [f"{c['evaluations']:,}", f"{c['model_calls']:,}", seconds_text(c["wall_seconds"]),
            seconds_text(c["device_seconds"])]


def nfe_cell(nfe: int, interpolated_from: list[int] | None) -> str:
    """A table's NFE cell: ``7 (from 6, 8)`` for an NFE interpolated from searched ones (see
    ``print_interpolated_note``)."""
    return f"{nfe} (from {', '.join(map(str, interpolated_from))})" if interpolated_from else str(nfe)


def print_interpolated_note(rows: list[tuple[int, list[int] | None]], with_cost: bool = True) -> None:
    """The line under a table with interpolated NFEs ((nfe, interpolated_from) pairs); nothing without any."""
    mine = [(n, f) for n, f in rows if f]
    if not mine:
        return
    what = "; ".join(f"NFE {n} from NFE {', '.join(map(str, f))}" for n, f in mine)
    out.print(f"not searched, interpolated ([refine] interpolate): {what}; each scored on the held-out bank and "
              "refined" + (", its cost columns what that took" if with_cost else ""), highlight=False, markup=False)


def _part(c: dict) -> str:
    if not c["evaluations"]:
        return "no evaluations"
    extra = ", ".join(f"{n} {what}" for n, what in ((c["repeats"], "repeated"), (c["reused"], "reused")) if n)
    return (f"{c['evaluations']:,} evaluations{f' ({extra})' if extra else ''}, {c['model_calls']:,} model calls, "
            f"wall {seconds_text(c['wall_seconds'])}, {seconds_text(c['device_seconds'])} on {c['device'] or '—'}")


def line(cost: dict) -> str:
    """One line: what the study's own trials cost, and its baselines apart."""
    base = cost["baselines"]
    return f"cost: {_part(cost['total'])}" + (f"; baselines: {_part(base)}" if base["evaluations"] else "")
