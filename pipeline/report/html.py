"""The report page: one self-contained HTML file rendered from report.json's dict with jinja2.

CONTRACT (a browser test relies on it; keep it when editing the template):
- Every number the page shows that comes from report.json sits in an element with the attribute
  `data-key="<dotted path into report.json>"` (list indices as numbers, e.g. `scores.predicted_iou.median`,
  `gallery.0.review_priority`), whose text content is exactly `format_number(value)` of the value at that path.
  The template can only show such numbers through `num(path)`, which looks the value up and writes both.
- Every image is an <img> whose src is a `data:image/png;base64,...` URI; nothing is loaded from elsewhere
  (no http(s) src or href, no scripts, no stylesheets but the inline one), so the file opens offline.
- No JavaScript at all (so no console errors).
- The page title contains "masklet report".
- On a run made with random weights the page starts with `<div id="random-weights-banner">`, and nowhere calls
  its masks results.
"""
from __future__ import annotations

import base64
import math

import jinja2
from markupsafe import Markup, escape

__all__ = ["format_number", "lookup", "render"]


def format_number(value) -> str:
    """How the page writes a number from report.json (the contract's one definition):
    None -> "n/a"; bool -> "yes"/"no"; int -> thousands separated ("12,345"); float: 0 -> "0",
    |x| >= 1000 -> no decimals, thousands separated ("12,346"); |x| >= 1 -> two decimals ("3.14");
    |x| < 1 -> three significant digits ("0.761", "0.0123"); NaN/inf (never in report.json) -> "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    x = float(value)
    if not math.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def lookup(data, path: str):
    """The value at a dotted path (list indices as numbers) of report.json's dict."""
    node = data
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>masklet report: {{ report.run.root }}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: 2px 10px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
#random-weights-banner { background: #b00020; color: #fff; padding: 12px 16px; font-weight: bold; font-size: 1.1em; }
.alert { color: #b00020; } .ok { color: #2e7d32; } .note { color: #666; font-size: .9em; }
.strip { display: flex; gap: 6px; flex-wrap: wrap; } figure { margin: 0; } figcaption { font-size: .8em; color: #555; }
.masklet { border: 1px solid #ddd; padding: 8px; margin: 10px 0; }
</style>
</head>
<body>
{% if report.run.random_weights %}
<div id="random-weights-banner">RANDOM WEIGHTS: this run was made with a model of random weights. Its masks are a
plumbing check of the pipeline and not results; do not use them as annotations.</div>
{% endif %}
<h1>masklet report</h1>
<p>Run <code>{{ report.run.root }}</code>, generated {{ report.run.generated_at }}.
{% if report.run.in_flight %}<strong>The run is in flight:</strong> this page shows the items committed so far.{% endif %}</p>
<table>
<tr><th>items planned</th><td>{{ num("run.items_planned") }}</td></tr>
<tr><th>done</th><td>{{ num("run.items_done") }}</td></tr>
<tr><th>failed</th><td>{{ num("run.items_failed") }}</td></tr>
<tr><th>pending</th><td>{{ num("run.items_pending") }}</td></tr>
<tr><th>masklets</th><td>{{ num("run.masklets") }}</td></tr>
<tr><th>frames segmented</th><td>{{ num("run.frames_done") }}</td></tr>
<tr><th>shards with commits / planned</th><td>{{ num("run.shards_committed") }} / {{ num("run.shards_planned") }}</td></tr>
<tr><th>finished between</th><td>{{ report.run.first_finished_at or "n/a" }} and {{ report.run.last_finished_at or "n/a" }}</td></tr>
</table>

<h2>Alerts</h2>
{% if report.alerts %}<ul>
{% for a in report.alerts %}<li class="alert">{{ a.kind }}: {{ a.message }} (value {{ num("alerts.%d.value" % loop.index0) }},
limit {{ num("alerts.%d.limit" % loop.index0) }})</li>
{% endfor %}</ul>{% else %}<p class="ok">No alert: every budget of qa.* is met.</p>{% endif %}

<h2>Throughput</h2>
{{ chart("throughput") }}
{{ chart("latency_over_time") }}

<h2>Time per frame and per item</h2>
<p class="note">ms per frame = seconds of the stage x 1000 / frames of the item, over done items; percentiles exact.</p>
<table><tr><th>stage</th><th>items</th><th>p50 ms/frame</th><th>p95</th><th>p99</th><th>p50 s/item</th><th>p95 s/item</th></tr>
{% for s in stages %}<tr><td>{{ s }}</td><td>{{ num("latency.per_frame_ms.%s.all.count" % s) }}</td>
<td>{{ num("latency.per_frame_ms.%s.all.p50" % s) }}</td><td>{{ num("latency.per_frame_ms.%s.all.p95" % s) }}</td>
<td>{{ num("latency.per_frame_ms.%s.all.p99" % s) }}</td><td>{{ num("latency.per_item_s.%s.p50" % s) }}</td>
<td>{{ num("latency.per_item_s.%s.p95" % s) }}</td></tr>
{% endfor %}</table>
<table><tr><th>resolution (shorter side)</th><th>items</th><th>p50 ms/frame</th><th>p95</th><th>p99</th><th>budget (ms)</th></tr>
{% for b in report.latency.buckets %}{% set k = "latency.per_frame_ms.total.by_bucket." ~ b.name %}
<tr><td>{{ b.name }}</td><td>{{ num(k ~ ".count") }}</td><td>{{ num(k ~ ".p50") }}</td><td>{{ num(k ~ ".p95") }}</td>
<td>{{ num(k ~ ".p99") }}</td><td>{{ num("thresholds.frame_budget_ms") }}</td></tr>
{% endfor %}</table>
{{ chart("latency") }}

<h2>Scores of the masklets</h2>
<p class="note">object_score_mean is SAM 2's object-presence logit, shown as sigmoid(logit). Drift: Kolmogorov-Smirnov D
between the masklets of the first {{ num("drift.early_items") }} and the latest {{ num("drift.late_items") }} done items.</p>
<table><tr><th>score</th><th>masklets</th><th>median</th><th>share below qa.low_score</th><th>median, first tenth</th>
<th>median, latest tenth</th><th>drift D</th></tr>
{% for s in scores %}<tr><td>{{ s }}</td><td>{{ num("scores.%s.count" % s) }}</td><td>{{ num("scores.%s.median" % s) }}</td>
<td>{{ num("scores.%s.share_below_low" % s) }}</td><td>{{ num("scores.%s.early_median" % s) }}</td>
<td>{{ num("scores.%s.late_median" % s) }}</td><td>{{ num("scores.%s.drift_early_late" % s) }}</td></tr>
{% endfor %}</table>
{{ chart("scores") }}

<h2>Devices and shards</h2>
<table><tr><th>device</th><th>done</th><th>failed</th><th>p50 ms/frame</th><th>p95</th>{% for s in scores %}<th>D {{ s }}</th>{% endfor %}</tr>
{% for d in report.by_device %}{% set i = loop.index0 %}<tr><td>{{ d.device or "(none)" }}</td><td>{{ num("by_device.%d.items_done" % i) }}</td>
<td>{{ num("by_device.%d.items_failed" % i) }}</td><td>{{ num("by_device.%d.frame_ms.p50" % i) }}</td>
<td>{{ num("by_device.%d.frame_ms.p95" % i) }}</td>{% for s in scores %}<td>{{ num("by_device.%d.drift.%s" % (i, s)) }}</td>{% endfor %}</tr>
{% endfor %}</table>
<p class="note">The {{ slow_shards|length }} shard(s) with the slowest p95 time per frame (all shards are in report.json):</p>
<table><tr><th>shard</th><th>done</th><th>failed</th><th>masklets</th><th>p50 ms/frame</th><th>p95</th>{% for s in scores %}<th>D {{ s }}</th>{% endfor %}</tr>
{% for i in slow_shards %}<tr><td>{{ num("by_shard.%d.shard_id" % i) }}</td><td>{{ num("by_shard.%d.items_done" % i) }}</td>
<td>{{ num("by_shard.%d.items_failed" % i) }}</td><td>{{ num("by_shard.%d.masklets" % i) }}</td>
<td>{{ num("by_shard.%d.frame_ms.p50" % i) }}</td><td>{{ num("by_shard.%d.frame_ms.p95" % i) }}</td>
{% for s in scores %}<td>{{ num("by_shard.%d.drift.%s" % (i, s)) }}</td>{% endfor %}</tr>
{% endfor %}</table>

<h2>Failures and retries</h2>
<p>Failed items: {{ num("failures.items_failed") }} (rate {{ num("failures.failure_rate") }});
retried (attempts &gt; 1): {{ num("failures.retried") }} (share {{ num("failures.retried_share") }}).</p>
{% if report.failures.by_kind %}<table><tr><th>kind</th><th>items</th><th>share</th><th>example</th></tr>
{% for k in report.failures.by_kind %}<tr><td>{{ k.kind }}</td><td>{{ num("failures.by_kind.%d.count" % loop.index0) }}</td>
<td>{{ num("failures.by_kind.%d.share" % loop.index0) }}</td><td style="text-align:left">{{ k.example }}</td></tr>
{% endfor %}</table>{% endif %}
{{ chart("failures") }}

<h2>Masklets: count, size, length, flags, coverage</h2>
<table><tr><th></th><th>mean</th><th>p50</th><th>p95</th><th>p99</th></tr>
<tr><td>masklets per done item</td><td>{{ num("masklets_per_item.mean") }}</td><td>{{ num("masklets_per_item.p50") }}</td>
<td>{{ num("masklets_per_item.p95") }}</td><td>{{ num("masklets_per_item.p99") }}</td></tr>
<tr><td>coverage, mean per item</td><td>{{ num("coverage.mean.mean") }}</td><td>{{ num("coverage.mean.p50") }}</td>
<td>{{ num("coverage.mean.p95") }}</td><td>{{ num("coverage.mean.p99") }}</td></tr>
<tr><td>coverage, min per item</td><td>{{ num("coverage.min.mean") }}</td><td>{{ num("coverage.min.p50") }}</td>
<td>{{ num("coverage.min.p95") }}</td><td>{{ num("coverage.min.p99") }}</td></tr>
</table>
{{ chart("shapes") }}
<table><tr><th>flag</th><th>masklets</th></tr>
{% for f in report.flags.counts %}<tr><td>{{ f }}</td><td>{{ num("flags.counts." ~ f) }}</td></tr>{% endfor %}
<tr><td>no flag</td><td>{{ num("flags.unflagged") }}</td></tr>
<tr><td>not flagged (no signals)</td><td>{{ num("flags.not_flagged_yet") }}</td></tr>
</table>
{{ chart("flags") }}

<h2>Highest review priority</h2>
{% if not report.gallery %}<p class="note">{{ gallery_note }}</p>{% endif %}
{% for g in report.gallery %}{% set i = loop.index0 %}
<div class="masklet"><strong>{{ g.masklet_id }}</strong> priority {{ num("gallery.%d.review_priority" % i) }};
flags: {{ g.flags|join(", ") if g.flags else "none" }}; predicted IoU {{ num("gallery.%d.predicted_iou" % i) }},
stability {{ num("gallery.%d.stability_score" % i) }}, object score {{ num("gallery.%d.object_score_mean" % i) }},
lowest frame IoU {{ num("gallery.%d.iou_min" % i) }}, frames visible {{ num("gallery.%d.frames_visible" % i) }}
{% if g.note %}<div class="note">{{ g.note }}</div>{% endif %}
<div class="strip">{% for f in g.frames %}<figure><img alt="{{ g.masklet_id }} frame {{ f.t }}" src="{{ images[i][loop.index0] }}">
<figcaption>frame {{ num("gallery.%d.frames.%d.t" % (i, loop.index0)) }}: {{ f.role }}</figcaption></figure>{% endfor %}</div>
</div>
{% endfor %}
<p class="note">Every number on this page is in report.json beside it, at the path in its data-key attribute.</p>
</body>
</html>
"""


def render(report: dict, charts: dict[str, bytes | None], images: list[list[bytes]], gallery_note: str = "",
           slow_shards: int = 20) -> str:
    """The page for `report` (report.json's dict), with `charts` (name -> PNG or None) and the gallery's PNGs
    (`images[i][k]`: masklet i, frame k)."""
    def num(path: str) -> Markup:
        return Markup(f'<span data-key="{escape(path)}">{escape(format_number(lookup(report, path)))}</span>')

    def chart(name: str) -> Markup:
        data = charts.get(name)
        if not data:
            return Markup("")
        return Markup(f'<p><img alt="{escape(name)}" src="{data_uri(data)}"></p>')

    shards = report["by_shard"]
    order = sorted(range(len(shards)), key=lambda i: -(shards[i]["frame_ms"]["p95"] or -1))[:slow_shards]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    from pipeline.quality.health import SCORES, STAGES

    return env.from_string(TEMPLATE).render(
        report=report, num=num, chart=chart, stages=STAGES, scores=SCORES, slow_shards=order,
        images=[[data_uri(b) for b in imgs] for imgs in images], gallery_note=gallery_note)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
