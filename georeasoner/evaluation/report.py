"""``report.html``: one self-contained page (figures and thumbnails inlined, no network requests).

Panels: the metrics table with the baseline beside it, a locatability histogram with the curation
threshold, the most and least locatable images, a country confusion matrix, a world map of predictions
vs truth (lines for errors), a reliability diagram, and example answers with their reasons. An image the
report cannot read (e.g. in a bucket this machine cannot reach) shows as a placeholder: the metrics never need it.
"""

from __future__ import annotations

import base64
import html
import io
from functools import lru_cache
from typing import Any

import numpy as np

from georeasoner.core import storage
from georeasoner.core.images import decode_image, resize_center_crop
from georeasoner.evaluation.metrics_table import reasoning_rows
from georeasoner.metrics import THRESHOLDS_KM

THUMB = 112


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Thumbnails:
    """Inlined thumbnails for the report's panels, or a placeholder where an image cannot be read.

    The metrics never need pixels, so an image the report cannot fetch (a bucket this machine cannot reach, no
    credentials, a missing or broken file) becomes a placeholder and is counted, never an error. Reads use the
    storage layer's quick mode, and once a bucket fails for a reason beyond one missing object (unreachable
    endpoint, no credentials, no such bucket, access denied) its other images are not tried again.
    """

    def __init__(self) -> None:
        self.unreadable: dict[str, str] = {}  # image_uri -> why
        self._down: dict[str, str] = {}  # bucket (or local) -> why every read there fails
        self._cache: dict[str, str | None] = {}

    @staticmethod
    def _store(uri: str) -> str | None:
        """The bucket an S3 image lies in (local files are judged one by one)."""
        if not storage.is_s3(uri):
            return None
        bucket = str(uri)[len("s3://"):].partition("/")[0]
        return f"s3://{bucket}" if bucket else None

    def src(self, uri: str) -> str | None:
        """A ``data:`` URI of the image's thumbnail, or None (recorded in :attr:`unreadable`)."""
        if uri in self._cache:
            return self._cache[uri]
        self._cache[uri] = out = self._read(uri)
        return out

    def _read(self, uri: str) -> str | None:
        store = self._store(uri)
        if store in self._down:
            self.unreadable[uri] = self._down[store]
            return None
        try:
            img = resize_center_crop(decode_image(storage.read_bytes(uri, quick=True)), THUMB)
        except ValueError as exc:  # ImageError (not an image, truncated, too many pixels) or a URI naming no bucket
            self.unreadable[uri] = str(exc)
            return None
        except storage.read_errors() as exc:
            why = f"{type(exc).__name__}: {exc}"
            self.unreadable[uri] = why
            if store is not None and not storage.is_missing_object(exc):
                self._down[store] = why
            return None
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()

    def img(self, uri: str) -> str:
        """An ``<img>`` of the thumbnail, or a placeholder box saying why there is none."""
        src = self.src(uri)
        if src is not None:
            return f'<img src="{src}" width="{THUMB}" height="{THUMB}" alt="">'
        why = html.escape(self.unreadable.get(uri, "unreadable"), quote=True)
        return (f'<div class="noimage" title="{html.escape(uri, quote=True)}: {why}">image not readable'
                f"<br><small>{html.escape(storage.basename(uri))}</small></div>")

    def notice(self) -> str:
        """One paragraph for the page when some images could not be shown (empty otherwise)."""
        if not self.unreadable:
            return ""
        reasons = sorted(set(self._down.values())) or sorted(set(self.unreadable.values()))[:3]
        return (f'<p id="unreadable-images" class="notice">{len(self.unreadable)} image(s) could not be read for this '
                f"report and show as placeholders (the metrics do not use pixels): "
                f"{html.escape('; '.join(r[:300] for r in reasons))}</p>")


