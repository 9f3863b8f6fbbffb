"""The status page: an operator's screen drawn on the server, from the status document and
the history ring.

Everything is inline (style, and each chart as SVG): the page loads nothing from anywhere,
runs no script, and renders on a host without a network; a meta refresh redraws it every
few seconds. Numbers are shown in words and units: yes/no, KiB/MiB, durations, rates.

Sections of the status document this module does not know (another feature's, say) are
drawn as tables of their own, labelled from their keys, so a section added to the document
appears on the page without a change here.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from actors.ops_history import Sample

REFRESH_S: Final = 5
"""How often the page reloads itself."""
WINDOW_S: Final = 15 * 60
"""The span of every chart: the history ring's 15 minutes."""

KNOWN_SECTIONS: Final = frozenset(
    {
        "ready",
        "generated_at",
        "actors",
        "counts_by_status",
        "headline",
        "snapshot_age_s",
        "broker",
        "rates",
    }
)
"""The status document's sections drawn by a dedicated part of the page; any other
mapping in it is drawn as a table of its own."""

LABELS: Final[Mapping[str, str]] = {
    # headline
    "oldest_pending_age_s": "Oldest pending task waiting for",
    "dirty_records": "Changes not yet flushed",
    "flush_outstanding": "Flush with the writer now",
    "ingest_paused": "Ingest paused (a max_*_count limit reached)",
    "held_by_pause": "Pending tasks held by a pause",
    "killswitch_dropped": "Tasks the killswitch dropped",
    "demoted_forwarded": "Tasks forwarded to the demoted topic",
    "claims_hit": "Claims that handed out a task",
    "claims_miss": "Claims that found nothing pending",
    "conclusions_applied": "Results applied",
    "conclusions_late": "Results after a deadline reset",
    "conclusions_unknown": "Results for tasks not held",
    "kafka_consumed": "Kafka messages consumed",
    "kafka_ingested": "Activations ingested",
    "kafka_decode_failures": "Messages that are not activations",
    "kafka_assigned_partitions": "Partitions assigned",
    "kafka_paused_partitions": "Partitions paused",
    "kafka_lag_messages": "Kafka lag (messages not committed)",
    "kafka_reachable": "Kafka answering",
    "kafka_silence_s": "Kafka silent for",
    "store_db_bytes": "Database size",
    "store_wal_bytes": "Write-ahead log size",
    # broker
    "version": "Version",
    "uptime_s": "Up for",
    "started_at": "Started",
    "kafka_bootstrap": "Kafka bootstrap servers",
    "kafka_topic": "Kafka topic",
    "kafka_consumer_group": "Kafka consumer group",
    "db_path": "Database file",
    "store_mode": "Store mode",
    "delivery_mode": "Delivery",
    # rates
    "ingested_per_s": "Ingested",
    "claims_per_s": "Claims",
    "results_per_s": "Results",
    "flushes_per_s": "Flushes",
    "flush_ms": "Flush duration (mean)",
    "kafka_lag": "Kafka lag",
}
"""Keys of the status document in words; a key not listed is shown as its words."""

POLICIES: Final[Mapping[str, str]] = {
    "block": "sender waits",
    "fail": "sender refused",
    "drop_newest": "newest dropped",
    "drop_oldest": "oldest dropped",
}
"""What a full mailbox does with one more message, by policy."""

_ACTOR_COLOURS: Final = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2")
_TASK_COLOURS: Final = {"ingested": "#059669", "claimed": "#2563eb", "results": "#d97706"}


# --- values in words -------------------------------------------------------------------------


