// The operator dashboard: polls /api/stats every second and draws the last 15 minutes (from
// the server's start while it is younger, so that a fresh server's points fill the plots).
//
// Why hand-written SVG rather than a charting library: seven line charts with
// axes and a legend are about a hundred lines here, the package then ships no
// third-party code to vendor, audit and keep up to date, and the page works
// offline from the server's own files. SVG (not canvas) keeps every point in
// the DOM, so the browser test can see that the plots have data.
"use strict";

const REFRESH_MS = 1000;
const WINDOW_S = 900;
const TICK_STEPS_S = [1, 2, 5, 10, 15, 30, 60, 120, 180, 300];
const HEIGHT = 190;
const MARGIN = { left: 58, right: 14, top: 12, bottom: 26 };

// Each chart: the per-second series it plots from /api/stats, each with its label, colour (a
// CSS variable) and the /api/stats key its legend shows. A legend shows the tiles' numbers over
// the tiles' windows (`window`), not the last plotted second: legend and tile always agree.
const CHARTS = [
  {
    id: "chart-updates", title: "Updates received per second (PUT /update)", unit: "updates / s",
    window: "rate",
    lines: [["updates", "received", "received", "rates/updates"],
      ["delivered", "delivered live", "delivered", "rates/delivered"],
      ["stored", "stored", "stored", "rates/stored"], ["routed", "routed to a node", "routed", "rates/routed"],
      ["rejected", "rejected or failed", "rejected", "rates/rejected/all"]],
  },
  {
    id: "chart-latency", title: "Delivery latency, PUT received → frame written", unit: "ms (log)",
    log: true, window: "latency",
    lines: [["p50", "p50", "delivered", "latency_ms/p50"], ["p95", "p95", "stored", "latency_ms/p95"],
      ["p99", "p99", "rejected", "latency_ms/p99"]],
  },
  {
    id: "chart-webpush", title: "WebPush received per second (POST /wpush/)", unit: "messages / s",
    window: "rate",
    lines: [["webpush_incoming", "received", "received", "webpush/rates/incoming"],
      ["webpush_delivered", "delivered live", "delivered", "webpush/rates/delivered"],
      ["webpush_stored", "stored", "stored", "webpush/rates/stored"],
      ["webpush_routed", "routed to a node", "routed", "webpush/rates/routed"],
      ["webpush_rejected", "rejected or failed", "rejected", "webpush/rates/rejected/all"]],
  },
  {
    id: "chart-webpush-latency", title: "WebPush latency, POST received → frame written", unit: "ms (log)",
    log: true, window: "latency",
    lines: [["webpush_p50", "p50", "delivered", "webpush/latency_ms/p50"],
      ["webpush_p95", "p95", "stored", "webpush/latency_ms/p95"],
      ["webpush_p99", "p99", "rejected", "webpush/latency_ms/p99"]],
  },
  {
    id: "chart-devices-traffic", title: "Device traffic per second", unit: "events / s", window: "rate",
    lines: [["connect", "connections", "connect", "rates/connect"],
      ["disconnect", "disconnections", "disconnect", "rates/disconnect"], ["acks", "acks", "acks", "rates/acks"]],
  },
  {
    id: "chart-devices", title: "Devices connected", unit: "devices", window: "now",
    lines: [["devices", "devices", "delivered", "devices"]],
  },
  {
    id: "chart-storage", title: "Storage check round trip", unit: "ms", window: "check",
    lines: [["storage_rtt_ms", "round trip", "routed", "storage/rtt_ms"]],
  },
];

// What a legend's numbers cover, by the chart's `window`.
function windowLabel(chart, view) {
  if (chart.window === "rate") return `last ${view.rate_window_s} s`;
  if (chart.window === "latency") return `last ${view.latency_window_s} s`;
  return chart.window === "now" ? "now" : "last check";
}

let series = null;   // the plotted window: {t: [...], <name>: [...]}
let lastT = 0;

function lookup(view, key) {
  return key.split("/").reduce((value, part) => (value == null ? undefined : value[part]), view);
}

function fmtCount(v) { return v == null ? "–" : Math.round(v).toLocaleString("en-US"); }
function fmtRate(v) { return v == null ? "–" : (v < 10 ? v.toFixed(2) : v.toFixed(1)) + "/s"; }
function fmtMs(v) {
  if (v == null) return "–";
  return (v < 1 ? v.toFixed(3) : v < 100 ? v.toFixed(1) : Math.round(v).toString()) + " ms";
}
function fmtBytes(v) { return v == null ? "–" : (v / 1048576).toFixed(1) + " MB"; }