@lru_cache(maxsize=1)
def _world_outline() -> list[np.ndarray]:
    """Country rings (lon, lat) from the packaged Natural Earth polygons, thinned for drawing."""
    import pyarrow.parquet as pq

    from georeasoner.geo.countries import DATA

    t = pq.read_table(DATA, columns=["x", "y"], use_threads=False)
    rings = []
    for xs, ys in zip(t.column("x").to_pylist(), t.column("y").to_pylist()):
        if len(xs) < 20:
            continue
        step = max(1, len(xs) // 200)
        rings.append(np.column_stack([xs[::step], ys[::step]]))
    return rings


def metrics_table_html(results: dict[str, dict]) -> str:
    names = list(results)
    rows = [("images", lambda m: f"{m['n']}")]
    for key in ("country", "city"):
        for stat in ("accuracy", "recall", "f1"):
            rows.append((f"{key} {stat}", (lambda k, s: lambda m: f"{m[k][s]:.3f}")(key, stat)))
    rows += [(f"within {r} km", (lambda r: lambda m: f"{m['distance'][f'acc_{r}km']:.3f}")(r)) for r in THRESHOLDS_KM]
    rows += [("GeoScore (all images)", lambda m: f"{m['distance']['geoscore']:.1f}"),
             ("GeoScore (answered)", lambda m: "–" if m["distance"]["geoscore_answered"] is None else f"{m['distance']['geoscore_answered']:.1f}"),
             ("median km (answered)", lambda m: "–" if m["distance"]["median_km"] is None else f"{m['distance']['median_km']:.0f}")]
    rows += reasoning_rows(results, none="–")
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(f"<tr><td>{label}</td>" + "".join(f"<td>{fn(results[n])}</td>" for n in names) + "</tr>" for label, fn in rows)
    return f'<table id="metrics"><tr><th>metric</th>{head}</tr>{body}</table>'


def histogram_png(scores: np.ndarray, threshold: float) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(scores, bins=30, range=(0, 1), color="#4c72b0")
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"curation threshold {threshold:g}")
    kept = float(np.mean(scores >= threshold)) if scores.size else 0.0
    ax.set(xlabel="locatability", ylabel="images", title=f"Locatability ({kept:.0%} kept)")
    ax.legend()
    return _png(fig)


def confusion_png(truth: list[str | None], pred: list[str | None]) -> str:
    import matplotlib.pyplot as plt

    labels = sorted({t for t in truth if t})
    index = {c: i for i, c in enumerate(labels)}
    mat = np.zeros((len(labels), len(labels) + 1))
    for t, p in zip(truth, pred):
        if t in index:
            mat[index[t], index.get(p, len(labels))] += 1
    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(labels), 1 + 0.4 * len(labels)))
    ax.imshow(mat / np.maximum(mat.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels) + 1), labels + ["none"], rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted country", ylabel="true country", title="Country confusion (row-normalised)")
    return _png(fig)


def map_png(truth: list[dict], preds: list[dict]) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    fig, ax = plt.subplots(figsize=(10, 5))
    ax.add_collection(LineCollection(_world_outline(), colors="#999999", linewidths=0.3))
    lines, tl, pl = [], [], []
    for t, p in zip(truth, preds):
        if t.get("lat") is None:
            continue
        tl.append((t["lon"], t["lat"]))
        try:
            la, lo = float(p.get("lat")), float(p.get("lon"))
        except (TypeError, ValueError):
            continue
        if np.isfinite(la) and np.isfinite(lo):
            pl.append((lo, la))
            lines.append([(t["lon"], t["lat"]), (lo, la)])
    ax.add_collection(LineCollection(lines, colors="#c44e52", linewidths=0.4, alpha=0.5, label="error"))
    if tl:
        ax.scatter(*zip(*tl), s=10, c="#2ca02c", label="truth", zorder=3)
    if pl:
        ax.scatter(*zip(*pl), s=6, c="#1f77b4", label="prediction", zorder=3)
    ax.set(xlim=(-180, 180), ylim=(-60, 85), title="Predictions vs truth")
    ax.set_aspect("equal")
    ax.legend(loc="lower left")
    return _png(fig)


def reliability_png(calibration: dict[str, Any] | None) -> str | None:
    import matplotlib.pyplot as plt

    if not calibration or not calibration.get("reliability"):
        return None
    rel = calibration["reliability"]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "--", color="#999999")
    ax.bar([r["confidence"] for r in rel], [r["accuracy"] for r in rel], width=0.08, alpha=0.7, color="#4c72b0")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="country accuracy",
           title=f"Reliability (ECE {calibration['ece']:.3f})")
    return _png(fig)


def _grid(rows: list[dict], caption, thumbs: Thumbnails) -> str:
    cells = [f'<figure>{thumbs.img(r["image_uri"])}<figcaption>{html.escape(caption(r))}</figcaption></figure>'
             for r in rows]
    return '<div class="grid">' + "".join(cells) + "</div>"