def label(key: str) -> str:
    """A status key in words: from `LABELS`, else the key's own words."""
    known = LABELS.get(key)
    if known is not None:
        return known
    words = key.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def shown(key: str, value: object) -> str:
    """A status value for people: yes/no, sizes in KiB/MiB, durations, rates, thousands
    separated; the key's suffix says the unit (`_bytes`, `_per_s`, `_ms`, `_at`, `_s`)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        unit = next((show for suffix, show in _UNITS if key.endswith(suffix)), _number)
        return unit(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{label(str(k))}: {shown(str(k), v)}" for k, v in value.items()) or "—"
    if isinstance(value, list | tuple):
        return ", ".join(shown(key, v) for v in value) or "—"
    return str(value)


def human_bytes(size: float) -> str:
    """1023 B, 1.5 KiB, 12.3 MiB, 4.0 GiB."""
    if size < 1024:
        return f"{size:,.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:,.1f} {unit}"


def duration(seconds: float) -> str:
    """0.4 s, 12.0 s, 4 min 10 s, 3 h 05 min, 2 d 03 h."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600:02d} h"


def _number(value: float) -> str:
    if isinstance(value, int) or abs(value) >= 100 or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def _milliseconds(value: float) -> str:
    if value == 0:
        return "0 ms"
    return f"{value:,.2f} ms" if value < 10 else f"{value:,.0f} ms"


def _timestamp(value: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))


_UNITS: Final[tuple[tuple[str, Callable[[float], str]], ...]] = (
    ("_bytes", human_bytes),
    ("_per_s", lambda value: f"{_number(value)} /s"),
    ("_ms", _milliseconds),
    ("_at", _timestamp),
    ("_s", duration),
)
"""A numeric value's unit, by the suffix of its key; the first suffix that matches wins."""


# --- charts ----------------------------------------------------------------------------------

Series = tuple[str, str, Sequence[tuple[float, float | None]]]
"""(name, colour, (time, value) points); a None value is a gap in the line."""

_W, _H = 360, 130
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 8, 8, 20


def chart(
    title: str,
    series: Sequence[Series],
    now: float,
    value: Callable[[float], str],
    window_s: float = WINDOW_S,
) -> str:
    """One small line chart of the last `window_s` seconds as inline SVG, with a legend
    giving each line's latest value. The figure's `data-points` counts the points drawn,
    `data-max` is the highest value among them."""
    values = [v for _, _, points in series for _, v in points if v is not None]
    top = nice_ceiling(max(values, default=0.0))
    start = now - window_s
    width, height = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(at: float) -> float:
        return _LEFT + max(0.0, min(1.0, (at - start) / window_s)) * width

    def y(v: float) -> float:
        return _TOP + height * (1 - v / top)

    parts = [
        f'<svg viewBox="0 0 {_W} {_H}" role="img" aria-label="{html.escape(title)}">',
    ]
    for fraction in (0.0, 0.5, 1.0):
        level = top * fraction
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(level):.1f}" '
            f'y2="{y(level):.1f}"/>'
            f'<text class="axis" x="{_LEFT - 4}" y="{y(level) + 3:.1f}" text-anchor="end">'
            f"{html.escape(value(level))}</text>"
        )
    for minutes in (15, 10, 5, 0):
        at_x = x(now - minutes * 60)
        text = "now" if minutes == 0 else f"&#8722;{minutes} min"
        anchor = "end" if minutes == 0 else "middle" if minutes != 15 else "start"
        parts.append(
            f'<text class="axis" x="{at_x:.1f}" y="{_H - 5}" text-anchor="{anchor}">{text}</text>'
        )
    drawn = 0
    legend = []
    for index, (name, colour, points) in enumerate(series):
        # Each line a little thinner than the one under it, so lines that coincide (claims
        # and results of a broker that keeps up, idle mailboxes at 0) all stay in sight.
        stroke = max(1.0, 2.8 - 0.5 * index)
        for segment in _segments(points):
            coordinates = " ".join(f"{x(at):.1f},{y(v):.1f}" for at, v in segment)
            drawn += len(segment)
            if len(segment) == 1:
                at, v = segment[0]
                parts.append(f'<circle cx="{x(at):.1f}" cy="{y(v):.1f}" r="2" fill="{colour}"/>')
            else:
                parts.append(
                    f'<polyline points="{coordinates}" fill="none" stroke="{colour}" '
                    f'stroke-width="{stroke:.1f}" stroke-linejoin="round"/>'
                )
        latest = next((v for _, v in reversed(points) if v is not None), None)
        legend.append(
            f'<span><i style="background:{colour}"></i>{html.escape(name)} '
            f"<b>{html.escape('—' if latest is None else value(latest))}</b></span>"
        )
    parts.append("</svg>")
    empty = "" if drawn else '<p class="empty">no data yet: one point every few seconds</p>'
    return (
        f'<figure class="chart" data-points="{drawn}" data-max="{max(values, default=0.0):g}">'
        f"<figcaption>{html.escape(title)}"
        f"</figcaption>{''.join(parts)}{empty}"
        f'<div class="legend">{"".join(legend)}</div></figure>'
    )


