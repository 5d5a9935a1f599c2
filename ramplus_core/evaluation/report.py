"""A run as pictures: one static HTML file to open, mail or attach to a ticket.

The page is self-contained and inert: thumbnails are small JPEGs embedded as data: URIs,
the two plots are inline SVG, the style is inline CSS, and there is no script at all. A
Content-Security-Policy in the page forbids every other load, so a page that rendered
cleanly once renders the same anywhere, offline, and cannot leak the bucket's URLs to a
third party by fetching something.

What it shows, all as of right after the run's commits (the table versions its manifest
records, read by time travel):

    catalog    the tables' state: images with tags + images with errors = images in the
               catalog (every image is in exactly one table at those versions), errors by
               stage
    changes    what the run's own commits did, from the change data feed: images added,
               fixed (error -> tagged), retagged, newly failing, broken (tagged -> error),
               removed, with a few examples of each
    the run    the manifest's figures for the run's work (listed, tagged, errors, the
               incremental plan, images/s, timings, resources)
    sample     a seeded uniform sample of N rows of the tags table, with thumbnails, tags
               and scores, a tag frequency plot and a score histogram
    errors     the errors table's rows with their reasons (up to a limit)

Sampling picks row numbers over the table's files (row counts from the Delta log) and
reads only the files that hold a sampled row, each only up to its last sampled row, so a
report of a catalog of millions of images stays cheap.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..job.manifest import counts_of
from ..job.storage import Storage, join
from .results import Run, open_run, read_errors

COLUMNS = ["uri", "size", "width", "height", "tags", "scores"]
MAX_THUMB_SOURCE_BYTES = 64 * 2**20
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
EXAMPLES = 5


@dataclass
class Thumb:
    data_uri: Optional[str]
    problem: Optional[str] = None


# -- data ---------------------------------------------------------------------------------

def _fragments(run: Run) -> list[tuple[object, int]]:
    """The tags table's files at the run's version with their row counts, in path order (so a
    seed picks the same rows whatever order the log lists them in)."""
    ds = run.dataset("tags")
    stats = run.file_stats("tags")
    rows_of = {}
    if stats.num_rows and "num_records" in stats.column_names:
        rows_of = dict(zip(stats.column("path").to_pylist(), stats.column("num_records").to_pylist()))
    out = []
    for frag in sorted(ds.get_fragments(), key=lambda f: f.path):
        n = rows_of.get(frag.path)
        out.append((frag, int(n) if n is not None else frag.count_rows()))
    return out


def sample_rows(run: Run, n: int, seed: int = 0) -> list[dict]:
    """n rows of the tags table at the run's version, uniform at random (seeded), sorted by uri."""
    if n <= 0:
        return []
    frags = _fragments(run)
    counts = np.array([c for _, c in frags], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return []
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(total, size=min(n, total), replace=False))
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    schema = run.dataset("tags").schema  # the table's types (a file alone reads strings as string_view)
    out = []
    for (frag, count), start in zip(frags, starts):
        want = pick[(pick >= start) & (pick < start + count)] - start
        if not want.size:
            continue
        pos, i = 0, 0
        for batch in frag.to_batches(schema=schema, columns=COLUMNS, batch_size=1024):
            end = pos + batch.num_rows
            local = []
            while i < want.size and want[i] < end:
                local.append(int(want[i] - pos))
                i += 1
            if local:
                out.extend(batch.take(local).to_pylist())
            pos = end
            if i >= want.size:
                break
    return sorted(out, key=lambda r: r["uri"])


@dataclass
class Catalog:
    """The tables at the run's versions."""

    tagged: int
    errors: int
    errors_by_stage: dict
    versions: dict

    @property
    def images(self) -> int:
        return self.tagged + self.errors


def catalog_state(run: Run, errors: pa.Table) -> Catalog:
    stats = run.file_stats("tags")
    if stats.num_rows and "num_records" in stats.column_names and stats.column("num_records").null_count == 0:
        tagged = int(pc.sum(stats.column("num_records")).as_py() or 0)
    else:
        tagged = run.dataset("tags").count_rows()
    by_stage = Counter(s or "?" for s in errors.column("stage").to_pylist())
    return Catalog(tagged, errors.num_rows, dict(sorted(by_stage.items())), dict(run.versions))


