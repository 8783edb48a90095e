"use strict";
// The steptune dashboard page. Against the server it fetches /api/...; in a static report the same
// responses are embedded in window.STEPTUNE_REPORT and the trial table is filtered here instead.

const REPORT = window.STEPTUNE_REPORT || null;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"];
const ORDER_COLORS = { 1: "#1f77b4", 2: "#2ca02c", 3: "#ff7f0e", 4: "#d62728" };
const PLOT_CONFIG = { displaylogo: false, responsive: true };

// A log axis over ``values``, labelled so its labels stay apart on a plot a few hundred pixels high: plotly's own
// choice labels every 0.05 over a decade, or every digit over two, and those labels run into each other. Up to
// about a decade every digit is labelled, beyond it 1, 2 and 5 of each decade; a narrow range keeps plotly's ticks.
function logAxis(title, values) {
  const ys = values.filter((v) => Number.isFinite(v) && v > 0);
  const ratio = ys.length ? Math.max(...ys) / Math.min(...ys) : 1;
  const dtick = ratio < 3 ? {} : ratio <= 14 ? { dtick: "D1" } : { dtick: "D2" };
  return { title: { text: title }, type: "log", tickformat: ".2~g", ...dtick };
}
const CHEAP_FIDELITIES = ["train", "cheap", "proxy"];  // drawn dotted: ranking scores, not the reported ones
const isCheap = (fidelity) => CHEAP_FIDELITIES.includes(fidelity);

const state = {
  view: "front", problem: null, fidelity: "", problems: [], config: null, token: null, trial: null,
  historyStudy: null, relaxStudy: null,
  table: { study: "", nfe: "", status: "", fidelity: "", sort: "number", order: "asc", offset: 0, limit: 50 },
};

const $ = (id) => document.getElementById(id);

function query(path, params) {
  const keys = Object.keys(params || {}).filter((k) => params[k] !== "" && params[k] !== null && params[k] !== undefined)
    .sort();
  if (!keys.length) return path;
  return path + "?" + keys.map((k) => `${encodeURIComponent(k)}=${encodeURIComponent(params[k])}`).join("&");
}

async function api(path, params) {
  const url = query(path, params);
  if (REPORT) {
    if (url in REPORT.responses) return REPORT.responses[url];
    throw new Error(`this report does not include ${url}`);
  }
  const r = await fetch(url);
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return r.json();
}

// A view asks again whenever a filter changes or the data does; answers can come back out of order, and
// only the answer to the latest question may be drawn.
class Superseded extends Error {}
const asked = {};

async function latest(slot, answer) {
  const n = (asked[slot] = (asked[slot] || 0) + 1);
  const value = await answer;
  if (asked[slot] !== n) throw new Superseded(`a newer ${slot} request replaced this one`);
  return value;
}

function showError(err) {
  if (err instanceof Superseded) return;
  const el = $("error");
  el.hidden = !err;
  el.textContent = err ? String(err.message || err) : "";
}

const fmt = (v, digits = 4) => (v === null || v === undefined ? "—"
  : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(digits)) : String(v));
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
  "'": "&#39;" })[c]);

function metricsText(m) {
  return Object.entries(m || {}).map(([k, v]) => `${k} ${fmt(v)}`).join("<br>");
}

function currentProblem() {
  return state.problems.find((p) => String(p.id) === String(state.problem)) || null;
}

// ---- routing -------------------------------------------------------------------------------------

