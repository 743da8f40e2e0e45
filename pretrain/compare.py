"""Compare training runs tracked in MLflow: a table, plots and one self-contained HTML report.

    python -m pretrain.compare --experiment hnet-pretrain --metrics train/loss eval/bpb --x bytes --out cmp/

Runs are selected by experiment, run ids, run names or an MLflow filter string (keys with dots
in backticks: tags.`slurm.job_id` = '42'). Written to --out: `table.csv` (each run's params that
differ between the selected runs, final and best eval/bpb, final compression of every stage,
bytes seen, wall and active time, restarts, status), one PNG per metric (one line per run, or a
mean and band per group with --group-by; an EMA drawn over the faint raw curve with --smooth)
and `report.html` (table, plots inline, each run's config diff).

Restarts. A run resumed after a preemption logged the steps between its checkpoint and the kill
twice. The trainer tags every restart with `restart_N.from_step` (the checkpoint it continued
from) and `restart_N.started_ms`: points of steps after from_step that were logged before the
restart began belong to the abandoned attempt and are dropped, so each run is one continuous line
(the report says how many points were replaced). Active time leaves out the gaps between attempts.

Histories are read in full resolution (from the SQLite file directly when the store is one,
through the MLflow client otherwise) and thinned only when drawn.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from pretrain.errors import ConfigError

DEFAULT_METRICS = ["train/loss", "eval/bpb", "train/compression/stage0"]
X_AXES = ("step", "bytes", "wall", "active")
MAX_DRAWN_POINTS = 4000
# The table always reads these, whatever is plotted.
TABLE_METRICS = ["eval/bpb", "train/bytes_seen"]


class CompareError(ConfigError):
    """Bad selection or arguments: a message for the user, no traceback."""


@dataclass
class Series:
    """One metric of one run after the restart clean-up: numpy arrays sorted by step."""

    step: np.ndarray
    value: np.ndarray
    ts: np.ndarray  # ms

    def __len__(self) -> int:
        return len(self.step)


@dataclass
class RunData:
    run_id: str
    name: str
    experiment: str
    status: str
    start_ms: int
    end_ms: int | None
    params: dict
    tags: dict
    series: dict = field(default_factory=dict)  # metric -> Series
    replaced: int = 0  # points dropped as logged twice across a restart
    attempts: list = field(default_factory=list)  # [(started_ms, from_step)], the first (start, 0)

    @property
    def label(self) -> str:
        return f"{self.name or self.run_id[:8]} ({self.run_id[:8]})"


# ----------------------------------------------------------------------------- selection
def select_runs(client, experiments: list[str], run_ids: list[str], names: list[str], filter_string: str) -> list:
    from mlflow.exceptions import MlflowException

    runs = []
    try:
        for rid in run_ids:
            runs.append(client.get_run(rid))
    except MlflowException as e:
        raise CompareError(f"--runs: {e.message}") from None
    if experiments or names or filter_string or not run_ids:
        exp_ids = []
        for name in experiments or []:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise CompareError(f"--experiment {name!r}: no such experiment in this store")
            exp_ids.append(exp.experiment_id)
        if not exp_ids:
            exp_ids = [e.experiment_id for e in client.search_experiments()]
        try:
            found = _search_all(client, exp_ids, filter_string)
        except MlflowException as e:
            raise CompareError(f"--filter {filter_string!r}: MLflow refused it: {e.message}. Keys with dots need "
                               f"backticks, e.g. tags.`slurm.job_id` = '42'") from None
        if names:
            found = [r for r in found if r.info.run_name in names]
            missing = set(names) - {r.info.run_name for r in found}
            if missing:
                raise CompareError(f"--names: no run named {sorted(missing)} in the selected experiments")
        have = {r.info.run_id for r in runs}
        runs += [r for r in found if r.info.run_id not in have]
    if not runs:
        raise CompareError("no run matches the selection")
    return runs


def _search_all(client, exp_ids: list[str], filter_string: str) -> list:
    out, token = [], None
    while True:
        page = client.search_runs(exp_ids, filter_string=filter_string or "", max_results=1000, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def run_data(client, runs: list) -> list[RunData]:
    names = {}
    out = []
    for r in runs:
        exp = r.info.experiment_id
        if exp not in names:
            names[exp] = client.get_experiment(exp).name
        d = RunData(r.info.run_id, r.info.run_name or "", names[exp], r.info.status, int(r.info.start_time or 0),
                    r.info.end_time, dict(r.data.params), dict(r.data.tags))
        d.attempts = attempts_of(d.tags, d.start_ms)
        out.append(d)
    return out


def attempts_of(tags: dict, start_ms: int) -> list[tuple[int, int]]:
    """[(started_ms, from_step)] per attempt, the first (run start, 0); restarts without a start
    time (runs from before the tag existed) are left out: newest-per-step still applies."""
    out = [(start_ms, 0)]
    n = int(tags.get("restart_count", "0") or 0)
    for i in range(1, n + 1):
        started, from_step = tags.get(f"restart_{i}.started_ms"), tags.get(f"restart_{i}.from_step")
        if started is not None and from_step is not None:
            out.append((int(started), int(from_step)))
    return sorted(out)


# ----------------------------------------------------------------------------- histories
def read_histories(client, uri: str, runs: list[RunData], metrics: list[str]) -> None:
    """Fills run.series for every (run, metric) that has points, restarts cleaned up."""
    raw = _sqlite_histories(uri, runs, metrics) if uri.startswith("sqlite:///") else None
    if raw is None:
        raw = {}
        for r in runs:
            for m in metrics:
                hist = client.get_metric_history(r.run_id, m)
                if hist:
                    raw[(r.run_id, m)] = [(h.step, h.value, h.timestamp) for h in hist]
    for r in runs:
        for m in metrics:
            pts = raw.get((r.run_id, m))
            if pts:
                series, replaced = clean_restarts(pts, r.attempts)
                r.series[m] = series
                r.replaced += replaced


def _sqlite_histories(uri: str, runs: list[RunData], metrics: list[str]) -> dict | None:
    path = uri[len("sqlite:///"):]
    if not os.path.isfile(path):
        return None
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        out: dict = {}
        ids = [r.run_id for r in runs]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = (f"SELECT run_uuid, key, step, value, timestamp FROM metrics WHERE key IN "
                 f"({','.join('?' * len(metrics))}) AND run_uuid IN ({','.join('?' * len(chunk))})")
            for run_id, key, step, value, ts in con.execute(q, [*metrics, *chunk]):
                out.setdefault((run_id, key), []).append((step, value, ts))
        return out
    except sqlite3.Error:
        return None  # not an MLflow schema we know: the client reads it
    finally:
        con.close()


def clean_restarts(points: list[tuple[int, float, int]], attempts: list[tuple[int, int]]) -> tuple[Series, int]:
    """Drops the points an abandoned attempt logged after the checkpoint the next one resumed
    from; then per step the newest value. Returns (series, points dropped)."""
    arr = np.array(points, dtype=np.float64)
    step, value, ts = arr[:, 0], arr[:, 1], arr[:, 2]
    keep = np.ones(len(arr), dtype=bool)
    for started, from_step in attempts[1:]:
        keep &= ~((step > from_step) & (ts < started))
    step, value, ts = step[keep], value[keep], ts[keep]
    order = np.lexsort((ts, step))  # by step, then time: the last of each step is the newest
    step, value, ts = step[order], value[order], ts[order]
    last = np.ones(len(step), dtype=bool)
    last[:-1] = step[1:] != step[:-1]
    dropped = int(len(arr) - last.sum())
    return Series(step[last].astype(np.int64), value[last], ts[last]), dropped


# ----------------------------------------------------------------------------- x axes
def x_values(run: RunData, series: Series, axis: str) -> np.ndarray | None:
    if axis == "step":
        return series.step.astype(np.float64)
    if axis == "bytes":
        b = run.series.get("train/bytes_seen")
        if b is None or not len(b):
            return None
        return np.interp(series.step, b.step, b.value)
    if axis == "wall":
        return (series.ts - run.start_ms) / 1000.0
    return active_seconds(run, series.ts)


def active_seconds(run: RunData, ts: np.ndarray) -> np.ndarray:
    """Seconds of training before each timestamp: wall time minus the gaps between an attempt's
    last logged point and the next attempt's start (queue time, restarts)."""
    starts = [a[0] for a in run.attempts]
    every = np.sort(np.concatenate([s.ts for s in run.series.values()])) if run.series else ts
    gaps = []
    for i in range(1, len(starts)):
        before = every[(every < starts[i]) & (every >= starts[i - 1])]
        end = before[-1] if len(before) else starts[i - 1]
        gaps.append((starts[i], max(0.0, starts[i] - end)))
    out = (ts - run.start_ms).astype(np.float64)
    for started, gap in gaps:
        out -= np.where(ts >= started, gap, 0.0)
    return out / 1000.0