function format(key, value) {
  if (key.startsWith("rates/") || key.includes("/rates/") || key.endsWith("/rate")) return fmtRate(value);
  if (/^(webpush\/)?latency_ms\//.test(key) && !key.endsWith("/count")) return fmtMs(value);
  if (key === "storage/rtt_ms") return fmtMs(value);
  if (key === "storage/ok") return value ? "OK" : "DOWN";
  if (key === "storage/error") return value || "";
  if (key === "memory_bytes" || key.endsWith("/memory_bytes")) return fmtBytes(value);
  return fmtCount(value);
}

// Shows a value and keeps the raw one from /api/stats in data-value, for scripts and tests.
function show(el, view) {
  const key = el.dataset.key;
  const value = lookup(view, key);
  el.dataset.value = JSON.stringify(value === undefined ? null : value);
  el.textContent = format(key, value);
  if (key === "storage/ok") el.className = "big " + (value ? "good" : "bad");
}

function cell(key, view) {
  const td = document.createElement("td");
  if (key) { td.dataset.key = key; show(td, view); }
  return td;
}

function text(content) {
  const td = document.createElement("td");
  td.textContent = content;
  return td;
}

const WORKER_COLUMNS = ["devices", "connections", "rates/connect", "rates/updates", "rates/delivered",
  "webpush/rates/incoming", "rates/acks", "memory_bytes"];

function renderWorkers(view) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren(...view.workers.map((worker, i) => {
    const row = document.createElement("tr");
    row.dataset.index = worker.index;
    row.append(text(String(worker.index)), text(String(worker.pid || "–")),
      text(worker.up ? "up" : "silent"));
    WORKER_COLUMNS.forEach((column) => row.append(cell(`workers/${i}/${column}`, view)));
    return row;
  }));
  const total = document.createElement("tr");
  total.append(text("all workers"), text(""), text(""));
  WORKER_COLUMNS.forEach((column) => total.append(cell(column, view)));
  document.querySelector("#workers tfoot").replaceChildren(total);
}

function renderErrors(view) {
  const body = document.querySelector("#errors tbody");
  const kinds = Object.keys(view.errors).sort();
  if (!kinds.length) {
    const row = document.createElement("tr");
    const none = text("none since start");
    none.className = "none";
    none.colSpan = 3;
    row.append(none);
    body.replaceChildren(row);
    return;
  }
  body.replaceChildren(...kinds.map((kind) => {
    const row = document.createElement("tr");
    row.append(text(kind), cell(`errors/${kind}/total`, view), cell(`errors/${kind}/rate`, view));
    return row;
  }));
}

function absorb(view) {
  const fresh = view.series;
  if (series === null || view.t < lastT) {
    series = fresh;
  } else {
    for (const name of Object.keys(fresh)) series[name] = series[name].concat(fresh[name]);
  }
  const keep = series.t.findIndex((t) => t > view.t - WINDOW_S);
  for (const name of Object.keys(series)) series[name] = keep < 0 ? [] : series[name].slice(keep);
  lastT = view.t;
}

function niceStep(span, ticks) {
  const raw = span / ticks;
  const power = 10 ** Math.floor(Math.log10(raw));
  const unit = raw / power;
  return power * (unit <= 1 ? 1 : unit <= 2 ? 2 : unit <= 5 ? 5 : 10);
}

function clock(t, seconds) {
  const d = new Date(t * 1000);
  const parts = [d.getHours(), d.getMinutes()].concat(seconds ? [d.getSeconds()] : []);
  return parts.map((part) => String(part).padStart(2, "0")).join(":");
}

function yLabel(v) {
  if (v >= 1000) return (v / 1000).toLocaleString("en-US") + "k";
  return String(+v.toPrecision(3));
}

function svg(tag, attrs, content) {
  const inner = content === undefined ? "" : content;
  const pairs = Object.entries(attrs).map(([k, v]) => `${k}="${v}"`).join(" ");
  return `<${tag} ${pairs}>${inner}</${tag}>`;
}

