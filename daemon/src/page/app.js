// gainguardd's live page: reads /api/v1/ and draws plain SVG. No library, no network beyond this daemon.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const W = 640, H = 230, PAD = { l: 56, r: 12, t: 10, b: 24 };
const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#ae3ec9", "#0c8599", "#e67700", "#5c7cfa", "#c2255c",
  "#37b24d", "#1098ad", "#f76707", "#7048e8", "#74b816", "#f03e3e", "#495057", "#15aabf"];
const REFRESH_MS = 5000;

function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v, unit) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  if (unit === "bytes") {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0, x = v;
    while (Math.abs(x) >= 1024 && i < u.length - 1) { x /= 1024; i++; }
    return x.toFixed(x >= 100 || i === 0 ? 0 : 1) + " " + u[i];
  }
  if (unit === "percent") return (v * 100).toFixed(0) + "%";
  let s;
  if (a >= 1e9) s = (v / 1e9).toFixed(1) + "G";
  else if (a >= 1e6) s = (v / 1e6).toFixed(1) + "M";
  else if (a >= 1e4) s = (v / 1e3).toFixed(1) + "k";
  else if (a >= 100) s = v.toFixed(0);
  else if (a >= 1) s = v.toFixed(2);
  else if (a === 0) s = "0";
  else s = v.toPrecision(2);
  return unit ? s + " " + unit : s;
}

// Wall-clock time; tenths of a second when the chart spans under two minutes.
function clock(t, span) {
  const d = new Date(t * 1000);
  const hms = d.toTimeString().slice(0, 8);
  return span !== undefined && span < 120 ? `${hms}.${Math.floor(d.getMilliseconds() / 100)}` : hms;
}