def nice_ceiling(value: float) -> float:
    """The axis top for a maximum: 1, 2, 2.5 or 5 times a power of ten, at or above it."""
    if value <= 0:
        return 1.0
    power = 10.0 ** _floor_log10(value)
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * power:
            return step * power
    return 10 * power


def _floor_log10(value: float) -> int:
    exponent = 0
    while value >= 10:
        value /= 10
        exponent += 1
    while value < 1:
        value *= 10
        exponent -= 1
    return exponent


def _segments(
    points: Iterable[tuple[float, float | None]],
) -> list[list[tuple[float, float]]]:
    segments: list[list[tuple[float, float]]] = [[]]
    for at, v in points:
        if v is None:
            if segments[-1]:
                segments.append([])
        else:
            segments[-1].append((at, v))
    return [segment for segment in segments if segment]


def charts(samples: Sequence[Sample], actors: Sequence[str], now: float) -> list[str]:
    """The page's charts: tasks per second, Kafka lag, flushes per second and their
    duration, and each actor's mailbox depth and time in the mailbox."""
    colours = dict(zip(actors, _ACTOR_COLOURS * 2, strict=False))

    def line(name: str, colour: str, pick: Callable[[Sample], float | None]) -> Series:
        return (name, colour, [(s.at, pick(s)) for s in samples])

    def per_actor(pick: Callable[[Sample, str], float | None]) -> list[Series]:
        return [
            (actor, colours[actor], [(s.at, pick(s, actor)) for s in samples]) for actor in actors
        ]

    def rate(v: float) -> str:
        return f"{_number(v)}/s"

    def count(v: float) -> str:
        return _number(v)

    return [
        chart(
            "Tasks per second",
            [
                line("ingested", _TASK_COLOURS["ingested"], lambda s: s.ingested_per_s),
                line("claimed", _TASK_COLOURS["claimed"], lambda s: s.claims_per_s),
                line("results", _TASK_COLOURS["results"], lambda s: s.results_per_s),
            ],
            now,
            rate,
        ),
        chart(
            "Kafka lag (messages not committed)",
            [line("all partitions", "#7c3aed", lambda s: s.kafka_lag)],
            now,
            count,
        ),
        chart(
            "Flushes per second",
            [line("writer", _ACTOR_COLOURS[1], lambda s: s.flushes_per_s)],
            now,
            rate,
        ),
        chart(
            "Flush duration (mean per interval)",
            [line("writer", _ACTOR_COLOURS[1], lambda s: s.flush_ms)],
            now,
            _milliseconds,
        ),
        chart(
            "Mailbox depth (messages waiting)", per_actor(lambda s, a: s.depth.get(a)), now, count
        ),
        chart(
            "Time in mailbox, p99",
            per_actor(lambda s, a: s.wait_p99_ms.get(a)),
            now,
            _milliseconds,
        ),
    ]


# --- the page --------------------------------------------------------------------------------


