"""`robodit compare`: several evaluations side by side, as a benchmark table.

Each column is one results.json (an eval out_dir or the file), or a group `LABEL=PATTERN` of several (a glob,
e.g. one evaluation per training seed): a run's cell is its rate with the Wilson 95% interval, a group's the
mean ± sample std over its runs. With exactly two single runs that evaluated the same episodes (same tasks
and env seeds), the table adds a paired test: episodes one solved and the other did not, and McNemar's exact
two-sided p-value, which is what tells "A beats B" from seed noise at equal episodes. Two chain evaluations get
the difference in average completed length instead, with a 95% bootstrap interval over chains (paired over the
chains both ran, same env seed and subtasks; independent resampling otherwise).
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robodit.evaluation.stats import bootstrap_mean_difference

MEAN = "mean over tasks"


@dataclass
class Column:
    label: str
    runs: list[dict[str, Any]]
    paths: list[str] = field(default_factory=list)


def load_results(path: str | Path) -> dict[str, Any]:
    """results.json from a file or an eval out_dir; a clear error otherwise."""
    p = Path(path).expanduser()
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no results.json (give an eval out_dir or the file itself)")
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{f}: not valid JSON ({exc})") from None
    if not str(data.get("schema", "")).startswith("robodit.eval/"):
        raise ValueError(f"{f}: not a robodit evaluation (schema {data.get('schema')!r})")
    data["_path"] = str(f)
    return data


def parse_columns(specs: list[str]) -> list[Column]:
    """`PATH` (one run, labelled by its parent folder) or `LABEL=PATTERN` (every run the glob matches)."""
    columns = []
    for spec in specs:
        label, sep, pattern = spec.partition("=")
        if not sep or not label or Path(spec).exists():
            label, pattern = "", spec
        matches = sorted(glob.glob(str(Path(pattern).expanduser()))) or [pattern]
        runs = [load_results(m) for m in matches]
        if not label:
            label = Path(runs[0]["_path"]).parent.name if len(runs) == 1 else pattern
        columns.append(Column(label, runs, [r["_path"] for r in runs]))
    _unique_labels(columns)
    kinds = {r["kind"] for c in columns for r in c.runs}
    if len(kinds) > 1:
        raise ValueError(f"cannot compare task suites with chain suites ({sorted(kinds)})")
    return columns


def _unique_labels(columns: list[Column]) -> None:
    """Columns keyed by label must not share one (two `runs/x/eval` dirs are both "eval", and the table showed the
    second run twice): a repeated folder name is lengthened with its parents until the labels differ."""
    for depth in range(2, 6):
        labels = [c.label for c in columns]
        clash = {lab for lab in labels if labels.count(lab) > 1}
        if not clash:
            return
        for c in columns:
            if c.label in clash and len(c.paths) == 1:
                c.label = "/".join(Path(c.paths[0]).parent.parts[-depth:])
    labels = [c.label for c in columns]
    if len(set(labels)) < len(labels):
        raise ValueError(f"columns share a label ({labels}): name them, e.g. A=path/to/eval B=other/eval")


def _rows(run: dict[str, Any], shared: list[str] | None = None) -> dict[str, float | None]:
    """row name -> rate (tasks: per task and the mean; chains: success at each length and avg completed).
    `shared`: the tasks every compared run evaluated; the mean row is then over those only."""
    if run["kind"] == "tasks":
        rows = {t: r["success_rate"] for t, r in run["tasks"].items()}
        if shared is None:
            rows[MEAN] = run["success_rate"]
        else:
            rates = [rows[t] for t in shared if rows.get(t) is not None]
            rows[_mean_label(shared)] = sum(rates) / len(rates) if rates else None
        return rows
    main = run["chains"]["policy" if "policy" in run["chains"] else "expert"]
    rows = {f"chain length {k}": v["success_rate"] for k, v in main["success_at_length"].items()}
    rows["avg completed"] = main["avg_completed"]
    return rows


def _mean_label(shared: list[str]) -> str:
    return f"mean over the {len(shared)} shared task(s)"


def _interval(run: dict[str, Any], row: str):
    """(Wilson 95% interval, episodes) of a single run's cell; None for means (an average of per-task rates has
    no binomial interval, and the pooled one need not contain it)."""
    if run["kind"] == "tasks" and row in run["tasks"]:
        r = run["tasks"][row]
        return r["ci95"], r["episodes"]
    if run["kind"] == "chains" and row.startswith("chain length "):
        main = run["chains"]["policy" if "policy" in run["chains"] else "expert"]
        v = main["success_at_length"][row.removeprefix("chain length ")]
        return v["ci95"], main["chains"]
    return None, None


def _fmt(row: str, v: float) -> str:
    return f"{v:.2f}" if row == "avg completed" else f"{100 * v:.1f}%"


def _mean_std(column: Column, row: str, shared: list[str] | None) -> tuple[float, float, int] | None:
    """(mean, sample std, runs) of a cell over the column's runs that have a value; None when none has."""
    values = [v for v in (_rows(r, shared).get(row) for r in column.runs) if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std, len(values)


def _cell(column: Column, row: str, shared: list[str] | None = None) -> tuple[str, float | None]:
    stats = _mean_std(column, row, shared)
    if stats is None:
        return "—", None
    mean, std, n_runs = stats
    if len(column.runs) == 1:
        ci, n = _interval(column.runs[0], row)
        return _fmt(row, mean) + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}] n={n}" if ci is not None else ""), mean
    return f"{_fmt(row, mean)} ± {_fmt(row, std)} ({n_runs} runs)", mean