# what an image went through in one run, from the two tables' change feeds
CATEGORIES = (
    ("added", "newly tagged"), ("fixed", "error -> tagged"), ("retagged", "tags updated"),
    ("failed", "new error"), ("broke", "tagged -> error"), ("error_again", "error updated"), ("removed", "removed"))


@dataclass
class Changes:
    versions: dict  # kind -> the versions the run committed
    tables: dict  # kind -> {"inserted", "updated", "deleted"}
    images: dict  # category -> count
    examples: dict  # category -> [{uri, ...}]
    notes: list = field(default_factory=list)

    @property
    def added(self) -> int:
        return self.images.get("added", 0) + self.images.get("failed", 0)

    @property
    def removed(self) -> int:
        return self.images.get("removed", 0)


def _commit_info(run: Run, kind: str, version: int) -> dict:
    fs, path = run.storage.pyarrow(join(run.output, kind, "_delta_log", f"{version:020d}.json"))
    with fs.open_input_stream(path) as f:
        for line in f.read().decode("utf-8").splitlines():
            if '"commitInfo"' in line:
                return json.loads(line).get("commitInfo") or {}
    return {}


def run_versions(run: Run) -> tuple[dict, list]:
    """kind -> the versions the run's own commits made, and notes.

    The manifest names each step's version; each is checked against its commit's metadata
    (`ramplus.run_id`), since a step that merged nothing made no commit and names the
    version before it. A step an earlier attempt committed has no version in the manifest:
    then the table's recent history is searched for the run's commits.
    """
    steps = (run.manifest.get("tables") or {}).get("steps") or {}
    out: dict = {k: set() for k in ("tags", "errors")}
    notes = []
    search = set()
    for step, m in steps.items():
        kind = "tags" if "tags" in step else "errors"
        v = m.get("version") if isinstance(m, dict) else None
        if not isinstance(v, int):
            search.add(kind)
            continue
        try:
            mine = _commit_info(run, kind, v).get("ramplus.run_id") == run.run_id
        except (OSError, ValueError):
            mine = False
        if mine:
            out[kind].add(v)
    for kind in sorted(search):
        try:
            for h in run.table(kind).history(100):
                if h.get("ramplus.run_id") == run.run_id and isinstance(h.get("version"), int):
                    out[kind].add(h["version"])
        except Exception as e:  # noqa: BLE001 - a report shows what it could not show
            notes.append(f"could not search the {kind} table's history for the run's commits: {type(e).__name__}")
    return {k: sorted(v) for k, v in out.items()}, notes


def _sql_in(uris: list[str]) -> str:
    return "uri IN (" + ", ".join("'" + u.replace("'", "''") + "'" for u in uris) + ")"


def _cdf(run: Run, kind: str, versions: list[int], columns: list[str], predicate: Optional[str] = None) -> pa.Table:
    parts = []
    dt = run.table(kind)
    for v in versions:
        parts.append(pa.table(dt.load_cdf(starting_version=v, ending_version=v, columns=columns + ["_change_type"],
                                          predicate=predicate)))
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in columns + ["_change_type"]})
    return pa.concat_tables(parts, promote_options="permissive")


