// The console's charts (plotly.js, drawn from the JSON each page embeds) and the rollout page's
// live refresh. No framework: the pages are rendered on the server; this only draws and polls.
"use strict";

const COLORS = {production: "#2563eb", candidate: "#ea580c", shadow: "#7c3aed"};
const LAYOUT = {margin: {l: 55, r: 15, t: 35, b: 45}, height: 270, legend: {orientation: "h", y: -0.25},
                font: {size: 11}};
const CONFIG = {displaylogo: false, responsive: true};

function embedded(id) {
  const element = document.getElementById(id);
  return element ? JSON.parse(element.textContent) : null;
}

function draw(element, traces, layout) {
  Plotly.react(element, traces, {...LAYOUT, ...layout}, CONFIG);
}

function fixed(digits) {
  return value => (value === null || value === undefined ? "–" : value.toFixed(digits));
}

const FORMAT = {
  version: String, requests: String, error_rate: value => (value * 100).toFixed(1) + "%",
  p50_ms: fixed(0), p95_ms: fixed(0), ttft_p50_ms: fixed(0), tpot_p50_ms: fixed(1), cost_per_1k_usd: fixed(4),
  "shadow.pairs": String, "shadow.dropped": String, "shadow.failed": String,
  "shadow.exact_agreement": value => (value === null ? "–" : (value * 100).toFixed(1) + "%"),
  "shadow.token_f1": fixed(3), "shadow.p50_ms": fixed(0), "shadow.cost_per_1k_usd": fixed(4),
};

const CHARTS = {
  scores(element) {
    const data = embedded("scores-data");
    const traces = [{type: "bar", name: "adapter", x: data.versions, y: data.values, marker: {color: COLORS.candidate}}];
    for (const [key, name] of [["base", "base model"], ["prompted", "prompted base"]]) {
      traces.push({type: "scatter", mode: "lines+markers", name, x: data.versions, y: data[key]});
    }
    draw(element, traces, {title: {text: `primary score (${data.metric}) per version`}});
  },
  loss(element) {
    const data = embedded("loss-data");
    const traces = [];
    for (const [key, name] of [["loss", "training"], ["eval_loss", "validation"]]) {
      const points = data.filter(point => point[key] !== undefined && point[key] !== null);
      if (points.length) {
        traces.push({type: "scatter", mode: key === "loss" ? "lines" : "lines+markers", name,
                     x: points.map(point => point.step), y: points.map(point => point[key])});
      }
    }
    draw(element, traces, {xaxis: {title: {text: "step"}}, yaxis: {title: {text: "loss"}}});
  },
  evals(element) {
    // The primary metric on every suite it was measured on (the adapter's own, the served GGUF,
    // each quantization), against the base model and the prompted base.
    const data = embedded("evals-data");
    const rows = data.scores.filter(score => score.metric === data.metric && score.subject === "adapter");
    const suites = rows.map(score => score.suite);
    const traces = [{type: "bar", name: "this version", x: suites, y: rows.map(score => score.value),
                     marker: {color: COLORS.candidate}}];
    for (const [key, name] of [["base", "base model"], ["prompted", "prompted base"]]) {
      if (data[key] !== null) traces.push({type: "scatter", mode: "lines+markers", name, x: suites, y: suites.map(() => data[key])});
    }
    draw(element, traces, {title: {text: `${data.metric} by suite`}});
  },
  aliases(element) {
    const data = embedded("aliases-data");
    const traces = [...new Set(data.map(change => change.alias))].map(alias => {
      const rows = data.filter(change => change.alias === alias);
      return {type: "scatter", mode: "lines+markers", line: {shape: "hv"}, name: alias,
              x: rows.map(change => change.created_at), y: rows.map(change => change.to_version)};
    });
    draw(element, traces, {yaxis: {title: {text: "version"}, dtick: 1}, title: {text: "which version each alias named"}});
  },
  cost(element) {
    const data = embedded("cost-data");
    draw(element, [{type: "bar", name: "$ per 1k requests", x: data.map(row => row.group),
                    y: data.map(row => row.cost_per_1k_usd)}], {title: {text: "$ per 1k requests"}});
  },
};

// -- the rollout page ------------------------------------------------------------------------

