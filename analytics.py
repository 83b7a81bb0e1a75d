#!/usr/bin/env python3
"""The analytics team's questions, asked of the lake etl.py writes.

    python analytics.py                               # every standard query on ./output
    python analytics.py --lake s3://bucket/lake --query top_songs
    python analytics.py --sql "SELECT level, COUNT(*) FROM users GROUP BY level"
    python analytics.py --charts charts/              # and PNG charts of the main ones

The five tables are registered as Spark SQL views (songplays, users, songs, artists, time).  The
standard queries are the .sql files in queries/: one file per question, its first comment line
the title, the second a one-line description.  Paths, config and credentials work as in etl.py;
run on this machine, a lake on S3 is read from a local copy of the tables the queries use.
Exit codes: 0 success, 2 usage, configuration or query error.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import decimal
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import etl

QUERY_DIR = os.path.join(etl.HERE, "queries")
# The order the standard queries are printed in; any other .sql file in queries/ follows.
STANDARD = ("top_songs", "top_artists", "top_users", "plays_by_hour", "plays_by_weekday",
            "plays_by_level", "users_by_level", "matched_share", "new_users_per_day",
            "plays_per_day_by_level")
DEFAULT_LIMIT = 50
CHART_ROWS = 10_000  # a chart draws at most this many rows of its query (days, hours, songs)


@dataclass
class Query:
    name: str
    title: str
    description: str
    sql: str


def load_queries(folder: str = QUERY_DIR) -> dict:
    """name -> Query, in STANDARD order, then the rest alphabetically."""
    found = {}
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".sql"):
            continue
        with open(os.path.join(folder, fname), encoding="utf-8") as f:
            text = f.read()
        comments = [ln[2:].strip() for ln in text.splitlines() if ln.startswith("--")]
        name = fname[:-4]
        found[name] = Query(name, comments[0] if comments else name,
                            comments[1] if len(comments) > 1 else "", text.strip().rstrip(";"))
    order = [n for n in STANDARD if n in found] + sorted(n for n in found if n not in STANDARD)
    return {n: found[n] for n in order}


# --------------------------------------------------------------------------------------------
# The lake
# --------------------------------------------------------------------------------------------


def register_views(spark, lake: str) -> None:
    """Register the five tables as temporary views; fail with one line when the lake is not one."""
    if etl.is_local(lake) and not os.path.isfile(os.path.join(lake, etl.MANIFEST)):
        raise etl.UsageError(f"{lake} is not a Sparkify lake (no {etl.MANIFEST}); run etl.py "
                             f"--output {lake} first, or pass --lake PATH")
    schemas = etl.OUTPUT_SCHEMAS
    for name in etl.TABLES:
        # Explicit schemas: no footer reads to infer them, and a table not copied down reads as empty.
        reader = spark.read.schema(schemas[name])
        path = f"{lake}/{name}"
        df = reader.parquet(path) if not etl.is_local(lake) or os.path.isdir(path) else \
            spark.createDataFrame([], schemas[name])
        df.createOrReplaceTempView(name)


def tables_in(sql_texts: Sequence[str]) -> list:
    """The lake's tables the queries name."""
    return [t for t in etl.TABLES if any(re.search(rf"\b{t}\b", sql, re.I) for sql in sql_texts)]


@contextlib.contextmanager
def readable_lake(spark, cfg, lake: str, tables: Sequence[str]):
    """The lake as Spark reads it here: a lake on S3, in a local session, copied down (the tables
    named and the manifest) into a private working folder that is removed afterwards."""
    if not (etl.is_s3(lake) and etl.local_session(spark)):
        yield lake if etl.is_local(lake) else etl.spark_url(lake)
        return
    work = etl.work_folder(cfg, 2**28)
    try:
        store = etl.S3Store(cfg, lake)
        if store.read(etl.MANIFEST) is None:
            raise etl.UsageError(f"{lake} is not a Sparkify lake (no {etl.MANIFEST}); run etl.py "
                                 f"--output {lake} first, or pass --lake PATH")
        keys = [store.key(k) for t in tables for k in store.list(t)] + [store.key(etl.MANIFEST)]
        etl.transfer(cfg, "download", store.bucket, keys, store.prefix, work)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_sql(spark, sql: str, limit: int | None = None):
    """(column names, rows, truncated) of a query; at most `limit` rows reach the driver."""
    df = spark.sql(sql)
    rows = [tuple(r) for r in (df.limit(limit + 1) if limit is not None else df).collect()]
    truncated = limit is not None and len(rows) > limit
    return df.columns, rows[:limit], truncated


