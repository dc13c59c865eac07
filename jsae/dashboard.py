"""A self-contained HTML page of feature dashboards (the document `jsae inspect` writes as JSON).

Everything is inline: the data as a JSON script element, the CSS and the JavaScript that draws
each latent (its numbers, activation histogram, promoted and suppressed tokens, top contexts and
quantile examples). Nothing is fetched when the page is viewed. Text from the data reaches the
page only through textContent / attributes, never as markup.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["render_dashboard"]

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; display: flex; color: #222; background: #fff; }
#nav { width: 190px; height: 100vh; overflow-y: auto; border-right: 1px solid #ddd; position: sticky; top: 0;
       flex: none; background: #fafafa; }
#nav a { display: block; padding: 2px 10px; color: #225; text-decoration: none; font-family: monospace; }
#nav a.current { background: #ffe2c4; font-weight: bold; }
#main { padding: 12px 20px; flex: 1; min-width: 0; }
h1 { font-size: 18px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 18px 0 6px; }
.meta { color: #555; margin-bottom: 10px; }
table.nums td { padding: 1px 12px 1px 0; }
.cols { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
table.logits td { padding: 0 8px 0 0; font-family: monospace; }
.ctx { font-family: monospace; white-space: pre; margin: 2px 0; overflow-x: auto; }
.ctx .val { display: inline-block; width: 70px; color: #555; }
.tok { border-radius: 2px; padding: 0 1px; }
.tok.centre { outline: 1px solid #a33; }
.pos { color: #070; } .neg { color: #a00; }
svg text { font: 10px sans-serif; fill: #444; }
"""