// One chart: series = [{name, points: [[t, v|null]...], color, cls, gated: (t) => bool}].
// opts: {kind, title, unit, log, band: {lower, upper, severe_lower, severe_upper}}.
function chart(opts, series) {
  const fig = el("figure", { class: "chart", "data-kind": opts.kind });
  fig.appendChild(el("figcaption", {}, opts.title));
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title });
  fig.appendChild(svg);
  const live = series.filter(s => s.points.some(p => p[1] !== null && isFinite(p[1]) && (!opts.log || p[1] > 0)));
  let npoints = 0;
  for (const s of live) npoints += s.points.filter(p => p[1] !== null).length;
  fig.setAttribute("data-series", String(live.length));
  fig.setAttribute("data-points", String(npoints));
  if (live.length === 0) {
    svg.appendChild(el("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty-note" }, "no data yet"));
    return fig;
  }
  const f = opts.log ? (v => Math.log(v)) : (v => v);
  let t0 = Infinity, t1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (const s of live) for (const [t, v] of s.points) {
    if (v === null || !isFinite(v) || (opts.log && v <= 0)) continue;
    t0 = Math.min(t0, t); t1 = Math.max(t1, t); y0 = Math.min(y0, f(v)); y1 = Math.max(y1, f(v));
  }
  if (opts.band) {
    for (const b of [opts.band.lower, opts.band.upper]) { y0 = Math.min(y0, f(b)); y1 = Math.max(y1, f(b)); }
  }
  if (opts.zero && !opts.log) y0 = Math.min(y0, 0);
  // Padding never takes a non-negative quantity (counts, rates, norms) below zero on the axis.
  const nonNegative = !opts.log && y0 >= 0;
  if (y1 - y0 < 1e-12) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.06; y0 -= pad; y1 += pad;
  if (nonNegative) y0 = Math.max(y0, 0);
  if (t1 - t0 < 1e-9) { t0 -= 1; t1 += 1; }
  const X = t => PAD.l + (t - t0) / (t1 - t0) * (W - PAD.l - PAD.r);
  const Y = v => PAD.t + (1 - (f(v) - y0) / (y1 - y0)) * (H - PAD.t - PAD.b);
  // Grid and axes.
  const axis = el("svg:g", { class: "axis" });
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + (y1 - y0) * i / 4, y = PAD.t + (1 - i / 4) * (H - PAD.t - PAD.b);
    axis.appendChild(el("svg:line", { x1: PAD.l, x2: W - PAD.r, y1: y, y2: y }));
    axis.appendChild(el("svg:text", { x: PAD.l - 4, y: y + 3, "text-anchor": "end" }, fmt(opts.log ? Math.exp(yv) : yv, opts.unit)));
  }
  for (let i = 0; i <= 4; i++) {
    const t = t0 + (t1 - t0) * i / 4;
    axis.appendChild(el("svg:text", { x: X(t), y: H - 6, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" }, clock(t, t1 - t0)));
  }
  svg.appendChild(axis);
  if (opts.band) {
    const b = opts.band;
    svg.appendChild(el("svg:rect", { class: "band", x: PAD.l, width: W - PAD.l - PAD.r, y: Y(b.upper), height: Math.max(0, Y(b.lower) - Y(b.upper)) }));
    for (const v of [b.lower, b.upper]) svg.appendChild(el("svg:line", { class: "band-edge", x1: PAD.l, x2: W - PAD.r, y1: Y(v), y2: Y(v) }));
    for (const v of [b.severe_lower, b.severe_upper]) {
      const y = Y(v);
      if (y >= PAD.t && y <= H - PAD.b) svg.appendChild(el("svg:line", { class: "severe-edge", x1: PAD.l, x2: W - PAD.r, y1: y, y2: y }));
    }
  }
  // Lines: consecutive finite points form a run; a run is split where a point's gated state changes.
  const legend = el("div", { class: "legend" });
  live.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const g = el("svg:g", { "data-name": s.name });
    g.appendChild(el("svg:title", {}, s.name));
    let d = "", dGated = "", prev = null;
    for (const [t, v] of s.points) {
      if (v === null || !isFinite(v) || (opts.log && v <= 0)) { prev = null; continue; }
      const gated = s.gated ? s.gated(t) : false;
      const xy = `${X(t).toFixed(1)},${Y(v).toFixed(1)}`;
      if (prev && prev.gated === gated) {
        if (gated) dGated += `L${xy}`; else d += `L${xy}`;
      } else {
        const start = prev ? `M${prev.xy}L${xy}` : `M${xy}`;
        if (gated) dGated += start; else d += start;
      }
      prev = { gated, xy };
    }
    if (d) g.appendChild(el("svg:path", { class: "line " + (s.cls || ""), d, stroke: color, "data-series": s.name }));
    if (dGated) g.appendChild(el("svg:path", { class: "line gated", d: dGated, stroke: color, "data-series": s.name }));
    svg.appendChild(g);
    const item = el("span", {});
    item.appendChild(el("i", { style: `background:${color}` }));
    item.appendChild(document.createTextNode(s.name));
    legend.appendChild(item);
  });
  if (live.length > 1 || opts.legend) fig.appendChild(legend);
  return fig;
}

function put(id, node) {
  const box = document.getElementById(id);
  box.replaceChildren(node);
}

const state = { view: "training", run: null };

function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  state.view = ["training", "matrices", "gpus"].includes(h.get("view")) ? h.get("view") : "training";
  state.run = h.has("run") ? { run: h.get("run"), rank: h.get("rank") || "0", host: h.get("host") || "" } : null;
}

function hashFor(view, run) {
  const h = new URLSearchParams({ view });
  if (run) { h.set("run", run.run); h.set("rank", run.rank); h.set("host", run.host); }
  return "#" + h.toString();
}

function showView() {
  for (const s of document.querySelectorAll(".view")) s.classList.toggle("active", s.dataset.view === state.view);
  for (const a of document.querySelectorAll("#views a")) {
    a.classList.toggle("active", a.dataset.view === state.view);
    a.setAttribute("href", hashFor(a.dataset.view, state.run));
  }
}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