def run_queries(spark, lake: str, names: Sequence[str] | None = None) -> dict:
    """name -> (columns, rows) of the standard queries (all of them by default)."""
    queries = load_queries()
    names = list(names or queries)
    cfg = etl.load_config(["--output", lake])
    with readable_lake(spark, cfg, lake, tables_in([queries[n].sql for n in names])) as root:
        register_views(spark, root)
        return {name: run_sql(spark, queries[name].sql, DEFAULT_LIMIT)[:2] for name in names}


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, decimal.Decimal):  # ROUND(x, n) keeps n decimals: 2.0, not 2
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, dt.date):
        return v.isoformat()
    return str(v)


def format_table(columns: Sequence[str], rows: Sequence[tuple], max_width: int = 40) -> str:
    """An aligned text table: numbers right-aligned, text left-aligned and cut at max_width."""
    cells = [[_cell(v) for v in row] for row in rows]
    cells = [[c if len(c) <= max_width else c[:max_width - 1] + "…" for c in row] for row in cells]
    numeric = [all(isinstance(r[i], (int, float, decimal.Decimal)) or r[i] is None for r in rows)
               and any(r[i] is not None for r in rows) for i in range(len(columns))]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    if not rows:
        out.append("(no rows)")
    return "\n".join(out)


def print_result(title: str, description: str, columns, rows, truncated: bool, out) -> None:
    print(f"== {title}", file=out)
    if description:
        print(f"   {description}", file=out)
    print(file=out)
    print("\n".join("  " + ln for ln in format_table(columns, rows).splitlines()), file=out)
    if truncated:
        print(f"  (first {len(rows)} rows; --limit N shows more)", file=out)
    print(file=out, flush=True)


# --------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------

CHARTS = {  # file -> the query it draws
    "plays_by_hour.png": "plays_by_hour",
    "plays_by_weekday.png": "plays_by_weekday",
    "plays_per_day_by_level.png": "plays_per_day_by_level",
    "top_songs.png": "top_songs",
}


def _column(columns, rows, name):
    i = list(columns).index(name)
    return [r[i] for r in rows]


MIN_TOP_SONGS = 3


def write_charts(results: dict, folder: str, out=sys.stdout) -> list:
    """PNG charts of the main queries into folder; returns the files written."""
    try:
        import matplotlib
    except ImportError:
        raise etl.UsageError("--charts needs matplotlib: pip install -r requirements.txt") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    style = {"color": "#3b6ea8"}
    for fname, query in CHARTS.items():
        columns, rows = results[query]
        if query == "top_songs" and len(rows) < MIN_TOP_SONGS:
            # One or two bars rank nothing: say why instead of drawing them.
            print(f"chart {fname} not drawn: only {len(rows)} song(s) with a matched play; the "
                  f"chart needs {MIN_TOP_SONGS}", file=out)
            continue
        fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
        if query == "plays_by_hour":
            ax.bar(_column(columns, rows, "hour"), _column(columns, rows, "plays"), **style)
            ax.set_xticks(range(0, 24))
            ax.set(title="Plays by hour of day", xlabel="hour of day (UTC)", ylabel="plays")
        elif query == "plays_by_weekday":
            ax.bar(_column(columns, rows, "day"), _column(columns, rows, "plays"), **style)
            ax.set(title="Plays by day of the week", xlabel="day of the week (UTC)", ylabel="plays")
        elif query == "plays_per_day_by_level":
            days = _column(columns, rows, "day")
            free, paid = _column(columns, rows, "free"), _column(columns, rows, "paid")
            ax.bar(days, paid, width=0.8, label="paid", color="#3b6ea8")
            ax.bar(days, free, width=0.8, bottom=paid, label="free", color="#f0a04b")
            ax.legend(loc="upper left", frameon=False)
            ax.set(title="Plays per day, paid vs free users", xlabel="day (UTC)", ylabel="plays")
            fig.autofmt_xdate()
        elif query == "top_songs":
            labels = [f"{t} — {a}" if a else t for t, a in zip(_column(columns, rows, "title"),
                                                                  _column(columns, rows, "artist"))]
            labels = [x if len(x) <= 50 else x[:49] + "…" for x in labels]
            plays = _column(columns, rows, "plays")
            slots = max(len(rows), 10)  # a fixed bar height, however few songs matched
            bars = ax.barh(range(slots - len(rows), slots), plays[::-1], height=0.7, **style)
            ax.bar_label(bars, padding=3)
            ax.set_yticks(range(slots - len(rows), slots), labels[::-1])
            ax.set_ylim(-0.6, slots - 0.4)
            ax.set(title="Most played songs", xlabel="plays", ylabel="")
            if not rows:
                ax.text(0.5, 0.5, "no play matched a known song", ha="center", va="center",
                        transform=ax.transAxes)
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(axis="y" if query != "top_songs" else "x", alpha=0.3)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        fig.tight_layout()
        path = os.path.join(folder, fname)
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="analytics.py",
        description="Run the analytics team's standard queries (queries/*.sql) on the lake etl.py "
        "writes, an ad-hoc SQL query, or draw charts.  Views: songplays, users, songs, artists, time.",
        epilog="Paths, config (dl.cfg) and credentials work as in etl.py.  Exit codes: 0 success, "
        "2 usage, configuration or query error.")
    p.add_argument("--lake", help="the lake: etl.py's output root, local or s3a://… / s3://… "
                   "(default: as etl.py's --output: SPARKIFY_OUTPUT, dl.cfg, ./output)")
    p.add_argument("--query", nargs="+", metavar="NAME", help="run only these standard queries "
                   "(see --list)")
    p.add_argument("--sql", help="run this SQL against the views instead of the standard queries")
    p.add_argument("--charts", metavar="DIR", help="also write PNG charts into DIR")
    p.add_argument("--list", action="store_true", help="list the standard queries and exit")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                   help=f"print at most N rows of a result (default {DEFAULT_LIMIT})")
    p.add_argument("--config", help="config file (default: dl.cfg beside etl.py, optional)")
    p.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="log level (default INFO); Spark's own log stays at WARN or quieter")
    return p