def run_changes(run: Run, examples: int = EXAMPLES) -> Changes:
    """What the run's commits changed, image by image, from the change data feed."""
    versions, notes = run_versions(run)
    uris: dict = {}
    tables: dict = {}
    try:
        for kind in ("tags", "errors"):
            t = _cdf(run, kind, versions[kind], ["uri"])
            ct = t.column("_change_type").to_pylist()
            u = t.column("uri").to_pylist()
            for what, change in (("inserted", "insert"), ("updated", "update_postimage"), ("deleted", "delete")):
                uris[(kind, what)] = {x for x, c in zip(u, ct) if c == change}
            tables[kind] = {what: len(uris[(kind, what)]) for what in ("inserted", "updated", "deleted")}
    except Exception as e:  # noqa: BLE001 - vacuumed change files, a table without the feed
        notes.append(f"the change data feed of the run's commits cannot be read ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:160] if str(e) else ''}); vacuum removes it with the old versions")
        return Changes(versions, {}, {}, {}, notes)
    t_ins, t_upd, t_del = uris[("tags", "inserted")], uris[("tags", "updated")], uris[("tags", "deleted")]
    e_ins, e_upd, e_del = uris[("errors", "inserted")], uris[("errors", "updated")], uris[("errors", "deleted")]
    cats = {"added": t_ins - e_del, "fixed": t_ins & e_del, "retagged": t_upd, "failed": e_ins - t_del,
            "broke": e_ins & t_del, "error_again": e_upd, "removed": (t_del - e_ins) | (e_del - t_ins)}
    images = {k: len(v) for k, v in cats.items()}
    chosen = {k: sorted(v)[:examples] for k, v in cats.items()}
    ex: dict = {k: [{"uri": u} for u in v] for k, v in chosen.items()}
    want = sorted({u for v in chosen.values() for u in v})
    if want:
        try:
            detail_t = _cdf(run, "tags", versions["tags"], ["uri", "tags"], _sql_in(want)).to_pylist()
            detail_e = _cdf(run, "errors", versions["errors"], ["uri", "error", "stage"], _sql_in(want)).to_pylist()
            before = {r["uri"]: r["tags"] for r in detail_t if r["_change_type"] in ("update_preimage", "delete")}
            after = {r["uri"]: r["tags"] for r in detail_t if r["_change_type"] in ("insert", "update_postimage")}
            err = {r["uri"]: r for r in detail_e if r["_change_type"] in ("insert", "update_postimage")}
            for k, rows in ex.items():
                for r in rows:
                    u = r["uri"]
                    if u in after:
                        r["tags"] = list(after[u] or [])
                    if u in before and k in ("retagged", "broke", "removed"):
                        r["tags_before"] = list(before[u] or [])
                    if u in err:
                        r["error"], r["stage"] = err[u]["error"], err[u]["stage"]
        except Exception as e:  # noqa: BLE001 - the examples are a courtesy
            notes.append(f"examples without details: {type(e).__name__}")
    return Changes(versions, tables, images, ex, notes)