def reasons_html(reasons: str | None, present: list[str] | None, catalogue) -> str:
    """The reasons, each sentence marked with the clue it cites: present in the image (✓), absent (✗), or
    citing no known clue (plain)."""
    if not reasons:
        return "<i>no reasons</i>"
    if catalogue is None or present is None:
        return f"<i>{html.escape(str(reasons)[:600])}</i>"
    from georeasoner.metrics.grounding import marked

    out = []
    for sentence, clue, ok in marked(catalogue, reasons, present):
        text = html.escape(sentence)
        if clue is None:
            out.append(f'<span class="nocite">{text}</span>')
        else:
            mark, cls, word = ("✓", "present", "present") if ok else ("✗", "absent", "absent")
            out.append(f'<span class="{cls}" title="{html.escape(clue)}: {word} in the image">{mark} {text} '
                       f'<small>[{html.escape(clue)}: {word}]</small></span>')
    return "<br>".join(out)


def render_report(name: str, results: dict[str, dict], truth: list[dict], preds: list[dict],
                  scores: dict[str, float] | None, threshold: float, n_examples: int = 8,
                  catalogue=None, model_version: str | None = None, thumbs: Thumbnails | None = None) -> str:
    """The whole page as one HTML string; ``thumbs`` (when given) records the images that could not be shown."""
    from georeasoner.metrics.location import resolve_countries

    thumbs = thumbs if thumbs is not None else Thumbnails()
    main = results[name]
    version = f"<p>model version <code>{html.escape(model_version)}</code></p>" if model_version else ""
    parts = [f"<h1>GeoReasoner evaluation: {html.escape(name)}</h1>", version, "<h2>Metrics</h2>",
             metrics_table_html(results)]
    if scores:
        values = np.array(list(scores.values()), dtype=float)
        ranked = sorted((r for r in truth if r["image_uri"] in scores), key=lambda r: -scores[r["image_uri"]])
        parts += ["<h2>Locatability</h2>", f'<img id="histogram" src="{histogram_png(values, threshold)}" alt="histogram">',
                  "<h3>Most locatable</h3>", _grid(ranked[:8], lambda r: f"{r.get('country')} {scores[r['image_uri']]:.2f}", thumbs),
                  "<h3>Least locatable</h3>", _grid(ranked[-8:], lambda r: f"{r.get('country')} {scores[r['image_uri']]:.2f}", thumbs)]
    pred_cc = resolve_countries([p.get("country") for p in preds], [p.get("lat") for p in preds], [p.get("lon") for p in preds])
    parts += ["<h2>Countries</h2>", f'<img id="confusion" src="{confusion_png([t.get("country") for t in truth], pred_cc)}" alt="confusion">',
              "<h2>Map</h2>", f'<img id="map" src="{map_png(truth, preds)}" alt="map">']
    rel = reliability_png(main.get("calibration"))
    if rel:
        parts += ["<h2>Calibration</h2>", f'<img id="reliability" src="{rel}" alt="reliability">']
    examples = [(t, p) for t, p in zip(truth, preds) if p.get("reasons") or p.get("country")][:n_examples]
    if examples:
        parts.append("<h2>Example answers</h2>")
        for t, p in examples:
            conf = p.get("confidence")
            conf = f"{float(conf):.2f}" if isinstance(conf, (int, float)) and conf == conf else "–"
            clues = t.get("clues") if isinstance(t.get("clues"), list) else None
            shown = (f"<br><small>clues in the image: {html.escape(', '.join(clues) or 'none')}</small>"
                     if clues is not None and catalogue is not None else "")
            parts.append(
                f'<div class="example">{thumbs.img(t["image_uri"])}'
                f"<p><b>truth</b> {html.escape(str(t.get('country')))}, {html.escape(str(t.get('city')))}<br>"
                f"<b>answer</b> {html.escape(str(p.get('country')))}, {html.escape(str(p.get('city')))}"
                f" (confidence {conf})<br>"
                f"{reasons_html(p.get('reasons'), clues, catalogue)}{shown}</p></div>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             ".grid{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;font-size:11px;text-align:center}"
             ".example{display:flex;gap:12px;align-items:flex-start;margin:8px 0}"
             ".present{color:#1a7f37}.absent{color:#c0392b}.nocite{color:#666}small{color:#666}"
             f".noimage{{width:{THUMB}px;height:{THUMB}px;flex:none;box-sizing:border-box;border:1px dashed #999;"
             "background:#eee;color:#666;font-size:11px;display:flex;flex-direction:column;align-items:center;"
             "justify-content:center;text-align:center;overflow:hidden;word-break:break-all}"
             ".notice{background:#fff4e5;border-left:4px solid #e69500;padding:6px 10px}")
    parts.insert(2, thumbs.notice())  # under the title, once every panel has tried its images
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>GeoReasoner evaluation</title>'
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