def mcnemar(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """Paired outcome counts over the episodes both runs evaluated (same task and env seed), with McNemar's
    exact two-sided p-value; None when the runs share no episodes."""
    if a["kind"] != "tasks" or b["kind"] != "tasks":
        return None
    pairs = []
    for task, ra in a["tasks"].items():
        rb = b["tasks"].get(task)
        if rb is None or "seeds" not in ra or "seeds" not in rb:
            continue
        got = dict(zip(rb["seeds"], rb["success_per_episode"]))
        pairs += [(sa, got[s]) for s, sa in zip(ra["seeds"], ra["success_per_episode"]) if s in got]
    if not pairs:
        return None
    only_a = sum(x and not y for x, y in pairs)
    only_b = sum(y and not x for x, y in pairs)
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n if n else 1.0
    return {"episodes": len(pairs), "only_a": only_a, "only_b": only_b, "p_value": min(1.0, 2 * tail)}


# settings that make two evaluations measure different things; any that differs is listed with the table
SETTINGS = ("suite.name", "suite.max_steps", "suite.chain_length", "episodes_per_task", "seed", "policy_seed",
            "sampler", "num_inference_steps", "n_action_steps", "goal.modality", "goal.instructions",
            "training_seeds", "untrained_tasks")


def compare(columns: list[Column]) -> dict[str, Any]:
    """The comparison as data: rows, cells, what differs between the runs' settings, the paired test."""
    runs = [r for c in columns for r in c.runs]
    task_sets = [list(r["tasks"]) for r in runs if r["kind"] == "tasks"]
    shared = None
    if task_sets and any(set(t) != set(task_sets[0]) for t in task_sets):
        shared = [t for t in task_sets[0] if all(t in other for other in task_sets)]
    rows: list[str] = []
    for r in runs:
        rows += [k for k in _rows(r, shared) if k not in rows]
    for last in (MEAN, _mean_label(shared or [])):  # the mean goes last
        if last in rows:
            rows.remove(last)
            rows.append(last)
    table = {row: {c.label: _cell(c, row, shared) for c in columns} for row in rows}
    settings = {}
    for key in SETTINGS + (("tasks",) if shared is not None else ()):
        seen = {c.label: sorted({json.dumps(_get(r, key), sort_keys=True) for r in c.runs}) for c in columns}
        if len({tuple(v) for v in seen.values()}) > 1:
            settings[key] = seen
    paired = chain_diff = None
    if len(columns) == 2 and all(len(c.runs) == 1 for c in columns):
        paired = mcnemar(columns[0].runs[0], columns[1].runs[0])
        chain_diff = chain_length_difference(columns[0].runs[0], columns[1].runs[0])
    return {"columns": [{"label": c.label, "results": c.paths} for c in columns],
            "rows": {row: {label: v for label, (_, v) in cells.items()} for row, cells in table.items()},
            "cells": {row: {label: s for label, (s, _) in cells.items()} for row, cells in table.items()},
            "shared_tasks": shared, "settings_that_differ": settings, "paired": paired,
            "avg_completed_difference": chain_diff}


def chain_length_difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """b's average completed length minus a's, with a 95% bootstrap interval over chains: paired over the chains
    both evaluated (same env seed and subtasks; a chain that errored in one run is left out of both), else each
    run resampled on its own. None unless both are chain evaluations."""
    if a["kind"] != "chains" or b["kind"] != "chains":
        return None
    main = [r["chains"]["policy" if "policy" in r["chains"] else "expert"] for r in (a, b)]
    done = [m["completed_per_chain"] for m in main]
    keyed = [{(c["seed"], tuple(c["tasks"])): d for c, d in zip(m.get("per_chain") or [], dn)}
             for m, dn in zip(main, done)]
    shared = [k for k in keyed[0] if k in keyed[1]]
    if shared:
        out = bootstrap_mean_difference([keyed[0][k] for k in shared], [keyed[1][k] for k in shared], paired=True)
        out["left_out"] = [len(keyed[0]) - len(shared), len(keyed[1]) - len(shared)]
        return out
    return bootstrap_mean_difference(done[0], done[1], paired=False)


def _get(d: dict, dotted: str):
    if dotted == "tasks":
        return sorted(d.get("tasks") or [])
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def format_markdown(result: dict[str, Any]) -> str:
    labels = [c["label"] for c in result["columns"]]
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for row, cells in result["cells"].items():
        name = f"**{row}**" if row in (MEAN, "avg completed") or row.startswith("mean over") else row
        lines.append(f"| {name} | " + " | ".join(cells[label] for label in labels) + " |")
    lines.append("")
    lines.append("Single runs: rate [Wilson 95%] n=episodes (means of per-task rates have none); groups: mean ± "
                 "sample std over runs.")
    if result.get("shared_tasks") is not None:
        lines.append(f"The runs evaluated different tasks: the mean is over the {len(result['shared_tasks'])} every "
                     "run has, so that it compares like with like.")
    if result["settings_that_differ"]:
        lines.append("")
        lines.append("Settings that differ between the runs (the comparison may not be like for like):")
        for key, seen in result["settings_that_differ"].items():
            lines.append(f"- {key}: " + "; ".join(f"{k} {', '.join(v)}" for k, v in seen.items()))
    diff = result.get("avg_completed_difference")
    if diff:
        a, b = labels
        lo, hi = diff["ci95"]
        how = (f"paired over the {diff['units'][0]} chains both ran" + (
            f"; {sum(diff['left_out'])} run by one only left out" if sum(diff.get("left_out", [0])) else "")
            if diff["paired"] else
               f"{diff['units'][0]} and {diff['units'][1]} chains resampled independently")
        lines.append("")
        lines.append(f"Average completed length, {b} − {a}: **{diff['difference']:+.2f}** (95% bootstrap interval "
                     f"[{lo:+.2f}, {hi:+.2f}], {how}, {diff['resamples']} resamples)"
                     + (" — the interval includes 0" if lo <= 0 <= hi else ""))
    paired = result["paired"]
    if paired:
        a, b = labels
        lines.append("")
        lines.append(f"Paired over {paired['episodes']} shared episodes: only {a} succeeded in {paired['only_a']}, "
                     f"only {b} in {paired['only_b']}; McNemar exact p = {paired['p_value']:.3g}"
                     + (" (a difference this large is common by chance)" if paired["p_value"] >= 0.05 else ""))
    return "\n".join(lines)


def plot_comparison(path: str | Path, columns: list[Column], result: dict[str, Any]) -> Path:
    """Grouped bars, one group per row (task / chain length) and one bar per column, with each cell's spread:
    the Wilson 95% interval of a single run, ± one sample std of a group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in result["rows"] if r != "avg completed"]
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) * len(columns) + 2), 4.0), dpi=110)
    x = np.arange(len(rows))
    for i, c in enumerate(columns):
        bars = [_spread(c, row, result["shared_tasks"]) for row in rows]  # (value, below, above)
        ax.bar(x + (i - (len(columns) - 1) / 2) * width, [b[0] for b in bars], width,
               yerr=[[b[1] for b in bars], [b[2] for b in bars]], capsize=3, label=c.label)
    ax.set_xticks(x, rows, rotation=60 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center",
                  fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _spread(column: Column, row: str, shared: list[str] | None) -> tuple[float, float, float]:
    """(value, error below, error above) of a cell for a bar: Wilson interval of one run, ± std of a group."""
    stats = _mean_std(column, row, shared)
    if stats is None:
        return float("nan"), 0.0, 0.0
    value, std, _ = stats
    ci = _interval(column.runs[0], row)[0] if len(column.runs) == 1 else None
    lo, hi = ci or (value - std, value + std)
    return value, max(0.0, value - lo), max(0.0, hi - value)


def compare_command(args) -> None:
    """CLI entry (`robodit compare`)."""
    columns = parse_columns(args.results)
    result = compare(columns)
    text = format_markdown(result)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if getattr(args, "plot", None):
        print(f"plot: {plot_comparison(args.plot, columns, result)}")