# ----------------------------------------------------------------------------- the table
def differing_params(runs: list[RunData]) -> list[str]:
    keys = sorted(set().union(*[r.params for r in runs]))
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def stage_keys(runs: list[RunData]) -> list[str]:
    keys = set()
    for r in runs:
        keys |= {m for m in r.series if m.startswith("train/compression/stage")}
    return sorted(keys)


def table_rows(runs: list[RunData]) -> tuple[list[str], list[list]]:
    diff, stages = differing_params(runs), stage_keys(runs)
    header = ["run", "run_id", "experiment", "status", "restarts", "last_step", "bytes_seen", "wall_s", "active_s",
              "final eval/bpb", "best eval/bpb", *[f"final {s}" for s in stages], *diff]
    rows = []
    for r in runs:
        ev, nb = r.series.get("eval/bpb"), r.series.get("train/bytes_seen")
        every = [s for s in r.series.values() if len(s)]
        last_ts = max((s.ts[-1] for s in every), default=r.start_ms)
        last_step = max((int(s.step[-1]) for s in every), default=0)
        wall = (last_ts - r.start_ms) / 1000.0
        active = float(active_seconds(r, np.array([last_ts], dtype=np.float64))[0])
        rows.append([r.name, r.run_id, r.experiment, r.status, int(r.tags.get("restart_count", "0") or 0), last_step,
                     int(nb.value[-1]) if nb is not None and len(nb) else "",
                     round(wall, 1), round(active, 1),
                     _fmt(ev.value[-1]) if ev is not None and len(ev) else "",
                     _fmt(np.nanmin(ev.value)) if ev is not None and len(ev) else "",
                     *[_fmt(r.series[s].value[-1]) if s in r.series else "" for s in stages],
                     *[r.params.get(k, "") for k in diff]])
    return header, rows