def thumbnail(uri: str, storage: Storage, px: int = 192) -> Thumb:
    """A small JPEG of the image as a data: URI, or the reason there is none."""
    from PIL import Image, ImageOps

    try:
        fs, path = storage.fsspec(uri)
        size = fs.size(path)
        if size is not None and size > MAX_THUMB_SOURCE_BYTES:
            return Thumb(None, f"not fetched: {size / 2**20:.0f} MiB")
        with fs.open(path, "rb") as f:
            data = f.read()
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("RGB", (px * 2, px * 2))  # decode at reduced scale: a thumbnail needs little
        img = ImageOps.exif_transpose(img)
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGBA")
            bg = Image.new("RGB", img.size, (255, 255, 255))
            bg.paste(img, mask=img.getchannel("A"))
            img = bg
        img.thumbnail((px, px))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=72, optimize=True)
        return Thumb("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    except Exception as e:  # noqa: BLE001 - a report shows what it could not show
        return Thumb(None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")


# -- plots (inline SVG) ---------------------------------------------------------------------

def _e(x) -> str:
    return html.escape(str(x), quote=True)


def svg_bars(items: list[tuple[str, int]], title: str, total: int, width: int = 560) -> str:
    """Horizontal bars: tag names on the left, image counts (and share of the sample) on the right."""
    if not items:
        return f'<p class="muted">{_e(title)}: no tags in the sample.</p>'
    bar_h, gap, left, right, top = 16, 4, 180, 90, 24
    h = top + len(items) * (bar_h + gap) + 8
    vmax = max(c for _, c in items)
    plot_w = width - left - right
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" viewBox="0 0 {width} {h}" '
             f'role="img" aria-label="{_e(title)}">',
             f'<text x="0" y="15" class="t">{_e(title)}</text>']
    for i, (name, c) in enumerate(items):
        y = top + i * (bar_h + gap)
        w = max(1.0, plot_w * c / vmax)
        label = name if len(name) <= 26 else name[:25] + "\u2026"
        parts.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end" class="l"><title>{_e(name)}</title>'
                     f'{_e(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" class="bar"/>')
        parts.append(f'<text x="{left + w + 5:.1f}" y="{y + 12}" class="l">{c} ({100 * c / max(total, 1):.0f}%)</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(on: np.ndarray, off: np.ndarray, floor: float, title: str, width: int = 560,
                  bins: int = 20) -> str:
    """Stacked histogram of scores, tags over threshold vs the rest, on a log count axis."""
    if on.size + off.size == 0:
        return f'<p class="muted">{_e(title)}: no scores in the sample.</p>'
    edges = np.linspace(0.0, 1.0, bins + 1)
    c_on, _ = np.histogram(np.clip(on, 0, 1), edges)
    c_off, _ = np.histogram(np.clip(off, 0, 1), edges)
    tot = c_on + c_off
    vmax = max(1, int(tot.max()))
    decades = max(1, math.ceil(math.log10(vmax + 1)))
    left, bottom, top, right = 48, 36, 28, 10
    h = 260
    pw, ph = width - left - right, h - top - bottom
    ylog = lambda v: ph * math.log10(1 + v) / decades  # noqa: E731
    bw = pw / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" viewBox="0 0 {width} {h}" '
             f'role="img" aria-label="{_e(title)}">',
             f'<text x="0" y="15" class="t">{_e(title)}</text>']
    for d in range(decades + 1):
        y = top + ph - ph * d / decades
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" class="l">{10 ** d - (1 if d == 0 else 0)}</text>')
    for i in range(bins):
        x = left + i * bw
        h_all, h_off = ylog(tot[i]), ylog(c_off[i])
        if tot[i]:
            parts.append(f'<rect x="{x + 1:.1f}" y="{top + ph - h_all:.1f}" width="{bw - 2:.1f}" height="{h_all:.1f}" '
                         f'class="on"><title>{edges[i]:.2f}-{edges[i + 1]:.2f}: {c_on[i]} on, {c_off[i]} off</title></rect>')
        if c_off[i]:
            parts.append(f'<rect x="{x + 1:.1f}" y="{top + ph - h_off:.1f}" width="{bw - 2:.1f}" height="{h_off:.1f}" '
                         f'class="off"/>')
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + pw * v
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle" class="l">{v:g}</text>')
    if floor > 0:
        x = left + pw * floor
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" class="floor"/>'
                     f'<text x="{x + 3:.1f}" y="{top + 10}" class="l">floor {floor:g}</text>')
    parts.append(f'<rect x="{left + pw - 170}" y="{h - 14}" width="10" height="10" class="on"/>'
                 f'<text x="{left + pw - 156}" y="{h - 5}" class="l">tag on</text>'
                 f'<rect x="{left + pw - 105}" y="{h - 14}" width="10" height="10" class="off"/>'
                 f'<text x="{left + pw - 91}" y="{h - 5}" class="l">under threshold</text>')
    parts.append(f'<text x="{left}" y="{h - 5}" class="l">score (count, log scale)</text>')
    parts.append("</svg>")
    return "".join(parts)