// One line per alert, state and run: a gain-drift alert on 14 matrices is one line naming how many and the
// extreme values, with the parameters in its tooltip.
function renderAlerts(alerts) {
  const ul = document.getElementById("alerts");
  ul.replaceChildren();
  if (alerts.length === 0) {
    ul.appendChild(el("li", { class: "none" }, "None: no rule's condition holds on the history."));
    return;
  }
  const groups = new Map();
  for (const a of alerts) {
    const where = ["run", "rank", "gpu"].filter(k => a.labels[k] !== undefined).map(k => `${k}=${a.labels[k]}`).join(" ");
    const key = `${a.alert}|${a.state}|${where}`;
    if (!groups.has(key)) groups.set(key, { a, where, items: [] });
    groups.get(key).items.push(a);
  }
  for (const { a, where, items } of groups.values()) {
    const li = el("li", { class: `alert ${a.state} ${a.severity}`, "data-alert": a.alert, "data-state": a.state, "data-count": String(items.length) });
    const values = items.map(x => x.value).filter(v => v !== null && isFinite(v));
    const range = values.length === 0 ? "" : values.length === 1 ? `value ${fmt(values[0])}` :
      `values ${fmt(Math.min(...values))} to ${fmt(Math.max(...values))}`;
    const held = Math.max(0, Date.now() / 1000 - Math.min(...items.map(x => x.active_since)));
    const params = items.map(x => x.labels.param).filter(Boolean);
    li.appendChild(el("strong", {}, a.alert));
    li.appendChild(document.createTextNode(` ${a.state} (${a.severity}) ${where}` +
      (params.length ? ` on ${params.length} parameter${params.length > 1 ? "s" : ""}` : "") +
      `: ${range}, held ${held.toFixed(0)} s of ${a.for_seconds} s `));
    if (params.length) li.setAttribute("title", params.join("\n"));
    if (a.runbook_url) li.appendChild(el("a", { href: a.runbook_url }, "runbook"));
    ul.appendChild(li);
  }
}

function renderRuns(runs) {
  const box = document.getElementById("runs");
  box.replaceChildren();
  for (const r of runs) {
    const key = { run: r.run, rank: String(r.rank), host: r.host };
    const a = el("a", { href: hashFor(state.view, key), class: "run", "data-run": r.run });
    const active = state.run && state.run.run === r.run && state.run.rank === key.rank && state.run.host === r.host;
    if (active) a.classList.add("active");
    a.appendChild(document.createTextNode(`${r.run} · rank ${r.rank} · ${r.host} `));
    a.appendChild(el("span", { class: r.up ? "up" : "down" }, r.up ? `step ${r.step}` : `ended (${r.exit_reason || "gone"}) at ${r.step}`));
    if (r.outside_band > 0) a.appendChild(el("span", { class: "badge outside" }, `${r.outside_band} outside`));
    box.appendChild(a);
  }
}