_JS = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("jsae-data").textContent);
function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function fmt(x) { return Math.abs(x) >= 100 || x === 0 ? x.toFixed(1) : x.toPrecision(3); }
function shown(t) { return t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }
function colour(v, max) {
  const a = max > 0 ? Math.max(0, Math.min(1, v / max)) : 0;
  return "rgba(255, 120, 0, " + a.toFixed(3) + ")";
}
function context(ex, max) {
  const line = el("div", {"class": "ctx"});
  line.appendChild(el("span", {"class": "val"}, fmt(ex.value)));
  ex.tokens.forEach((t, i) => {
    const span = el("span", {"class": i === ex.centre ? "tok centre" : "tok",
                             "title": "token " + ex.token_ids[i] + ": " + ex.activations[i]}, shown(t));
    span.style.background = colour(ex.activations[i], max);
    line.appendChild(span);
  });
  return line;
}
function histogram(lat) {
  const ns = "http://www.w3.org/2000/svg", w = 420, h = 120, edges = DATA.histogram_log10_edges;
  const counts = lat.histogram, top = Math.max(1, ...counts), bw = w / counts.length;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w + 40); svg.setAttribute("height", h + 30);
  counts.forEach((c, i) => {
    const r = document.createElementNS(ns, "rect"), bh = h * c / top;
    r.setAttribute("x", 30 + i * bw); r.setAttribute("y", h - bh + 5);
    r.setAttribute("width", Math.max(bw - 1, 1)); r.setAttribute("height", bh);
    r.setAttribute("fill", "#e8842c");
    const tip = document.createElementNS(ns, "title");
    tip.textContent = "10^" + edges[i].toFixed(2) + " to 10^" + edges[i + 1].toFixed(2) + ": " + c;
    r.appendChild(tip); svg.appendChild(r);
  });
  for (let i = 0; i < edges.length; i += Math.max(1, Math.round((edges.length - 1) / 6))) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", 30 + i * bw - 8); t.setAttribute("y", h + 20);
    t.textContent = "1e" + edges[i].toFixed(0);
    svg.appendChild(t);
  }
  return svg;
}
function logitTable(title, rows, cls) {
  const box = el("div");
  box.appendChild(el("h2", {}, title));
  const table = el("table", {"class": "logits"});
  for (const r of rows) {
    const tr = el("tr");
    tr.appendChild(el("td", {}, JSON.stringify(r.token)));
    tr.appendChild(el("td", {"class": cls}, (r.logit >= 0 ? "+" : "") + r.logit.toFixed(3)));
    table.appendChild(tr);
  }
  box.appendChild(table);
  return box;
}
function show(position) {
  const lat = DATA.latents[position], main = document.getElementById("main");
  main.replaceChildren();
  document.querySelectorAll("#nav a").forEach((a, i) => a.classList.toggle("current", i === position));
  main.appendChild(el("h1", {}, "Latent " + lat.index));
  const meta = el("div", {"class": "meta"},
    DATA.model_name + " " + DATA.hook_name + ", " + DATA.n_tokens.toLocaleString("en") + " held-out tokens of " +
    DATA.dataset_path + " ");
  if (lat.neuronpedia_url) meta.appendChild(el("a", {"href": lat.neuronpedia_url}, "Neuronpedia"));
  main.appendChild(meta);
  const nums = el("table", {"class": "nums"});
  for (const [k, v] of [["density", (100 * lat.density).toPrecision(3) + "% (" + lat.n_fired + " tokens)"],
                        ["max activation", fmt(lat.max_activation)], ["mean when firing", fmt(lat.mean_activation)]]) {
    const tr = el("tr"); tr.appendChild(el("td", {}, k)); tr.appendChild(el("td", {}, v)); nums.appendChild(tr);
  }
  main.appendChild(nums);
  const cols = el("div", {"class": "cols"}), hist = el("div");
  hist.appendChild(el("h2", {}, "Activations when firing (log10 scale)"));
  hist.appendChild(histogram(lat));
  cols.appendChild(hist);
  if (lat.promoted) {
    cols.appendChild(logitTable("Promoted tokens", lat.promoted, "pos"));
    cols.appendChild(logitTable("Suppressed tokens", lat.suppressed, "neg"));
  }
  main.appendChild(cols);
  const examples = el("div", {"id": "top-contexts"});
  examples.appendChild(el("h2", {}, "Top activations"));
  if (!lat.top_contexts.length) examples.appendChild(el("div", {}, "This latent never fired on these tokens."));
  lat.top_contexts.forEach(ex => examples.appendChild(context(ex, lat.max_activation)));
  main.appendChild(examples);
  for (const q of lat.quantiles) {
    const box = el("div", {"class": "quantile"});
    box.appendChild(el("h2", {}, "Firing quantile " + (100 * q.quantile[0]) + "\u2013" + (100 * q.quantile[1]) +
      "% (activations " + fmt(q.range[0]) + " to " + fmt(q.range[1]) + ", " + q.n_sampled + " sampled)"));
    q.examples.forEach(ex => box.appendChild(context(ex, lat.max_activation)));
    main.appendChild(box);
  }
}
function fromHash() {
  const m = /^#latent-(\d+)$/.exec(location.hash);
  const i = m ? DATA.latents.findIndex(l => l.index === Number(m[1])) : -1;
  show(i >= 0 ? i : 0);
}
const nav = document.getElementById("nav");
DATA.latents.forEach(l => nav.appendChild(el("a", {"href": "#latent-" + l.index},
  l.index + "  " + (100 * l.density).toPrecision(2) + "%")));
window.addEventListener("hashchange", fromHash);
if (DATA.latents.length) fromHash();
else document.getElementById("main").textContent = "No latents in this report.";
"""


def _script_json(data: Any) -> str:
    """JSON that cannot end its <script> element early: <, > and & are written as \\u escapes."""
    text = json.dumps(data, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_dashboard(report: dict) -> str:
    """The page for a `jsae inspect` report (the dict written to latents.json)."""
    title = f"jsae inspect: {report.get('hook_name', '')} ({len(report.get('latents', []))} latents)"
    title = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<link rel=\"icon\" href=\"data:,\">\n"
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        "<nav id=\"nav\"></nav>\n<main id=\"main\"></main>\n"
        f"<script type=\"application/json\" id=\"jsae-data\">{_script_json(report)}</script>\n"
        f"<script>{_JS}</script>\n</body>\n</html>\n"
    )