# -- page -----------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d2430;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
.muted{color:#687385}.kv{border-collapse:collapse;margin:8px 0}.kv td,.kv th{padding:3px 10px;border-bottom:1px solid #eef1f5;text-align:left;vertical-align:top}
.kv th{font-weight:600;color:#3b4556}.num{text-align:right;font-variant-numeric:tabular-nums}
.stats{display:flex;gap:12px;flex-wrap:wrap}.stat{border:1px solid #dde2ea;border-radius:6px;padding:8px 14px;min-width:96px}
.stat b{display:block;font-size:20px}.plots{display:flex;gap:24px;flex-wrap:wrap}
svg .t{font-weight:600;font-size:13px;fill:#1d2430}svg .l{font-size:11px;fill:#3b4556}svg .bar{fill:#3b82c4}
svg .on{fill:#e07b39}svg .off{fill:#9fb3c8}svg .grid{stroke:#eef1f5}svg .floor{stroke:#c0392b;stroke-dasharray:4 3}
.grid-cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px}
.card{border:1px solid #dde2ea;border-radius:6px;padding:8px;overflow:hidden}
.card .img{height:192px;display:flex;align-items:center;justify-content:center;background:#f4f6f9;border-radius:4px}
.card img{max-width:100%;max-height:192px}.nothumb{color:#687385;font-size:12px;padding:8px;text-align:center;word-break:break-word}.card .name{font-size:12px;word-break:break-all;margin:6px 0 2px}
.tag{display:inline-block;background:#fdebd9;border-radius:10px;padding:1px 7px;margin:2px 2px 0 0;font-size:12px}
.tag.near{background:#edf1f6;color:#5a6678}.tag i{font-style:normal;color:#8a5a2b;margin-left:3px}.tag.near i{color:#7b8698}
.errors{border-collapse:collapse;width:100%}.errors td,.errors th{border-bottom:1px solid #eef1f5;padding:3px 8px;text-align:left;vertical-align:top;font-size:12px}
.errors td.u{word-break:break-all;max-width:520px}.stage{font-weight:600}
"""


def _stat(label: str, value) -> str:
    return f'<div class="stat"><b>{_e(value)}</b><span class="muted">{_e(label)}</span></div>'


def _kv(rows: list[tuple[str, object]]) -> str:
    return '<table class="kv">' + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _card(row: dict, thumb: Thumb, near: int) -> str:
    scores = {s["tag"]: s["score"] for s in row.get("scores") or []}
    on = sorted(row.get("tags") or [], key=lambda t: -scores.get(t, 0.0))
    others = sorted((t for t in scores if t not in set(on)), key=lambda t: -scores[t])[:near]
    name = row["uri"].rsplit("/", 1)[-1]
    img = (f'<img src="{thumb.data_uri}" alt="{_e(name)}">' if thumb.data_uri
           else f'<span class="nothumb" title="{_e(thumb.problem or "")}">no thumbnail: '
                f'{_e((thumb.problem or "unknown").split(":")[0])}</span>')
    tags = "".join(f'<span class="tag">{_e(t)}<i>{scores.get(t, float("nan")):.2f}</i></span>' for t in on)
    if not on:
        tags = '<span class="muted">no tag over its threshold</span>'
    nearby = "".join(f'<span class="tag near">{_e(t)}<i>{scores[t]:.2f}</i></span>' for t in others)
    dims = f"{row.get('width')}\u00d7{row.get('height')}, {(row.get('size') or 0) / 1024:.0f} KiB"
    return (f'<div class="card"><div class="img">{img}</div><div class="name" title="{_e(row["uri"])}">{_e(name)}</div>'
            f'<div class="muted" style="font-size:11px">{_e(dims)}</div><div>{tags}</div><div>{nearby}</div></div>')


def _fmt_s(x) -> str:
    try:
        return f"{float(x):.1f} s"
    except (TypeError, ValueError):
        return "-"


def _changes_html(ch: Changes, cat: Catalog) -> list[str]:
    out = ["<h2>What this run changed</h2>"]
    for n in ch.notes:
        out.append(f'<p class="muted">{_e(n)}</p>')
    if not ch.tables:
        return out
    vs = "; ".join(f"{k} {', '.join(map(str, v)) or 'none'}" for k, v in ch.versions.items())
    before = cat.images - ch.added + ch.removed
    out.append(f'<p class="muted">From the change data feed of the run\'s commits (table versions: {_e(vs)}). '
               f'Images in the catalog: {before} before the run, + {ch.added} added, \u2212 {ch.removed} removed '
               f'= {cat.images} after it.</p>')
    out.append('<div class="stats">')
    for key, label in CATEGORIES:
        out.append(_stat(label, ch.images.get(key, 0)))
    out.append("</div>")
    out.append(_kv([(f"{kind} table", ", ".join(f"{v} {k}" for k, v in t.items())) for kind, t in ch.tables.items()]))
    rows = []
    for key, label in CATEGORIES:
        for r in ch.examples.get(key, []):
            what = []
            if "tags_before" in r and "tags" in r:
                old, new = set(r["tags_before"]), set(r["tags"])
                gained, lost = sorted(new - old), sorted(old - new)
                what.append(("+" + ", +".join(gained) if gained else "") + ("; " if gained and lost else "")
                            + ("\u2212" + ", \u2212".join(lost) if lost else "") or "same tags")
            elif "tags" in r:
                what.append(", ".join(r["tags"]) or "no tag over its threshold")
            elif "tags_before" in r:
                what.append("had: " + (", ".join(r["tags_before"]) or "no tag"))
            if r.get("error"):
                what.append(f"{r.get('stage')}: {r['error']}")
            rows.append(f'<tr><td class="stage">{_e(label)}</td><td class="u">{_e(r["uri"])}</td>'
                        f'<td>{_e(" | ".join(what))}</td></tr>')
    if rows:
        out.append(f'<table class="errors"><tr><th>change</th><th>image</th><th>tags / error</th></tr>{"".join(rows)}'
                   f'</table><p class="muted">Up to {EXAMPLES} examples of each kind, by uri.</p>')
    return out


def render(run: Run, rows: list[dict], thumbs: list[Thumb], errors, *, sample_n: int, seed: int,
           max_errors: int = 500, near: int = 3, top_tags: int = 25, catalog: Optional[Catalog] = None,
           changes: Optional[Changes] = None) -> str:
    m = run.manifest
    counts = counts_of(m)  # older manifests' names too
    floor = run.score_floor or 0.0
    catalog = catalog or catalog_state(run, errors)
    freq = Counter(t for r in rows for t in (r.get("tags") or []))
    on_scores, off_scores = [], []
    for r in rows:
        on = set(r.get("tags") or [])
        for s in r.get("scores") or []:
            (on_scores if s["tag"] in on else off_scores).append(s["score"])
    per_image = [len(r.get("tags") or []) for r in rows]

    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>RAM++ run {_e(run.run_id)}</title><style>{STYLE}</style></head><body>"]
    out.append(f"<h1>RAM++ tagging run {_e(run.run_id)}</h1>")
    out.append(f'<div class="muted">{_e(m.get("status", "?"))} \u00b7 {_e(m.get("started_at", ""))} \u2192 '
               f'{_e(m.get("finished_at", ""))} \u00b7 output {_e(run.output)}</div>')

    out.append("<h2>Catalog after this run</h2>")
    out.append(f'<p class="muted">The tables as the run left them (tags version {catalog.versions.get("tags")}, '
               f'errors version {catalog.versions.get("errors")}): every listed image is in exactly one of them, '
               'including images earlier runs tagged and this one kept.</p><div class="stats">')
    for label, value in (("images in the catalog", catalog.images), ("with tags", catalog.tagged),
                         ("with errors", catalog.errors)):
        out.append(_stat(label, value))
    out.append("</div>")
    out.append(_kv([("errors by stage", ", ".join(f"{k}: {v}" for k, v in catalog.errors_by_stage.items()) or "none"),
                    ("score floor", f"scores kept at or over {floor:g}")]))

    if changes is not None:
        out.extend(_changes_html(changes, catalog))

    out.append("<h2>This run's work</h2><div class=\"stats\">")
    ips = m.get("images_per_s")
    for label, value in (("listed", counts.get("listed", "-")), ("tagged", counts.get("tagged", "-")),
                         ("errors", counts.get("errors", "-")), ("not images", counts.get("not_images", "-")),
                         ("images/s", f"{ips:.1f}" if isinstance(ips, (int, float)) else "-"),
                         ("total time", _fmt_s((m.get("timings_s") or {}).get("total")))):
        out.append(_stat(label, value))
    out.append("</div>")
    res = m.get("resources") or {}
    by_stage = counts.get("errors_by_stage") or {}
    timings = m.get("timings_s") or {}
    inc = counts.get("incremental") or {}
    out.append(_kv([
        ("inputs", ", ".join(m.get("inputs") or [])),
        ("checkpoint", m.get("checkpoint", "-")),
        ("model_id", m.get("model_id", "-")), ("vocab_id", m.get("vocab_id", "-")),
        ("vocabulary", f"{(m.get('vocabulary') or {}).get('tags', '-')} tags"),
        ("plan", ", ".join(f"{k} {v}" for k, v in inc.items() if k != "mode") or "-"),
        ("errors by stage (this run)", ", ".join(f"{k}: {v}" for k, v in sorted(by_stage.items())) or "none"),
        ("invariant", "ok" if (m.get("invariant") or {}).get("ok") else (m.get("invariant") or {}).get("detail", "-")),
        ("resources", f"{res.get('actors', '-')} {res.get('device', '')} actor(s), {res.get('cluster_cpus', '-')} CPUs, "
                      f"{res.get('cluster_gpus', '-')} GPUs on {res.get('nodes', '-')} node(s)"),
        ("timings", ", ".join(f"{k} {_fmt_s(v)}" for k, v in timings.items())),
    ]))

    shown = len(rows)
    out.append(f"<h2>Sample: {shown} of {catalog.tagged} tagged images</h2>")
    out.append(f'<p class="muted">Chosen at random over the tags table with seed {seed} (asked for {sample_n}). Plots '
               f'and tag counts below are over this sample. Tags per image: mean '
               f'{np.mean(per_image) if per_image else 0:.1f}, median {np.median(per_image) if per_image else 0:.0f}, '
               f'max {max(per_image) if per_image else 0}.</p>')
    out.append('<div class="plots">')
    out.append(svg_bars(freq.most_common(top_tags), f"Most frequent tags (images of {shown})", shown))
    out.append(svg_histogram(np.asarray(on_scores, np.float64), np.asarray(off_scores, np.float64), floor,
                             "Scores kept for the sample"))
    out.append("</div>")
    out.append('<p class="muted">Orange: tags over their threshold, with scores. Grey: the next highest scores '
               'under threshold.</p>')
    out.append('<div class="grid-cards">')
    for r, t in zip(rows, thumbs):
        out.append(_card(r, t, near))
    out.append("</div>")

    n_err = errors.num_rows
    out.append(f"<h2>Errors: {n_err} image(s) not tagged</h2>")
    if n_err:
        err_rows = sorted(zip(errors.column("stage").to_pylist(), errors.column("uri").to_pylist(),
                              errors.column("error").to_pylist()), key=lambda x: tuple(v or "" for v in x))
        reasons = Counter((s, (e or "").split(":")[0][:80]) for s, _, e in err_rows)
        out.append(_kv([(f"{s}: {why}", f"{c} image(s)") for (s, why), c in reasons.most_common(12)]))
        out.append('<table class="errors"><tr><th>stage</th><th>image</th><th>reason</th></tr>')
        for s, u, e in err_rows[:max_errors]:
            out.append(f'<tr><td class="stage">{_e(s)}</td><td class="u">{_e(u)}</td><td>{_e(e)}</td></tr>')
        out.append("</table>")
        if n_err > max_errors:
            out.append(f'<p class="muted">{n_err - max_errors} more error rows not shown.</p>')
    else:
        out.append('<p class="muted">Every image in the catalog is tagged.</p>')
    out.append(f'<p class="muted">Generated {_e(datetime.now(timezone.utc).isoformat(timespec="seconds"))} by '
               f'jobs/report.py from {_e(run.output)} (run {_e(run.run_id)}).</p></body></html>')
    return "\n".join(out)


def build_report(output: str, run_id: Optional[str] = None, *, sample: int = 48, seed: int = 0,
                 storage: Optional[Storage] = None, thumb_px: int = 192, max_errors: int = 500,
                 threads: int = 8) -> str:
    storage = storage or Storage()
    run = open_run(output, run_id, storage)
    rows = sample_rows(run, sample, seed)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        thumbs = list(pool.map(lambda r: thumbnail(r["uri"], storage, thumb_px), rows))
    errors = read_errors(run)
    return render(run, rows, thumbs, errors, sample_n=sample, seed=seed, max_errors=max_errors,
                  catalog=catalog_state(run, errors), changes=run_changes(run))
