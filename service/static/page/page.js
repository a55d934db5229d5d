// dendro's page: studies, budgets, workers and accuracy against size, polled from the REST API.
// Plain JS, no build step; plotly.js comes from the installed plotly package. Every text
// that comes from the server is set with textContent, never as HTML.
"use strict";

(() => {
  const POLL_MS = 3000;
  const PAGE = 1000; // trials per request; falls back to the server's default page when smaller
  const dashboard = document.body.dataset.dashboard === "true";
  const $ = (sel) => document.querySelector(sel);
  const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  const fmtNum = (v) => {
    if (v === null || v === undefined) return "–";
    const s = Number(v).toPrecision(4);
    return s.includes(".") && !s.includes("e") ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
  };

  let token = sessionStorage.getItem("dendro_token");
  let pageSize = PAGE;
  let skew = 0; // server clock minus this browser's, in seconds (from the Date header)
  let refreshes = 0;
  const cache = new Map(); // study name -> {key, trials: Map(number -> trial), card}

  class NeedsToken extends Error {}

  async function api(path) {
    const r = await fetch(path, { headers: token ? { Authorization: `Bearer ${token}` } : {}, cache: "no-store" });
    const date = r.headers.get("date");
    if (date) {
      // The header has whole seconds: correct only a real difference between the clocks.
      const s = (Date.parse(date) - Date.now()) / 1000;
      skew = Math.abs(s) > 2 ? s : 0;
    }
    if (r.status === 401) throw new NeedsToken("this server needs the API token for reads");
    if (!r.ok) {
      let detail = `HTTP ${r.status}`;
      try { const body = await r.json(); if (typeof body.detail === "string") detail = body.detail; } catch (_) { /* not JSON */ }
      const err = new Error(`${path}: ${detail}`);
      err.status = r.status;
      throw err;
    }
    return r.json();
  }

  // Plotly reads a few HTML tags in hover text: a value from the server is escaped first.
  const esc = (v) => String(v).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  // -- trials: a finished trial never changes, so only the open ones and the new ones are read -
  async function trialsFrom(name, start) {
    const out = [];
    for (let offset = start; ; ) {
      const q = new URLSearchParams({ offset: String(offset), limit: String(pageSize) });
      let page;
      try {
        page = await api(`/v1/studies/${encodeURIComponent(name)}/trials?${q}`);
      } catch (err) {
        if (err.status === 422 && pageSize !== 50) { pageSize = 50; continue; } // a smaller max_page_size
        throw err;
      }
      out.push(...page.data);
      offset += page.data.length;
      if (page.data.length === 0 || offset >= page.count) return out;
    }
  }

  async function trialsOf(study) {
    const p = study.progress;
    const key = `${p.total}:${p.complete}:${p.pruned}:${p.failed}:${p.infeasible}:${p.running}:${p.waiting}`;
    let entry = cache.get(study.name);
    if (!entry || entry.id !== study.study_id || p.total < entry.list.length) {
      if (entry) dropCard(entry); // a new study of the same name
      entry = { id: study.study_id, key: null, list: [], trials: new Map(), card: null };
      cache.set(study.name, entry);
    }
    // Running trials change (their epoch) while the counts stay the same.
    if (entry.key !== key || p.running > 0) {
      // Trials come in number order: everything before the first open one is final.
      let from = entry.list.findIndex((t) => t.state === "running" || t.state === "waiting");
      if (from < 0) from = entry.list.length;
      entry.list = entry.list.slice(0, from).concat(await trialsFrom(study.name, from));
      entry.trials = new Map(entry.list.map((t) => [t.number, t]));
      entry.key = key;
    }
    return entry;
  }

  function dropCard(entry) {
    if (!entry.card) return;
    Plotly.purge(entry.card.querySelector(".plot"));
    entry.card.remove();
    entry.card = null;
  }

  // -- studies ----------------------------------------------------------------------------------
  function family(spec) {
    const arch = spec.search_space && spec.search_space.architecture;
    if (arch) {
      const choices = Array.isArray(arch) ? arch : (arch.choices || arch.values || []);
      return `searched: ${choices.join(", ")}`;
    }
    return spec.model;
  }

  function metricOf(study, trials) {
    // The accuracy when there is one (classification); else the first objective.
    const objectives = study.objectives.length ? study.objectives : ["val_accuracy"];
    const any = trials.some((t) => t.metrics && typeof t.metrics.val_accuracy === "number");
    const name = any || objectives.includes("val_accuracy") ? "val_accuracy" : objectives[0];
    const index = objectives.indexOf(name);
    const maximize = index >= 0 ? study.directions[index] === "maximize" : name.includes("accuracy");
    const value = (t) => {
      if (t.metrics && typeof t.metrics[name] === "number") return t.metrics[name];
      if (index >= 0 && t.values && typeof t.values[index] === "number") return t.values[index];
      return null;
    };
    return { name, maximize, value };
  }

  function bestText(study, trials) {
    if (study.pareto_trials) {
      const shown = study.pareto_trials.slice(0, 8).map((n) => `#${n}`).join(", ");
      return `Pareto front: ${study.pareto_trials.length} trial(s) (${shown}${study.pareto_trials.length > 8 ? ", …" : ""})`;
    }
    if (study.best_value === null || study.best_value === undefined) return "–";
    const t = trials.get(study.best_trial);
    const size = t && t.n_params !== null ? `, ${fmtInt(t.n_params)} params` : "";
    return `${fmtNum(study.best_value)} ${study.objectives[0] || ""} (trial #${study.best_trial}${size})`;
  }

  function finalText(final) {
    // The honest final answer (POST /v1/studies/{name}/finalize): top trials re-trained with fresh seeds.
    if (!final) return "";
    if (final.state === "queued") return `final: queued (top ${final.top_n} × ${final.seeds} seeds × ${final.n_epochs} epochs)`;
    if (final.state === "running") return `final: running (top ${final.top_n} × ${final.seeds} seeds × ${final.n_epochs} epochs)`;
    if (final.state === "error") return `final: error: ${final.reason || "no reason given"}`;
    const pct = (v) => (100 * v).toFixed(1);
    const who = `trial ${final.trial}, ${fmtInt(final.n_params)} params`;
    if (typeof final.test_accuracy_mean === "number") {
      return `final: test ${pct(final.test_accuracy_mean)}% ± ${pct(final.test_accuracy_std || 0)} (${who})`;
    }
    if (typeof final.test_loss_mean === "number") {
      return `final: test loss ${fmtNum(final.test_loss_mean)} ± ${fmtNum(final.test_loss_std || 0)} (${who})`;
    }
    return `final: ${final.state}`;
  }

  function makeCard(study) {
    const card = el("article", { class: "study", id: `study-${study.name}`, "data-study": study.name });
    const title = el("h3", { text: study.name });
    const state = el("span", { class: "state" });
    const links = el("span", { class: "links" });
    if (dashboard) {
      links.append(el("a", { class: "dashboard-link", href: `/dashboard/studies/${study.study_id}`, text: "open in dashboard" }));
    }
    const error = el("p", { class: "study-error" });
    error.hidden = true;
    const facts = el("dl", { class: "facts" });
    const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0" },
      el("span", { class: "complete" }), el("span", { class: "pruned" }), el("span", { class: "running" }));
    const label = el("span", { class: "label" });
    const plot = el("div", { class: "plot" });
    const final = el("p", { class: "study-final" });
    final.hidden = true;
    card.append(el("header", {}, title, state, links), error, facts, final,
      el("div", { class: "progress" }, bar, label), plot);
    return card;
  }

  function updateCard(entry, study) {
    const card = entry.card;
    const spec = study.spec || {};
    const trials = entry.trials;
    const state = card.querySelector(".state");
    state.textContent = study.state;
    state.className = `state state-${study.state}`;

    const error = card.querySelector(".study-error");
    const reason = study.error || (study.state === "error" ? "the study cannot run (no reason given)" : "");
    error.textContent = reason ? `error: ${reason}` : "";
    error.hidden = !reason;

    const facts = card.querySelector(".facts");
    const dirs = study.objectives.map((o, i) => `${study.directions[i] || ""} ${o}`.trim()).join(", ");
    const rows = [
      ["family", family(spec)], ["dataset", spec.dataset],
      ["budget", spec.max_params ? `${fmtInt(spec.max_params)} params` : "none"], ["objective", dirs],
      ["best", bestText(study, trials)], ["sampler / pruner", `${spec.sampler} / ${spec.pruner}`],
    ];
    const final = card.querySelector(".study-final");
    final.textContent = finalText(study.final);
    final.hidden = !final.textContent;
    final.className = `study-final final-${study.final ? study.final.state : "none"}`;
    if (study.final && study.final.state === "done") {
      const f = study.final;
      final.title = `chosen on validation (mean of ${f.seeds} seeds × ${f.n_epochs} epochs over the top ${f.top_n} trials); test is only reported`;
    }
    facts.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { class: `fact-${k.split(" ")[0]}`, text: v ?? "–" })]));

    const p = study.progress;
    const n = Math.max(study.n_trials, 1);
    const pct = (x) => `${Math.min(100, (100 * x) / n)}%`;
    const bar = card.querySelector(".bar");
    bar.querySelector(".complete").style.width = pct(p.complete);
    bar.querySelector(".pruned").style.width = pct(p.pruned);
    bar.querySelector(".running").style.width = pct(Math.max(0, Math.min(p.running, study.n_trials - p.finished)));
    bar.setAttribute("aria-valuemax", String(study.n_trials));
    bar.setAttribute("aria-valuenow", String(p.finished));
    const extra = [`${p.running} running`];
    if (p.infeasible) extra.push(`${p.infeasible} over budget`);
    if (p.failed) extra.push(`${p.failed} failed`);
    card.querySelector(".label").textContent = `${p.finished} / ${study.n_trials} finished · ${extra.join(" · ")}`;

    drawPlot(card.querySelector(".plot"), study, [...trials.values()]);
  }

  // -- the plot: accuracy against parameters, the budget line, the Pareto front ------------------
  function drawPlot(div, study, trials) {
    const m = metricOf(study, trials);
    const budget = study.spec && study.spec.max_params;
    const sized = trials.filter((t) => typeof t.n_params === "number");
    const trained = sized.filter((t) => !t.infeasible && m.value(t) !== null && (t.state === "complete" || t.state === "pruned"));
    const over = sized.filter((t) => t.infeasible);
    if (!trained.length && !over.length) {
      if (div.dataset.drawn) { Plotly.purge(div); delete div.dataset.drawn; }
      div.className = "plot plot-empty";
      div.textContent = "No trained trial yet: accuracy against parameters shows here as trials finish.";
      return;
    }
    if (!div.dataset.drawn) { div.textContent = ""; div.className = "plot"; }

    const ys = trained.map(m.value);
    const floor = m.maximize ? 0 : Math.min(...ys, 0);
    const hover = (t) => {
      const params = Object.entries(t.params).map(([k, v]) => `${esc(k)}=${typeof v === "number" ? fmtNum(v) : esc(v)}`).join("<br>");
      return `trial #${t.number} (${t.state})<br>${fmtInt(t.n_params)} params<br>${esc(m.name)}=${fmtNum(m.value(t))}<br>${params}`;
    };
    const byState = (state, color, symbol, name) => {
      const ts = trained.filter((t) => t.state === state);
      return { type: "scatter", mode: "markers", name, x: ts.map((t) => t.n_params), y: ts.map(m.value),
               text: ts.map(hover), hoverinfo: "text", marker: { color, symbol, size: 8, line: { width: 1, color: "#fff" } } };
    };
    // The front of (fewer parameters, better metric) among trained complete trials.
    const sorted = trained.filter((t) => t.state === "complete").sort((a, b) => a.n_params - b.n_params || (m.maximize ? m.value(b) - m.value(a) : m.value(a) - m.value(b)));
    const front = [];
    for (const t of sorted) {
      const last = front[front.length - 1];
      if (!last || (m.maximize ? m.value(t) > m.value(last) : m.value(t) < m.value(last))) front.push(t);
    }
    const traces = [
      byState("complete", "#2f8f5b", "circle", "complete"),
      byState("pruned", "#9aa5a0", "circle-open", "pruned (stopped early)"),
      { type: "scatter", mode: "markers", name: "over budget (not trained)", x: over.map((t) => t.n_params),
        y: over.map(() => floor), text: over.map((t) => `trial #${t.number}: ${fmtInt(t.n_params)} params, over the budget; never trained`),
        hoverinfo: "text", marker: { color: "#c8553d", symbol: "x", size: 9 } },
      { type: "scatter", mode: "lines+markers", name: "Pareto front", x: front.map((t) => t.n_params), y: front.map(m.value),
        line: { shape: "hv", color: "#2f6f4e", width: 2 }, marker: { size: 5, color: "#2f6f4e" }, hoverinfo: "skip" },
    ];
    const best = study.best_trial !== null && study.best_trial !== undefined ? trials.find((t) => t.number === study.best_trial) : null;
    if (best && typeof best.n_params === "number" && m.value(best) !== null) {
      traces.push({ type: "scatter", mode: "markers", name: `best (trial #${best.number})`, x: [best.n_params], y: [m.value(best)],
                    text: [hover(best)], hoverinfo: "text", marker: { symbol: "star", size: 15, color: "#e0a100", line: { width: 1, color: "#6b4d00" } } });
    }
    const xmax = Math.max(budget || 0, ...sized.map((t) => t.n_params)) * 1.06;
    const layout = {
      margin: { l: 52, r: 12, t: 22, b: 42 }, uirevision: study.name, hovermode: "closest",
      xaxis: { title: { text: "parameters (n_params)" }, range: [0, xmax], zeroline: false },
      yaxis: { title: { text: esc(m.name) }, zeroline: false, range: m.maximize ? [-0.03, 1.03] : undefined },
      legend: { orientation: "h", y: -0.25, font: { size: 11 } },
      shapes: budget ? [{ type: "line", x0: budget, x1: budget, yref: "paper", y0: 0, y1: 1, line: { color: "#c8553d", width: 2, dash: "dash" } }] : [],
      annotations: budget ? [{ x: budget, yref: "paper", y: 1, text: `budget ${fmtInt(budget)}`, showarrow: false, xanchor: "center", yanchor: "bottom", font: { color: "#c8553d", size: 11 } }] : [],
    };
    Plotly.react(div, traces, layout, { displaylogo: false, responsive: true });
    div.dataset.drawn = "1";
  }

  // -- workers ----------------------------------------------------------------------------------
  function ago(epochSeconds) {
    const s = Math.max(0, Date.now() / 1000 + skew - epochSeconds);
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    return `${(s / 3600).toFixed(1)} h ago`;
  }

  function renderWorkers(workers) {
    const body = $("#workers tbody");
    $("#workers-count").textContent = `(${workers.length} live)`;
    $("#workers").hidden = workers.length === 0;
    $("#no-workers").hidden = workers.length !== 0;
    body.replaceChildren(...workers.map((w) => {
      let trial = "–";
      if (w.study_name && w.trial_number !== null) {
        const entry = cache.get(w.study_name);
        const t = entry && entry.trials.get(w.trial_number);
        const epochs = entry ? entry.spec_epochs : null;
        trial = `#${w.trial_number}`;
        if (t && t.last_step !== null && t.last_step !== undefined) trial += ` (epoch ${t.last_step + 1}${epochs ? ` of ${epochs}` : ""})`;
      }
      const study = w.study_name ? el("a", { href: `#study-${w.study_name}`, text: w.study_name }) : "–";
      return el("tr", { "data-worker": w.worker_id },
        el("td", { class: "worker-id", text: w.worker_id }), el("td", { text: `${w.host}:${w.pid}` }),
        el("td", { text: w.device }), el("td", { text: w.state }), el("td", {}, study),
        el("td", { class: "trial", text: trial }), el("td", { class: "num", text: String(w.trials_done) }),
        el("td", { class: "beat", text: ago(w.last_heartbeat), title: new Date(w.last_heartbeat * 1000).toISOString() }));
    }));
  }

  // -- the loop ---------------------------------------------------------------------------------
  async function refresh() {
    const [studies, workers] = await Promise.all([api("/v1/studies"), api("/v1/workers")]);
    const box = $("#studies");
    const seen = new Set();
    for (const study of studies.data) {
      seen.add(study.name);
      let entry;
      try {
        entry = await trialsOf(study);
      } catch (err) {
        if (err.status === 404) continue; // deleted since the listing
        throw err;
      }
      entry.spec_epochs = study.spec && study.spec.n_epochs;
      if (!entry.card) { entry.card = makeCard(study); }
      box.append(entry.card); // in the API's order; a no-op move when already there
      updateCard(entry, study);
    }
    for (const [name, entry] of cache) {
      if (!seen.has(name)) { dropCard(entry); cache.delete(name); }
    }
    $("#studies-count").textContent = `(${studies.count})`;
    $("#no-studies").hidden = studies.count !== 0;
    renderWorkers(workers.data);
  }

  async function tick() {
    const status = $("#status");
    try {
      await refresh();
      refreshes += 1;
      document.body.dataset.refreshes = String(refreshes); // tests wait on this
      status.className = "";
      status.textContent = `updated ${new Date().toLocaleTimeString()} · every ${POLL_MS / 1000} s`;
      $("#token-form").hidden = true;
    } catch (err) {
      status.className = "error";
      status.textContent = err instanceof NeedsToken ? err.message : `cannot refresh: ${err.message}`;
      if (err instanceof NeedsToken) $("#token-form").hidden = false;
    }
  }

  async function loop() {
    if (!document.hidden) await tick(); // a hidden tab does not poll
    setTimeout(loop, POLL_MS);
  }

  $("#token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("#token").value.trim() || null;
    if (token) sessionStorage.setItem("dendro_token", token); else sessionStorage.removeItem("dendro_token");
    $("#token").value = "";
    tick();
  });
  if (!dashboard) for (const a of document.querySelectorAll(".needs-dashboard")) a.remove();
  loop();
})();