def render_html(
    status: Mapping[str, Any],
    samples: Sequence[Sample] = (),
    refresh_s: int = REFRESH_S,
) -> str:
    """The whole page for one status document and the history's samples."""
    ready = bool(status.get("ready"))
    now = float(status.get("generated_at", 0))
    broker = status.get("broker") or {}
    rates = status.get("rates") or {}
    headline = status.get("headline") or {}
    latest = samples[-1] if samples else None
    actors = status.get("actors", [])

    subtitle = []
    for key in ("version", "uptime_s"):
        if key in broker:
            subtitle.append(f"{label(key).lower()} {shown(key, broker[key])}")
    subtitle.append(f"at {shown('generated_at', now)}")
    subtitle.append(f"reloads every {refresh_s} s")

    tiles = [
        _tile(label(key), shown(key, rates.get(key)))
        for key in ("ingested_per_s", "claims_per_s", "results_per_s", "flushes_per_s")
    ]
    tiles.append(_tile("Kafka lag", shown("kafka_lag", headline.get("kafka_lag_messages"))))
    tiles.append(_tile("Oldest pending task", shown("_s", headline.get("oldest_pending_age_s"))))
    tiles.append(_tile("Pending", shown("", status.get("counts_by_status", {}).get("pending"))))
    tiles.append(_tile("Database", shown("_bytes", headline.get("store_db_bytes"))))

    names = [str(actor.get("name", "?")) for actor in actors]
    body = [
        f'<header><h1>taskbroker <span class="badge {"good" if ready else "bad"}">'
        f"{'ready' if ready else 'NOT READY'}</span></h1>"
        f"<p>{html.escape(' · '.join(subtitle))}</p></header>",
        f'<section class="tiles">{"".join(tiles)}</section>',
        f'<section class="charts">{"".join(charts(samples, names, now))}</section>',
        _actors_table(actors, broker.get("mailbox_push_timeout_ms") or {}, latest),
        '<section class="columns">',
        _table(
            "Activations held, by status",
            [(label(k), shown(k, v)) for k, v in status.get("counts_by_status", {}).items()]
            or [("(no answer from the state actor yet)", "")],
        ),
        _table(
            "Now",
            [(label(k), shown(k, v)) for k, v in headline.items()] or [("(no numbers yet)", "")],
        ),
        _table(
            "This broker",
            [(label(k), shown(k, v)) for k, v in broker.items() if k != "mailbox_push_timeout_ms"]
            or [("(not known)", "")],
        ),
    ]
    for name, section in status.items():
        if name not in KNOWN_SECTIONS and isinstance(section, Mapping):
            body.append(_table(label(name), section_rows(section) or [("(none)", "")]))
    ages = status.get("snapshot_age_s", {})
    body.append(
        _table(
            "Age of the actors' numbers",
            [(f"{label(k)} actor", duration(float(v))) for k, v in ages.items()]
            or [("(none yet)", "")],
        )
    )
    body.append("</section>")
    return _PAGE.format(refresh_s=refresh_s, body="\n".join(body))


def section_rows(section: Mapping[str, Any], within: str = "") -> list[tuple[str, str]]:
    """A section's keys and values in words; a mapping in it is spread over rows of its
    own, named after it ("File — Path"), one level deep."""
    rows = []
    for key, value in section.items():
        name = f"{within}{label(str(key))}"
        if isinstance(value, Mapping) and value and not within:
            rows += section_rows(value, within=f"{name} — ")
        else:
            rows.append((name, shown(str(key), value)))
    return rows


def _tile(name: str, value: str) -> str:
    return f'<div class="tile"><span>{html.escape(name)}</span><b>{html.escape(value)}</b></div>'


def _table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<div class="card"><h2>{html.escape(title)}</h2><table>{cells}</table></div>'