function drawChart(chart, view) {
  const figure = document.getElementById(chart.id);
  if (!figure.firstChild) {
    const legend = chart.lines.map(([, label, colour, key]) =>
      `<span><i class="sw" style="background: var(--${colour})"></i>${label} <b data-key="${key}"></b></span>`);
    figure.innerHTML = `<h2>${chart.title}</h2><div class="legend"><span class="window"></span>${legend.join("")}</div>`
      + `<svg role="img" aria-label="${chart.title}"></svg>`;
  }
  figure.querySelector(".legend .window").textContent = windowLabel(chart, view) + ":";
  const width = Math.max(figure.clientWidth - 28, 300);
  const plotW = width - MARGIN.left - MARGIN.right;
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
  const t1 = view.t;
  const t0 = Math.max(t1 - WINDOW_S, Math.min(view.start_t, t1 - 1));
  const span = t1 - t0;
  const x = (t) => MARGIN.left + ((t - t0) / span) * plotW;

  const values = chart.lines.flatMap(([name]) => series[name].filter((v) => v != null && (!chart.log || v > 0)));
  let y;
  const yTicks = [];
  if (chart.log) {
    const low = Math.floor(Math.log10(Math.min(...values, 1)));
    const high = Math.max(Math.ceil(Math.log10(Math.max(...values, 1))), low + 1);
    y = (v) => MARGIN.top + plotH - ((Math.log10(v) - low) / (high - low)) * plotH;
    for (let p = low; p <= high; p += 1) yTicks.push(10 ** p);
  } else {
    const top = Math.max(...values, 0) || 1;
    const step = niceStep(top, 4);
    const max = Math.ceil(top / step) * step;
    y = (v) => MARGIN.top + plotH - (v / max) * plotH;
    for (let v = 0; v <= max + step / 2; v += step) yTicks.push(v);
  }

  let parts = "";
  for (const v of yTicks) {
    const yy = y(v).toFixed(1);
    parts += svg("line", { class: "grid", x1: MARGIN.left, x2: width - MARGIN.right, y1: yy, y2: yy });
    parts += svg("text", { x: MARGIN.left - 6, y: +yy + 4, "text-anchor": "end" }, yLabel(v));
  }
  const step = TICK_STEPS_S.find((s) => span / s <= 6) || TICK_STEPS_S[TICK_STEPS_S.length - 1];
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
    const xx = x(t).toFixed(1);
    parts += svg("line", { class: "grid", x1: xx, x2: xx, y1: MARGIN.top, y2: MARGIN.top + plotH });
    const anchor = x(t) > width - MARGIN.right - 30 ? "end" : "middle";  // not cut at the edge
    parts += svg("text", { x: xx, y: HEIGHT - 8, "text-anchor": anchor }, clock(t, step < 60));
  }
  parts += svg("line", { class: "axis", x1: MARGIN.left, x2: width - MARGIN.right, y1: MARGIN.top + plotH, y2: MARGIN.top + plotH });
  parts += svg("line", { class: "axis", x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top, y2: MARGIN.top + plotH });
  parts += svg("text", { x: 12, y: MARGIN.top + plotH / 2, transform: `rotate(-90 12 ${MARGIN.top + plotH / 2})`, "text-anchor": "middle" }, chart.unit);

  let points = 0;
  for (const [name, , colour] of chart.lines) {
    let d = "";
    let open = false;
    series[name].forEach((v, i) => {
      if (v == null || (chart.log && v <= 0)) { open = false; return; }
      const command = open ? "L" : "M";
      d += `${command}${x(series.t[i]).toFixed(1)} ${y(v).toFixed(1)}`;
      // A lone point between gaps still shows, as a dot (round caps on a tiny segment).
      if (!open) d += "h0.1";
      open = true;
      points += 1;
    });
    if (d) parts += svg("path", { class: "line", "data-series": name, d, stroke: `var(--${colour})`, "stroke-linecap": "round" });
  }
  if (!points) {
    const empty = span < WINDOW_S ? "no data since the server started" : "no data in the last 15 minutes";
    parts += svg("text", { class: "empty", x: MARGIN.left + plotW / 2, y: MARGIN.top + plotH / 2, "text-anchor": "middle" }, empty);
  }
  const element = figure.querySelector("svg");
  element.setAttribute("width", width);
  element.setAttribute("height", HEIGHT);
  element.setAttribute("viewBox", `0 0 ${width} ${HEIGHT}`);
  element.dataset.points = String(series.t.length);
  element.innerHTML = parts;
}

function render(view) {
  if (view.t == null) return;
  absorb(view);
  CHARTS.forEach((chart) => drawChart(chart, view));  // first: their legends hold data-keys
  document.querySelectorAll("[data-key]").forEach((el) => show(el, view));
  renderWorkers(view);
  renderErrors(view);
  document.getElementById("version").textContent = "version " + view.version;
  document.querySelectorAll(".rate-window").forEach((el) => { el.textContent = view.rate_window_s; });
  document.querySelectorAll(".latency-window").forEach((el) => { el.textContent = view.latency_window_s; });
  const badge = document.getElementById("storage-badge");
  badge.textContent = view.storage.ok ? "storage OK" : "storage DOWN";
  badge.className = "badge " + (view.storage.ok ? "ok" : "bad");
  const sample = document.getElementById("sample");
  sample.dataset.t = String(view.t);
  sample.textContent = `sample of ${new Date(view.t * 1000).toLocaleTimeString("en-GB")} · refreshed every second`;
}

async function refresh() {
  try {
    const response = await fetch(`/api/stats?since=${lastT}`, { cache: "no-store", credentials: "same-origin" });
    if (response.ok) {
      render(await response.json());
    } else {
      document.getElementById("sample").textContent = `the server answered ${response.status}`;
    }
  } catch (error) {
    document.getElementById("sample").textContent = "the server does not answer; retrying";
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