def _fmt(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else str(v)


# ----------------------------------------------------------------------------- plots
def ema(values: np.ndarray, alpha: float) -> np.ndarray:
    """Exponential moving average, debiased at the start (as TensorBoard's smoothing)."""
    out = np.empty_like(values)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(values):
        acc = alpha * acc + (1 - alpha) * v
        weight = alpha * weight + (1 - alpha)
        out[i] = acc / weight
    return out


def thin(n: int, limit: int = MAX_DRAWN_POINTS) -> np.ndarray:
    return np.arange(n) if n <= limit else np.unique(np.linspace(0, n - 1, limit).astype(np.int64))


def plot_metric(metric: str, runs: list[RunData], axis: str, smooth: float, group_by: str = "") -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for r in runs:
        s = r.series.get(metric)
        if s is None or not len(s):
            continue
        x = x_values(r, s, axis)
        if x is not None:
            lines.append((r, x, s.value))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if group_by:
        _draw_groups(ax, lines, group_by, smooth)
    else:
        for i, (r, x, y) in enumerate(lines):
            color = f"C{i % 10}"
            idx = thin(len(x))
            if smooth > 0:
                ax.plot(x[idx], y[idx], color=color, alpha=0.25, linewidth=0.8)
                ax.plot(x[idx], ema(y, smooth)[idx], color=color, linewidth=1.5, label=r.label)
            else:
                ax.plot(x[idx], y[idx], color=color, linewidth=1.2, label=r.label)
    ax.set_xlabel({"step": "step", "bytes": "bytes seen", "wall": "wall time (s)",
                   "active": "active time (s)"}[axis])
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _draw_groups(ax, lines, group_by: str, smooth: float) -> None:
    """Mean and min-max band of the runs that share the value of param `group_by`, on a common x
    grid (each run interpolated inside its own range)."""
    groups: dict = {}
    for r, x, y in lines:
        groups.setdefault(r.params.get(group_by, "?"), []).append((x, ema(y, smooth) if smooth > 0 else y))
    for i, (value, members) in enumerate(sorted(groups.items())):
        lo = max(m[0][0] for m in members)
        hi = min(m[0][-1] for m in members)
        if hi <= lo:
            continue
        grid = np.linspace(lo, hi, min(MAX_DRAWN_POINTS, max(len(m[0]) for m in members)))
        ys = np.stack([np.interp(grid, x, y) for x, y in members])
        color = f"C{i % 10}"
        ax.fill_between(grid, ys.min(0), ys.max(0), color=color, alpha=0.2)
        ax.plot(grid, ys.mean(0), color=color, linewidth=1.5, label=f"{group_by}={value} (n={len(members)})")


# ----------------------------------------------------------------------------- the report
def write_outputs(out_dir: str, runs: list[RunData], metrics: list[str], axis: str, smooth: float,
                  group_by: str, notes: list[str]) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    header, rows = table_rows(runs)
    paths = {"table": os.path.join(out_dir, "table.csv"), "report": os.path.join(out_dir, "report.html")}
    with open(paths["table"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    pngs = {}
    for m in metrics:
        png = plot_metric(m, runs, axis, smooth, group_by)
        if png is None:
            notes.append(f"{m}: no run has points to draw against {axis}")
            continue
        name = m.replace("/", "_") + ".png"
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(png)
        pngs[m] = png
        paths[m] = os.path.join(out_dir, name)
    with open(paths["report"], "w") as f:
        f.write(report_html(header, rows, pngs, runs, notes, axis))
    return paths


def report_html(header, rows, pngs: dict[str, bytes], runs: list[RunData], notes: list[str], axis: str) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>H-Net run comparison</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%;margin:0.5em 0}.note{color:#a40}</style></head><body>",
             f"<h1>Run comparison</h1><p>{len(runs)} runs, x axis: {e(axis)}, generated "
             f"{e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"]
    replaced = sum(r.replaced for r in runs)
    parts.append(f"<p>Restarts: {replaced} logged point(s) replaced by the values the runs continued from "
                 f"({', '.join(f'{e(r.label)}: {r.replaced}' for r in runs if r.replaced) or 'none'}).</p>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li class='note'>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Table</h2><table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
    parts.append("</table><h2>Plots</h2>")
    for m, png in pngs.items():
        parts.append(f"<h3>{e(m)}</h3><img alt='{e(m)}' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode()}'>")
    parts.append("<h2>Config differences per run</h2>")
    diff = differing_params(runs)
    for r in runs:
        items = "".join(f"<tr><td>{e(k)}</td><td>{e(str(r.params.get(k, '(unset)')))}</td></tr>" for k in diff)
        parts.append(f"<h3>{e(r.label)}</h3>" + (f"<table>{items}</table>" if items else "<p>no differences</p>"))
    parts.append("</body></html>")
    return "\n".join(parts)


def log_report(client, paths: dict[str, str], runs: list[RunData], experiment: str) -> str:
    """Logs the report, table and plots as artifacts of a new comparison run; returns its id."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=f"compare {len(runs)} runs",
                            tags={"compare.run_ids": ",".join(r.run_id for r in runs)[:5000]})
    for path in paths.values():
        client.log_artifact(run.info.run_id, path)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


# ----------------------------------------------------------------------------- the CLI
def compare(args) -> dict[str, str]:
    from pretrain.tracking import default_tracking_uri, open_client

    if args.smooth and not 0 <= args.smooth < 1:
        raise CompareError(f"--smooth {args.smooth}: the EMA weight must lie in [0, 1)")
    uri = default_tracking_uri(args.tracking_uri or "")
    if uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///"):]):
        # opening would create an empty store there; a mistyped path should say so instead
        raise CompareError(f"no MLflow store at {uri} (no such file): pass --tracking-uri of the store the runs "
                           f"logged to")
    client, _ = open_client(uri)
    runs = run_data(client, select_runs(client, args.experiment or [], args.runs or [], args.names or [],
                                        args.filter or ""))
    metrics = list(dict.fromkeys(args.metrics or DEFAULT_METRICS))
    read_histories(client, uri, runs, list(dict.fromkeys(metrics + TABLE_METRICS + _stage_metrics(runs))))
    notes = [f"run {r.label}: no metric {m!r}" for r in runs for m in metrics if m not in r.series]
    if args.x == "bytes":
        notes += [f"run {r.label}: no train/bytes_seen, so it cannot be drawn against bytes" for r in runs
                  if "train/bytes_seen" not in r.series]
    if args.group_by and not any(args.group_by in r.params for r in runs):
        raise CompareError(f"--group-by {args.group_by!r}: no selected run has that param "
                           f"(params look like config.train.seed)")
    paths = write_outputs(args.out, runs, metrics, args.x, args.smooth, args.group_by or "", notes)
    for n in notes:
        print(f"[compare] {n}", file=sys.stderr)
    if args.log_to_mlflow:
        rid = log_report(client, paths, runs, args.log_to_mlflow)
        print(f"[compare] report logged to MLflow run {rid} (experiment {args.log_to_mlflow})")
    print(f"[compare] {len(runs)} runs -> {paths['report']}, {paths['table']}")
    return paths


def _stage_metrics(runs: list[RunData]) -> list[str]:
    """train/compression/stage{s} for every stage any selected run's model has."""
    n = 1
    for r in runs:
        # the resolved model's targets: a config that leaves them to the public JSON logs null
        for key in ("model_resolved.ratio_targets", "config.model.ratio_targets"):
            try:
                n = max(n, len(json.loads(r.params.get(key, "null"))))
                break
            except (ValueError, TypeError):
                continue
    return [f"train/compression/stage{s}" for s in range(n)]


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m pretrain.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", default="", help="MLflow store (default: $MLFLOW_TRACKING_URI or "
                                                      "sqlite:///mlflow.db)")
    ap.add_argument("--experiment", nargs="*", help="experiment names (default: all)")
    ap.add_argument("--runs", nargs="*", help="run ids")
    ap.add_argument("--names", nargs="*", help="run names")
    ap.add_argument("--filter", default="", help="MLflow filter string, e.g. \"params.`config.train.seed` = '1'\"")
    ap.add_argument("--metrics", nargs="*", help=f"metrics to plot (default: {' '.join(DEFAULT_METRICS)})")
    ap.add_argument("--x", choices=X_AXES, default="step", help="x axis of the plots")
    ap.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1), 0 = raw only")
    ap.add_argument("--group-by", default="", help="a param; runs sharing its value are drawn as mean and band")
    ap.add_argument("--log-to-mlflow", default="", metavar="EXPERIMENT",
                    help="also log the report as artifacts of a new run in this experiment")
    ap.add_argument("--out", required=True, help="directory for report.html, table.csv and the PNGs")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        compare(args)
    except ConfigError as e:
        print(f"[compare] error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