def main(argv: Sequence[str] | None = None, spark=None, out=None) -> int:
    """The command line.  With spark given (tests), that session is used and left running."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    queries = load_queries()
    own = spark is None
    try:
        cfg = check_args(args, queries)
        if args.list:
            for q in queries.values():
                print(f"{q.name:<24} {q.title}", file=out)
            return etl.EXIT_OK
        etl.setup_logging(cfg.log_level)
        lake = etl.normalize_path(cfg.output)
        if etl.is_local(lake) and not os.path.isdir(lake):
            raise etl.UsageError(f"lake {lake} does not exist; run etl.py first or pass --lake PATH")
        if etl.is_s3(lake):
            etl.s3_preflight(cfg, lake)
        if own:
            spark = etl.build_spark(dataclasses.replace(cfg, input=lake), app_name="sparkify-analytics")
        names = [] if args.sql else list(args.query or queries)
        if args.charts:
            names += [q for q in CHARTS.values() if q not in names]
        tables = tables_in([args.sql] if args.sql else [queries[n].sql for n in names])
        with readable_lake(spark, cfg, lake, tables) as root:
            register_views(spark, root)
            answer(spark, args, queries, names, out)
        return etl.EXIT_OK
    except etl.UsageError as e:
        print(f"analytics.py: error: {e}", file=sys.stderr)
        return etl.EXIT_USAGE
    except Exception as e:
        etl.log.debug("traceback", exc_info=True)
        print(f"analytics.py: error: {etl.describe_failure(e)}", file=sys.stderr)
        return etl.EXIT_USAGE
    finally:
        if own and spark is not None:
            spark.stop()


def check_args(args, queries: dict):
    """The etl.py configuration the lake's path and credentials come from; UsageError on bad options."""
    unknown = [n for n in args.query or [] if n not in queries]
    if unknown:
        raise etl.UsageError(f"no standard query named {', '.join(unknown)}; one of: {', '.join(queries)}")
    if args.sql and (args.query or args.charts):
        raise etl.UsageError("--sql runs one ad-hoc query; drop --query and --charts with it")
    if args.limit < 1:
        raise etl.UsageError("--limit must be at least 1")
    return etl.load_config([*(["--output", args.lake] if args.lake else []),
                            *(["--config", args.config] if args.config else []),
                            *(["--log-level", args.log_level] if args.log_level else [])])


def answer(spark, args, queries: dict, names: Sequence[str], out) -> None:
    """Run the ad-hoc query or the standard ones on the registered views; print them, draw charts."""
    if args.sql:
        try:
            columns, rows, truncated = run_sql(spark, args.sql, args.limit)
        except Exception as e:  # a SQL error is the user's: one line, exit 2
            raise etl.UsageError(f"query failed: {etl.describe_failure(e)}") from None
        print_result("ad-hoc query", "", columns, rows, truncated, out)
        return
    results = {}
    for name in names:
        q = queries[name]
        columns, rows, truncated = run_sql(spark, q.sql, max(args.limit, CHART_ROWS) if args.charts else args.limit)
        results[name] = (columns, rows)
        if not args.query or name in args.query:
            print_result(q.title, q.description, columns, rows[:args.limit], truncated or len(rows) > args.limit, out)
    if args.charts:
        for path in write_charts(results, args.charts, out):
            print(f"chart: {path}", file=out)


if __name__ == "__main__":
    sys.exit(main())