function thresholdLine(element, page) {
  // The automatic rollback's limits, drawn where they apply.
  if (element.dataset.threshold === "error") {
    return page.thresholds.max_error_rate;
  }
  if (element.dataset.threshold === "latency") {
    const production = page.status.arms.find(arm => arm.arm === "production");
    return production && production.tpot_p50_ms !== null
      ? production.tpot_p50_ms * page.thresholds.max_latency_ratio : null;
  }
  return null;
}

function drawRollout(root, page) {
  const x = page.timeline.starts;
  for (const element of root.querySelectorAll(".chart[data-series]")) {
    const traces = [];
    for (const [arm, series] of Object.entries(page.timeline.arms)) {
      for (const name of element.dataset.series.split(",")) {
        traces.push({type: "scatter", mode: "lines+markers", connectgaps: false, x, y: series[name],
                     name: element.dataset.series.includes(",") ? `${arm} ${name.replace("_ms", "")}` : arm,
                     line: {color: COLORS[arm], dash: name === "p95_ms" ? "dot" : "solid"}});
      }
    }
    const limit = thresholdLine(element, page);
    const shapes = limit === null ? [] : [{type: "line", xref: "paper", x0: 0, x1: 1, y0: limit, y1: limit,
                                           line: {color: "#dc2626", dash: "dash"}}];
    const annotations = limit === null ? [] : [{xref: "paper", x: 1, y: limit, xanchor: "right", yanchor: "bottom",
                                                text: "rollback above", showarrow: false, font: {color: "#dc2626"}}];
    const title = element.dataset.series === "requests" ? `requests per ${page.timeline.bucket_s} s` : element.dataset.title;
    draw(element, traces, {title: {text: title}, shapes, annotations});
  }
}

function fillRollout(root, page) {
  const status = page.status;
  const set = (selector, text) => { const cell = root.querySelector(selector); if (cell) cell.textContent = text; };
  set('[data-field="status"]', status.status);
  set('[data-field="weight"]', String(status.weight));
  set('[data-field="end_reason"]', status.end_reason || "");
  const ratio = status.latency_ratio_interval;
  set('[data-field="latency_ratio"]', ratio
    ? `${ratio.estimate.toFixed(2)}× [${ratio.low.toFixed(2)}, ${ratio.high.toFixed(2)}]` : "not comparable yet");
  for (const arm of status.arms) {
    const row = root.querySelector(`tr[data-arm="${arm.arm}"]`);
    for (const cell of row ? row.querySelectorAll("[data-field]") : []) {
      cell.textContent = FORMAT[cell.dataset.field](arm[cell.dataset.field]);
    }
  }
  for (const cell of status.shadow ? root.querySelectorAll('[data-field^="shadow."]') : []) {
    cell.textContent = FORMAT[cell.dataset.field](status.shadow[cell.dataset.field.slice(7)]);
  }
  set('[data-field="updated"]', new Date().toLocaleTimeString());
}

function watchRollout(root) {
  drawRollout(root, embedded("rollout-data"));
  const updated = root.querySelector('[data-field="updated"]');
  const refresh = async () => {
    // One request at a time: the next is scheduled only once this one has been drawn.
    let page = null;
    try {
      const response = await fetch(root.dataset.source, {credentials: "same-origin", redirect: "manual"});
      const json = (response.headers.get("content-type") || "").startsWith("application/json");
      if (response.ok && json) {
        page = await response.json();
      } else {
        updated.textContent = response.type === "opaqueredirect" ? "signed out: reload to sign in"
          : `refresh failed (${response.status})`;
      }
    } catch (error) {
      updated.textContent = `refresh failed (${error.message})`;
    }
    if (page !== null) {
      fillRollout(root, page);
      drawRollout(root, page);
      if (page.status.status !== "active") return;
    }
    setTimeout(refresh, Number(root.dataset.refreshS) * 1000);
  };
  setTimeout(refresh, Number(root.dataset.refreshS) * 1000);
}

window.addEventListener("DOMContentLoaded", () => {
  for (const element of document.querySelectorAll(".chart[data-chart]")) {
    try {
      CHARTS[element.dataset.chart](element);
    } catch (error) {  // one bad chart leaves the others, and the page, working
      element.textContent = `chart not drawn: ${error.message}`;
    }
  }
  const rollout = document.getElementById("rollout");
  if (rollout) watchRollout(rollout);
});