function parseHash() {
  const [view, arg] = (location.hash.replace(/^#/, "") || "front").split("/");
  return { view: ["front", "history", "trials", "schedule", "relaxation"].includes(view) ? view : "front", arg };
}

async function route() {
  const { view, arg } = parseHash();
  state.view = view;
  if (view === "schedule" && arg) state.trial = Number(arg);
  for (const sec of document.querySelectorAll(".view")) sec.hidden = sec.id !== `view-${view}`;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.view === view);
  await render();
}

async function render() {
  showError(null);
  try {
    if (state.view === "front") await renderFront();
    else if (state.view === "history") await renderHistory();
    else if (state.view === "trials") await renderTrials();
    else if (state.view === "schedule") await renderSchedule();
    else if (state.view === "relaxation") await renderRelaxation();
    document.body.dataset.rendered = state.view;
  } catch (err) {
    if (err instanceof Superseded) return;
    showError(err);
    document.body.dataset.rendered = "error";
  }
}

// ---- the front -----------------------------------------------------------------------------------

function frontTraces(data) {
  const traces = data.series.map((s, i) => {
    const full = !isCheap(s.fidelity);
    const color = COLORS[i % COLORS.length];
    return {
      type: "scatter", mode: "lines+markers", name: s.name,
      x: s.points.map((p) => p.nfe), y: s.points.map((p) => p.score),
      customdata: s.points.map((p) => p.trial),
      text: s.points.map((p) => `trial id ${p.trial} (#${p.number} of ${esc(p.study)})<br>${esc(p.schedule)}`
        + (p.interpolated_from ? `<br>${interpolatedText(p.interpolated_from)}` : "")
        + `<br>${p.count} trial(s) at this NFE<br>${metricsText(p.metrics)}`),
      hovertemplate: "NFE %{x}<br>%{text}<extra>%{fullData.name}</extra>",
      line: { color, dash: full ? "solid" : "dot", width: s.kind === "preset" ? 1.2 : 2.8 },
      marker: {
        color, size: s.points.map((p) => (p.pareto ? 10 : 7)),
        symbol: s.points.map((p) => (p.interpolated_from ? "diamond" : "circle") + (full ? "" : "-open")),
        line: { color: "#111", width: s.points.map((p) => (p.pareto ? 2 : 0)) },
      },
    };
  });
  for (const f of data.fronts) {
    traces.push({
      type: "scatter", mode: "lines", name: `Pareto front (${f.fidelity || "unlabelled"})`,
      x: f.points.map((p) => p.nfe), y: f.points.map((p) => p.score), hoverinfo: "skip",
      line: { color: "#000", dash: isCheap(f.fidelity) ? "dot" : "dash", width: 1.5, shape: "hv" },
    });
  }
  return traces;
}

async function renderFront() {
  const prob = currentProblem();
  if (!prob) { Plotly.purge($("front-plot")); $("front-plot").textContent = "The database has no studies yet."; return; }
  const data = await latest("front", api("/api/front", { problem: prob.id, fidelity: state.fidelity }));
  const plot = $("front-plot");
  await Plotly.react(plot, frontTraces(data), {
    title: { text: `${prob.name}${prob.noise ? ` (${prob.noise})` : ""}: NFE vs ${data.metric}` },
    xaxis: { title: { text: "NFE (model calls)" }, dtick: 1 },
    yaxis: logAxis(`${data.metric} (log scale, lower is better)`,
      data.series.flatMap((s) => s.points.map((p) => p.score))),
    hovermode: "closest", legend: { font: { size: 11 } }, margin: { t: 50 },
  }, PLOT_CONFIG);
  if (!plot.dataset.clickBound) {
    plot.on("plotly_click", (ev) => {
      const pt = ev.points && ev.points.find((p) => p.customdata !== undefined);
      if (pt) location.hash = `#schedule/${pt.customdata}`;
    });
    plot.dataset.clickBound = "1";
  }
  plot.dataset.traces = String(plot.data.length);
  renderStudiesTable(prob);
}

function renderStudiesTable(prob) {
  const rows = prob.studies.map((s) => {
    const t = s.trials;
    const total = Object.values(t).reduce((a, b) => a + b, 0);
    return `<tr><td class="text">${esc(s.name)}</td><td class="text">${esc(s.method || "—")}</td>`
      + `<td class="text">${esc(s.metric)}</td><td>${total}</td><td>${t.complete}</td><td>${t.failed}</td>`
      + `<td>${t.running}</td><td>${t.queued}</td><td>${s.relaxation_rounds}</td>`
      + (REPORT ? "" : `<td class="text run">${esc(runState(s.run))}</td>`) + "</tr>";
  });  // a report is a snapshot: which run was on a study when it was written is left out
  $("studies-table").innerHTML = "<tr><th class='text'>study</th><th class='text'>method</th><th class='text'>metric</th>"
    + "<th>trials</th><th>complete</th><th>failed</th><th>running</th><th>queued</th><th>relaxation rounds</th>"
    + (REPORT ? "" : "<th class='text'>run</th>") + "</tr>" + rows.join("");
}

// whether a run is on the study (the driver's lease), as `steptune status` says it
function runState(run) {
  if (!run) return "—";
  if (!run.alive) return `none: the last run (${run.id}) ended without letting go`;
  return `${run.doing} (${run.id})`;
}

// ---- search efficiency ---------------------------------------------------------------------------

function fillSelect(sel, options, value) {
  sel.innerHTML = options.map(([v, label]) => `<option value="${esc(v)}">${esc(label)}</option>`).join("");
  if (options.some(([v]) => String(v) === String(value))) sel.value = value;
  return sel.value;
}

function trialStudies(prob) {
  return (prob ? prob.studies : []).filter((s) => Object.values(s.trials).some((n) => n > 0));
}

async function renderHistory() {
  const studies = trialStudies(currentProblem()).filter((s) => s.method !== "preset");
  state.historyStudy = fillSelect($("history-study"), studies.map((s) => [s.name, `${s.name} (${s.method})`]),
    state.historyStudy);
  if (!state.historyStudy) { Plotly.purge($("history-plot")); $("history-cost").innerHTML = ""; return; }
  const data = await latest("history", api("/api/history", { study: state.historyStudy }));
  const made = Object.fromEntries(data.cost.per_nfe.filter((c) => c.interpolated_from)
    .map((c) => [c.nfe, c.interpolated_from]));
  const traces = data.curves.filter((c) => !state.fidelity || c.fidelity === state.fidelity).map((c, i) => ({
    type: "scatter", mode: "lines+markers",
    name: `NFE ${c.nfe} (${c.fidelity || "—"}, ${c.n} evals${made[c.nfe] ? `, ${interpolatedText(made[c.nfe])}` : ""})`,
    x: c.evaluations, y: c.best, line: { shape: "hv", color: COLORS[i % COLORS.length],
      dash: isCheap(c.fidelity) ? "dot" : "solid" },
    hovertemplate: `NFE ${c.nfe}: best %{y:.4g} after %{x} evaluations<extra></extra>`,
  }));
  await Plotly.react($("history-plot"), traces, {
    title: { text: `${data.study}: best ${data.metric} so far` },
    xaxis: { title: { text: "evaluations made (at that fidelity)" } },
    yaxis: logAxis(`best ${data.metric} (log scale)`, traces.flatMap((t) => t.y)), margin: { t: 50 },
  }, PLOT_CONFIG);
  $("history-plot").dataset.traces = String(traces.length);
  $("history-run").textContent = runText(data);
  renderCost($("history-cost"), data.cost, data.reported);
}

const interpolatedText = (from) => `interpolated from NFE ${from.join(", ")}`;

function secondsText(s) {
  if (s === null || s === undefined) return "—";
  if (s < 10) return `${Number(s.toPrecision(2))} s`;
  if (s < 600) return `${Math.round(s)} s`;
  if (s < 3 * 3600) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function renderCost(table, cost, reported) {
  const rows = [...cost.per_nfe.map((c) => [String(c.nfe), c]), ["all NFEs", cost.total]];
  if (cost.baselines.evaluations) rows.push(["baselines", cost.baselines]);
  const extra = (c) => [c.repeats ? `${c.repeats} repeated` : "", c.reused ? `${c.reused} reused` : ""]
    .filter(Boolean).join(", ");
  const best = (label, c) => (c.nfe === null ? "" : fmt(reported.best[label]));
  table.innerHTML = `<thead><tr><th>NFE</th><th>best (${esc(reported.fidelity || "any")})</th><th>evaluations</th>`
    + "<th>model calls</th><th>wall</th><th>device s</th><th class=\"text\">device</th></tr></thead><tbody>"
    + rows.map(([label, c]) => `<tr data-nfe="${esc(label)}"`
      + (c.interpolated_from ? ` class="interpolated" data-interpolated-from="${c.interpolated_from.join(",")}"` : "")
      + `><td>${esc(label)}${c.interpolated_from ? ` (${interpolatedText(c.interpolated_from)})` : ""}</td>`
      + `<td>${best(label, c)}</td><td>${c.evaluations}${extra(c) ? ` (${esc(extra(c))})` : ""}</td>`
      + `<td>${c.model_calls.toLocaleString("en-US")}</td><td>${secondsText(c.wall_seconds)}</td>`
      + `<td>${secondsText(c.device_seconds)}</td><td class="text">${esc(c.device || "—")}</td></tr>`).join("")
    + "</tbody>";
}

function runText(data) {
  const e = data.evaluators, u = data.utilisation;
  if (!e.count && !u) return "";
  const parts = [`evaluators: ${e.count ?? "?"}${e.backend ? ` (${e.backend})` : ""}, busy now ${e.busy}`];
  if (u) {
    parts.push(`last run: busy ${u.fraction == null ? "—" : `${Math.round(100 * u.fraction)}%`} of `
      + `${u.seconds.toFixed(1)} s, ${u.per_second == null ? "—" : u.per_second.toPrecision(3)} evaluations/s, `
      + `batch ${u.batch}`);
  }
  return parts.join(" · ");
}

// ---- the trial table -----------------------------------------------------------------------------

const TABLE_COLUMNS = [
  ["id", "id", true], ["study", "study", false], ["number", "#", true], ["nfe", "NFE", true],
  ["score", "score", true], ["status", "status", true], ["fidelity", "fidelity", true], ["schedule", "schedule", false],
  ["origin", "origin", false],
  ["n_samples", "samples", false], ["seconds", "seconds", true], ["attempts", "attempts", false],
];

function tableParams() {
  const t = state.table;
  const p = { sort: t.sort, order: t.order, offset: t.offset, limit: t.limit, nfe: t.nfe, status: t.status,
    fidelity: t.fidelity };
  if (t.study) p.study = t.study;
  else if (currentProblem()) p.problem = currentProblem().id;
  return p;
}

function localTrialsPage(p) {
  let rows = REPORT.trials.filter((r) => (!p.study || r.study === p.study) && (p.nfe === "" || r.nfe === Number(p.nfe))
    && (!p.status || r.status === p.status) && (!p.fidelity || r.fidelity === p.fidelity));
  const nfes = [...new Set(rows.map((r) => r.nfe))].sort((a, b) => a - b);
  const dir = p.order === "desc" ? -1 : 1;
  rows = rows.slice().sort((a, b) => {
    const x = a[p.sort], y = b[p.sort];
    if (x === y) return a.id - b.id;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * dir;
  });
  return { total: rows.length, offset: p.offset, limit: p.limit, nfes, items: rows.slice(p.offset, p.offset + p.limit) };
}

async function renderTrials() {
  const prob = currentProblem();
  const t = state.table;
  t.study = fillSelect($("f-study"), [["", "all studies"], ...trialStudies(prob).map((s) => [s.name, s.name])], t.study);
  const statuses = (state.config && state.config.statuses) || ["queued", "running", "complete", "failed", "pruned"];
  t.status = fillSelect($("f-status"), [["", "any"], ...statuses.map((s) => [s, s])], t.status);
  t.fidelity = fillSelect($("f-fidelity"), fidelityChoices(), t.fidelity);
  const p = tableParams();
  const page = REPORT ? localTrialsPage(p) : await latest("trials", api("/api/trials", p));
  t.nfe = fillSelect($("f-nfe"), [["", "any"], ...page.nfes.map((n) => [String(n), String(n)])], t.nfe);
  const head = TABLE_COLUMNS.map(([key, label, sortable]) => {
    const cls = [sortable ? "sortable" : "", key === t.sort ? `sorted-${t.order}` : "",
      ["study", "status", "fidelity", "schedule", "origin"].includes(key) ? "text" : ""].join(" ");
    return `<th class="${cls}" data-key="${key}">${label}</th>`;
  }).join("");
  const body = page.items.map((r) => `<tr class="clickable" data-trial="${r.id}">`
    + TABLE_COLUMNS.map(([key]) => {
      const v = r[key];
      if (key === "status") return `<td class="text status-${esc(v)}" title="${esc(r.error || "")}">${esc(v)}</td>`;
      if (key === "origin") return `<td class="text">${esc(v || "—")}${r.baseline ? " (baseline)" : ""}</td>`;
      if (key === "study") return `<td class="text nowrap">${esc(v || "—")}</td>`;  // a name is read whole
      if (["fidelity", "schedule"].includes(key)) return `<td class="text">${esc(v || "—")}</td>`;
      return `<td>${fmt(v)}</td>`;
    }).join("") + "</tr>").join("");
  $("trials-table").innerHTML = `<thead><tr>${head}</tr></thead><tbody>${body}</tbody>`;
  const last = Math.min(page.offset + page.items.length, page.total);
  const held = REPORT && REPORT.trials_total > REPORT.trials.length
    ? ` (this report holds the best ${REPORT.trials.length} of ${REPORT.trials_total} trials by score)` : "";
  $("trials-count").textContent = (page.total ? `${page.offset + 1}–${last} of ${page.total}` : "no trials") + held;
  $("trials-count").dataset.total = String(page.total);
  $("prev").disabled = page.offset <= 0;
  $("next").disabled = last >= page.total;
}

function bindTable() {
  const t = state.table;
  const refilter = (key) => (ev) => { t[key] = ev.target.value; t.offset = 0; renderTrials().catch(showError); };
  $("f-study").addEventListener("change", (ev) => { t.study = ev.target.value; t.nfe = ""; t.offset = 0;
    renderTrials().catch(showError); });
  $("f-nfe").addEventListener("change", refilter("nfe"));
  $("f-status").addEventListener("change", refilter("status"));
  $("f-fidelity").addEventListener("change", refilter("fidelity"));
  $("prev").addEventListener("click", () => { t.offset = Math.max(0, t.offset - t.limit); renderTrials().catch(showError); });
  $("next").addEventListener("click", () => { t.offset += t.limit; renderTrials().catch(showError); });
  $("trials-table").addEventListener("click", (ev) => {
    const th = ev.target.closest("th.sortable");
    if (th) {
      t.order = t.sort === th.dataset.key && t.order === "asc" ? "desc" : "asc";
      t.sort = th.dataset.key;
      t.offset = 0;
      renderTrials().catch(showError);
      return;
    }
    const tr = ev.target.closest("tr[data-trial]");
    if (tr) location.hash = `#schedule/${tr.dataset.trial}`;
  });
}

// ---- one schedule --------------------------------------------------------------------------------

function stepLabel(s) {
  return `${s.prediction[0]}${s.order}${s.corrector === "none" ? "" : s.corrector.startsWith("implicit") ? "+C" : "+c"}`;
}

function downloadLinks(d) {
  if (REPORT) {
    const ex = REPORT.exports && REPORT.exports[d.trial];
    if (!ex) return "<em>exports of this trial are not in the report</em>";
    return Object.entries(ex).map(([name, file]) => {
      const href = URL.createObjectURL(new Blob([file.content], { type: file.type }));
      return `<a href="${href}" download="${esc(file.filename)}" data-format="${esc(name)}">${esc(name)}</a>`;
    }).join("");
  }
  const labels = { json: "JSON (steptune)", diffusers: "diffusers scheduler (zip)", sigmas: "σ list (k-diffusion)",
    comfyui: "σ string (ComfyUI)" };
  return state.config.formats.map((f) => `<a href="/api/trials/${d.trial}/export/${f}" download `
    + `data-format="${f}">${labels[f] || f}</a>`).join("");
}

async function renderSchedule() {
  if (!state.trial) {
    $("schedule-head").innerHTML = "<p>Pick a point on the front or a row of the trial table.</p>";
    $("schedule-body").hidden = true;  // no empty plots before there is a schedule to draw
    return;
  }
  const d = await latest("schedule", api(`/api/trials/${state.trial}/schedule`));
  $("schedule-body").hidden = false;
  const near = d.nearest[0];
  $("schedule-head").innerHTML = `<h2>${esc(d.name || "unnamed schedule")} — trial id ${d.trial} `
    + `(#${d.number} of ${esc(d.study)})</h2><div class="facts">`
    + `<span>NFE <b>${d.nfe}</b></span><span>${esc(d.metric)} <b>${fmt(d.score)}</b></span>`
    + `<span>fidelity ${esc(d.fidelity || "—")} (${esc(d.bank || "—")}, ${fmt(d.n_samples)} samples)</span>`
    + `<span>status ${esc(d.status)}</span><span>noise ${esc(d.noise || "—")}</span><span>AFS ${esc(d.afs)}</span>`
    + `<span id="nearest-preset">most like <b>${near ? esc(near.preset) : "—"}</b>`
    + `${near ? ` (distance ${fmt(near.distance, 3)})` : ""}</span></div>`
    + `<div class="facts">${Object.entries(d.metrics || {}).map(([k, v]) => `<span>${esc(k)} ${fmt(v)}</span>`).join("")}</div>`;
  $("downloads").innerHTML = downloadLinks(d);
  const rows = [{ name: "this schedule", lambdas: d.lambdas, steps: d.steps }]
    .concat(d.nearest.map((n) => ({ name: n.preset, lambdas: n.lambdas, steps: n.steps })));
  const lambdaTraces = rows.map((r, i) => {
    const pts = (r.lambdas || []).map((lam, k) => ({ lam, k })).filter((p) => p.lam !== null);
    return {
      type: "scatter", mode: "lines+markers+text", name: r.name, x: pts.map((p) => p.lam), y: pts.map(() => r.name),
      text: pts.map((p) => (p.k === 0 ? "start" : stepLabel(r.steps[p.k - 1]))), textposition: "top center",
      cliponaxis: false,
      marker: { size: i === 0 ? 13 : 9, color: pts.map((p) => (p.k === 0 ? "#999" : ORDER_COLORS[r.steps[p.k - 1].order])),
        symbol: pts.map((p) => (p.k === 0 ? "diamond" : r.steps[p.k - 1].prediction === "data" ? "circle" : "square")) },
      line: { color: i === 0 ? "#333" : "#bbb", width: 1 }, hovertemplate: "λ %{x:.4f}: %{text}<extra>%{y}</extra>",
    };
  });
  await Plotly.react($("lambda-plot"), lambdaTraces, {
    title: { text: "timesteps on the λ = log(α/σ) axis (colour: order 1 blue, 2 green, 3 orange; ● data, ■ noise "
      + "prediction; +c corrector)" , font: { size: 13 } },
    xaxis: { title: { text: "λ (log-SNR / 2)" } }, yaxis: { automargin: true, autorange: "reversed" },
    showlegend: false, margin: { t: 50 },
  }, PLOT_CONFIG);
  const sigmaTraces = [{ name: "this schedule", y: d.log_sigmas, width: 3 }]
    .concat(d.nearest.map((n) => ({ name: n.preset, y: null, lambdas: n.lambdas, width: 1.5 })))
    .map((r, i) => ({
      type: "scatter", mode: "lines+markers", name: r.name,
      y: r.y || r.lambdas.map((l) => (l === null ? null : -l)),
      line: { width: r.width, color: i === 0 ? "#111" : COLORS[i] },
    }));
  await Plotly.react($("sigma-plot"), sigmaTraces, {
    title: { text: "log σ (σ/α, k-diffusion convention) per step, beside the nearest presets", font: { size: 13 } },
    xaxis: { title: { text: "step" }, dtick: 1 }, yaxis: { title: { text: "log σ" } }, margin: { t: 50 },
  }, PLOT_CONFIG);
  $("steps-table").innerHTML = "<tr><th>step</th><th>t from</th><th>t to</th><th>λ to</th><th>order</th>"
    + "<th class='text'>prediction</th><th class='text'>corrector</th><th>DC ratio</th><th class='text'>relaxation</th>"
    + "<th class='text'>basis</th><th class='text'>derivative points</th></tr>"
    + d.steps.map((s) => `<tr><td>${s.step}</td><td>${fmt(s.t_from)}</td><td>${fmt(s.t_to)}</td>`
      + `<td>${s.lambda_to === null ? "∞ (t = 0)" : fmt(s.lambda_to)}</td><td>${s.order}</td>`
      + `<td class="text">${esc(s.prediction)}</td><td class="text">${esc(s.corrector)}</td><td>${fmt(s.dc_ratio)}</td>`
      + `<td class="text">${esc(s.relaxation)}</td><td class="text">${esc(s.basis)}</td>`
      + `<td class="text">${esc(s.points.join(", "))}</td></tr>`).join("");
  renderGrid(d);
}

function renderGrid(d) {
  const box = $("sample-grid");
  if (!d.grid) {
    box.innerHTML = "";
    return;
  }
  const src = REPORT ? (REPORT.grids || {})[d.trial] : d.grid;
  const head = `<h3>Samples</h3><p class="hint">The first held-out noises sampled by this schedule, by the best `
    + `preset at NFE ${d.nfe} and by the reference solution; under each sample, its RMS error to the reference.</p>`;
  if (!src) {
    box.innerHTML = head + "<p class='hint'>the sample grid of this trial is not in the report</p>";
    return;
  }
  box.innerHTML = head + `<img id="sample-grid-img" alt="samples of trial ${d.trial}" src="${esc(src)}">`;
  if (!REPORT) {
    $("sample-grid-img").onerror = () => fetch(src).then((r) => r.json()).then((j) => {
      box.innerHTML = head + `<p class="hint">no grid: ${esc(j.detail || "the server could not draw it")}</p>`;
    }).catch(showError);
  }
}

// ---- relaxation ----------------------------------------------------------------------------------

async function renderRelaxation() {
  const studies = await api("/api/relaxation/studies");
  state.relaxStudy = fillSelect($("relax-study"), studies.map((s) => [s, s]), state.relaxStudy);
  if (!state.relaxStudy) { $("omega-plot").textContent = "No relaxation (SOR) studies in the database."; return; }
  const d = await latest("relaxation", api("/api/relaxation", { study: state.relaxStudy }));
  await Plotly.react($("omega-plot"), [{
    type: "scatter", mode: "markers", name: "ω", x: d.rounds, y: d.omega,
    text: d.iterations.map((n, i) => `${fmt(n)} iterations${d.converged[i] === false ? " (not converged)" : ""}`),
    marker: { size: 9, color: d.iterations, colorscale: "Viridis", showscale: true, colorbar: { title: { text: "iters" } } },
    hovertemplate: "round %{x}: ω %{y:.3f}, %{text}<extra></extra>",
  }], {
    title: { text: `${d.study} (${d.method}): chosen ω per instance` },
    xaxis: { title: { text: "instance (round)" } }, yaxis: { title: { text: "ω" } }, margin: { t: 50 },
  }, PLOT_CONFIG);
  const traces = d.curves.map((c, i) => ({
    type: "scatter", mode: "lines", name: `${c.name} (${c.method})`, x: c.rounds, y: c.cumulative,
    line: { width: i === 0 ? 3 : 1.5, dash: i === 0 ? "solid" : "dash", color: COLORS[i % COLORS.length] },
  }));
  await Plotly.react($("cumulative-plot"), traces, {
    title: { text: "cumulative SOR iterations vs baselines" },
    xaxis: { title: { text: "instance (round)" } }, yaxis: { title: { text: "cumulative iterations" } }, margin: { t: 50 },
  }, PLOT_CONFIG);
  $("cumulative-plot").dataset.traces = String(traces.length);
  renderVerdict(d.verdict);
}

function renderVerdict(v) {
  const ratio = (x) => (x === null || x === undefined ? "—" : `${x.toFixed(2)}×`);
  const s3 = (x) => x.toFixed(3);
  $("relax-verdict").innerHTML = "<thead><tr><th class=\"text\">policy</th><th>iterations</th><th>seconds</th>"
    + "<th>solves</th><th>learner + probing</th><th>vs study (its.)</th><th>vs study (s)</th></tr></thead><tbody>"
    + v.policies.map((p) => `<tr data-kind="${esc(p.kind)}"><td class="text">${esc(p.policy)}</td>`
      + `<td>${Math.round(p.iterations)}</td><td>${s3(p.seconds.total)}</td><td>${s3(p.seconds.solve)}</td>`
      + `<td>${s3(p.seconds.learner + p.seconds.probe)}</td><td>${ratio(p.vs_study.iterations)}</td>`
      + `<td>${ratio(p.vs_study.seconds)}</td></tr>`).join("") + "</tbody>";
  $("relax-verdict-note").textContent = v.from === "relax-report"
    ? "Totals over the study's instances: its own rounds (solves + learner + probing) and the baselines run online "
      + `over the same instances with the same solver (${v.kernel || "pyamg"} kernel; adaptive SOR runs compiled) `
      + "by steptune relax-report."
    : `The study's own totals (solves + learner + probing); run steptune relax-report --study ${state.relaxStudy} `
      + "to add Gauss–Seidel, the best fixed ω, the instance-optimal ω and adaptive SOR.";
}

// ---- start-up and live refresh -------------------------------------------------------------------

function fidelityChoices() {
  const prob = currentProblem();
  return [["", "all"], ...((prob && prob.fidelities) || []).map((f) => [f, f || "(none)"])];
}

async function loadProblems() {
  state.problems = await api("/api/problems");
  const withTrials = state.problems.filter((p) => trialStudies(p).length);
  const choices = (withTrials.length ? withTrials : state.problems).map((p) => [String(p.id),
    `${p.name}${p.noise ? ` (${p.noise})` : ""}`]);
  state.problem = fillSelect($("problem"), choices, state.problem);
  state.fidelity = fillSelect($("fidelity"), fidelityChoices(), state.fidelity);
}

async function poll() {
  if (!$("live").checked) return;
  try {
    const s = await api("/api/status");
    if (state.token !== null && s.token !== state.token) {
      await loadProblems();
      await render();
    }
    state.token = s.token;
    $("refreshed").textContent = `checked ${new Date().toLocaleTimeString()}`
      + (s.running ? ` · ${s.running} running` : "");
  } catch (err) {
    $("refreshed").textContent = `refresh failed: ${err.message}`;
  }
}

async function start() {
  try {
    state.config = REPORT ? REPORT.config : await api("/api/config");
    if (REPORT) {
      $("live").parentElement.hidden = true;
      state.table.study = REPORT.study || "";
      $("refreshed").textContent = `report of ${REPORT.study}, written ${REPORT.written}`;
    }
    await loadProblems();
  } catch (err) { showError(err); return; }
  $("problem").addEventListener("change", (ev) => {
    state.problem = ev.target.value;
    state.table.offset = 0;
    state.fidelity = fillSelect($("fidelity"), fidelityChoices(), state.fidelity);
    render();
  });
  $("fidelity").addEventListener("change", (ev) => { state.fidelity = ev.target.value; render(); });
  $("history-study").addEventListener("change", (ev) => { state.historyStudy = ev.target.value; render(); });
  $("relax-study").addEventListener("change", (ev) => { state.relaxStudy = ev.target.value; render(); });
  bindTable();
  window.addEventListener("hashchange", route);
  await route();
  if (!REPORT) {
    await poll();
    setInterval(poll, 1000 * ((state.config && state.config.poll_seconds) || 5));
  }
}

start();