function renderRun(run, band) {
  const title = document.getElementById("run-title");
  title.textContent = `${run.run} · rank ${run.rank} · ${run.host}`;
  title.setAttribute("data-run", run.run);
  const s = run.series;
  put("chart-loss", chart({ kind: "loss", title: "Loss" }, [{ name: "loss", points: s.loss }]));
  put("chart-tokens", chart({ kind: "tokens_per_second", title: "Tokens / s", zero: true }, [{ name: "tokens/s", points: s.tokens_per_second }]));
  put("chart-dropped", chart({ kind: "dropped", title: "Dropped (cumulative): spectrum samples, events; non-finite losses", zero: true, legend: true }, [
    { name: "spectrum samples dropped", points: s.spectrum_samples_dropped_total },
    { name: "events dropped", points: s.events_dropped_total },
    { name: "non-finite losses", points: s.loss_nonfinite_total },
  ]));
  const matrices = run.params.filter(p => p.class === "matrix_like");
  const gateOf = p => {
    const hz = p.decay_horizon;
    return t => {
      let h = null;
      for (const [th, v] of hz) { if (th <= t + 1e-6) h = v; else break; }
      return h !== null && h < band.min_decay_horizon;
    };
  };
  const outside = p => p.status === "outside" || p.status === "severe";
  const gainSeries = matrices.map(p => ({ name: p.param, points: p.gain_ratio, gated: gateOf(p), cls: outside(p) ? "outside" : "" }));
  const gainFig = chart({ kind: "gain_ratio", title: "Gain ratio per matrix (log scale), GainDrift's band shaded", log: true, band }, gainSeries);
  gainFig.setAttribute("data-outside", String(matrices.filter(outside).length));
  put("chart-gain", gainFig);
  put("chart-sigma", chart({ kind: "sigma_max", title: "sigma_max per matrix" }, matrices.map(p => ({ name: p.param, points: p.sigma_max }))));
  put("chart-horizon", chart({ kind: "decay_horizon", title: `Decay horizon H per matrix (judged from H = ${band.min_decay_horizon})`, zero: true },
    matrices.map(p => ({ name: p.param, points: p.decay_horizon }))));
  document.getElementById("band-legend").textContent =
    `Band [${band.lower}, ${band.upper}] (GainDrift), severe [${band.severe_lower}, ${band.severe_upper}] (GainDriftSevere), ` +
    `judged on the 5-minute average once H ≥ ${band.min_decay_horizon}; grey dashed: H < ${band.min_decay_horizon}, not judged.`;
  const tbody = document.querySelector("#matrices tbody");
  tbody.replaceChildren();
  for (const p of run.params) {
    const tr = el("tr", { class: `param status-${p.status}`, "data-param": p.param, "data-status": p.status });
    for (const v of [p.param, p.layer, p.class, fmt(p.gain_ratio_avg5m), fmt(p.latest.sigma_max), fmt(p.latest.decay_horizon)]) tr.appendChild(el("td", {}, String(v)));
    const td = el("td", {});
    td.appendChild(el("span", { class: `badge ${p.status}` }, p.status.replace("_", " ")));
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
}

function renderGpus(g) {
  const status = document.getElementById("gpu-status");
  const box = document.getElementById("gpu-charts");
  box.replaceChildren();
  if (!g.enabled) { status.textContent = "NVML is off on this daemon (--nvml off or the source disabled)."; return; }
  const up = g.up.length ? g.up[g.up.length - 1][1] === 1 : false;
  if (!up || g.gpus.length === 0) { status.textContent = "NVML is not answering on this host: no GPU statistics (gainguard_nvml_up 0)."; return; }
  status.textContent = g.gpus.map(x => `GPU ${x.gpu}: ${x.name}`).join(" · ");
  const each = (key, title, unit) => chart({ kind: "gpu_" + key, title, unit, zero: true, legend: true },
    g.gpus.map(x => ({ name: `GPU ${x.gpu}`, points: x[key] })));
  box.appendChild(each("utilization_ratio", "GPU utilisation", "percent"));
  box.appendChild(each("memory_used_bytes", "GPU memory used", "bytes"));
  box.appendChild(each("power_watts", "GPU power", "W"));
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const ov = await getJSON("api/v1/overview");
    const h = ov.history;
    document.getElementById("history-use").textContent =
      `history ${fmt(h.bytes, "bytes")} of ${fmt(h.max_bytes, "bytes")} · ${h.series} series` +
      (h.series_refused ? ` · ${h.series_refused} refused` : "") + ` · one point / ${h.interval_seconds} s`;
    if (!state.run && ov.runs.length) {
      const r = ov.runs[0];
      state.run = { run: r.run, rank: String(r.rank), host: r.host };
      history.replaceState(null, "", hashFor(state.view, state.run));
    }
    showView();
    renderRuns(ov.runs);
    renderAlerts(ov.alerts);
    const jobs = [getJSON("api/v1/gpus").then(renderGpus)];
    if (state.run) {
      const q = new URLSearchParams(state.run).toString();
      jobs.push(getJSON("api/v1/run?" + q).then(run => renderRun(run, ov.band)));
    }
    await Promise.all(jobs);
    status.textContent = ov.runs.length ? `Updated ${clock(Date.now() / 1000)}` : "No run has reported to this daemon yet.";
    status.setAttribute("data-state", "ok");
  } catch (e) {
    status.textContent = "Cannot read the daemon's history: " + e.message;
    status.setAttribute("data-state", "error");
  }
}

window.addEventListener("hashchange", () => { readHash(); showView(); refresh(); });
readHash();
showView();
refresh();
setInterval(refresh, REFRESH_MS);