def _actors_table(
    actors: Sequence[Mapping[str, Any]],
    push_timeouts_ms: Mapping[str, int],
    latest: Sample | None,
) -> str:
    rows = []
    for actor in actors:
        name = str(actor.get("name", "?"))
        mailbox = actor.get("mailbox") or {}
        alive = bool(actor.get("alive"))
        size, depth = mailbox.get("size"), mailbox.get("depth")
        full = isinstance(size, int) and isinstance(depth, int) and depth >= size > 0
        policy = str(mailbox.get("policy", ""))
        when_full = POLICIES.get(policy, policy or "—")
        if policy == "block" and name in push_timeouts_ms:
            when_full += f" up to {push_timeouts_ms[name]:,} ms"
        share = min(depth / size, 1.0) if size and isinstance(depth, int) else 0.0
        wait = None if latest is None else latest.wait_p99_ms.get(name)
        cells = [
            html.escape(name),
            "yes" if alive else "NO",
            f'<span class="meter"><i style="width:{share * 100:.0f}%"></i></span>'
            f"{shown('', depth)} of {shown('', size)}",
            shown("", mailbox.get("high_water")),
            html.escape(f"{when_full} ({policy})" if policy else when_full),
            shown("", mailbox.get("overflows")),
            shown("_ms", wait),
        ]
        css = ' class="bad"' if full or not alive or mailbox.get("overflows") else ""
        rows.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "".join(
        f"<th>{h}</th>"
        for h in (
            "actor",
            "running",
            "waiting in the mailbox",
            "most ever waiting",
            "when full",
            "refused or dropped",
            "time in mailbox p99",
        )
    )
    return (
        '<div class="card wide"><h2>Actors and their mailboxes</h2>'
        f'<table class="grid"><tr>{header}</tr>{"".join(rows)}</table></div>'
    )


_PAGE: Final = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh_s}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>taskbroker status</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 0; padding: 1em 1.5em; color: #1f2937;
  background: #f3f4f6; }}
header h1 {{ margin: 0; font-size: 1.5em; }}
header p {{ margin: .2em 0 1em; color: #6b7280; }}
h2 {{ font-size: 1em; margin: 0 0 .5em; }}
.badge {{ font-size: .7em; padding: .15em .5em; border-radius: .3em; vertical-align: middle; }}
.badge.good {{ background: #dcfce7; color: #166534; }}
.badge.bad {{ background: #fee2e2; color: #991b1b; }}
.tiles {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr));
  gap: .6em; margin-bottom: 1em; }}
.tile, .card, .chart {{ background: #fff; border-radius: .4em; padding: .6em .8em;
  box-shadow: 0 1px 2px rgba(0,0,0,.08); }}
.tile span {{ display: block; color: #6b7280; font-size: .85em; }}
.tile b {{ font-size: 1.35em; font-variant-numeric: tabular-nums; }}
.charts {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr));
  gap: .6em; margin-bottom: 1em; }}
.chart {{ margin: 0; }}
.chart figcaption {{ font-weight: 600; margin-bottom: .2em; }}
.chart svg {{ width: 100%; height: auto; display: block; }}
.chart .grid {{ stroke: #e5e7eb; stroke-width: 1; }}
.chart .axis {{ fill: #6b7280; font-size: 10px; }}
.chart .empty {{ color: #9ca3af; margin: 0; font-size: .85em; }}
.legend {{ display: flex; flex-wrap: wrap; gap: .2em 1em; font-size: .85em; }}
.legend i {{ display: inline-block; width: .8em; height: .8em; border-radius: .2em;
  margin-right: .3em; vertical-align: -.05em; }}
.legend b {{ font-weight: 600; font-variant-numeric: tabular-nums; }}
.card {{ margin-bottom: .6em; }}
.columns {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr));
  gap: .6em; align-items: start; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .2em .5em; border-bottom: 1px solid #f0f0f0;
  font-variant-numeric: tabular-nums; }}
th {{ font-weight: normal; color: #4b5563; white-space: nowrap; }}
td {{ overflow-wrap: anywhere; }}
table.grid th {{ color: #6b7280; font-size: .85em; border-bottom: 1px solid #e5e7eb; }}
table.grid td {{ overflow-wrap: normal; white-space: nowrap; }}
.card.wide {{ overflow-x: auto; }}
tr.bad td {{ color: #991b1b; font-weight: 600; }}
.meter {{ display: inline-block; width: 4em; height: .55em; background: #e5e7eb;
  border-radius: .3em; margin-right: .5em; overflow: hidden; }}
.meter i {{ display: block; height: 100%; background: #2563eb; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
