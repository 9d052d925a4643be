// The page of `rectiflow serve`: plain JavaScript over the JSON API (no build step). Every text that comes
// from a user or the server goes in through textContent, never innerHTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { models: [], limits: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function getJSON(path) {
  const r = await fetch(path);
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

// POST /v1/generate; a full queue (429) is retried after its Retry-After, other errors are thrown with the
// server's one-line message (which names the field).
async function submit(body, onWait) {
  for (;;) {
    const r = await fetch("/v1/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const data = await r.json().catch(() => ({}));
    if (r.status === 202) return data.id;
    if (r.status === 429) {
      const seconds = Number(r.headers.get("Retry-After") || 1);
      if (onWait) onWait(`queue full, retrying in ${seconds} s`);
      await sleep(seconds * 1000);
      continue;
    }
    throw new Error(data.error || `HTTP ${r.status}`);
  }
}

// Follow a job through its server-sent events (or, if they fail, long polls) until it finishes.
function follow(id, onUpdate) {
  return new Promise((resolve) => {
    const finished = (job) => ["done", "failed", "cancelled"].includes(job.status);
    const source = new EventSource(`/v1/jobs/${id}/events`);
    source.addEventListener("job", (ev) => {
      const job = JSON.parse(ev.data);
      onUpdate(job);
      if (finished(job)) { source.close(); resolve(job); }
    });
    source.onerror = async () => {
      source.close();
      for (;;) {
        const job = await getJSON(`/v1/jobs/${id}?wait=10`).catch(() => null);
        if (job) { onUpdate(job); if (finished(job)) return resolve(job); } else await sleep(1000);
      }
    };
  });
}

function settingsLines(s) {
  const parts = [s.model, `${s.steps} step${s.steps === 1 ? "" : "s"}`, s.sampler, `seed ${s.seed}`, `${s.width}\u00d7${s.height}`];
  if (s.cfg_scale !== 1) parts.push(`CFG ${s.cfg_scale}`);
  if (s.shift !== null && s.shift !== undefined) parts.push(`shift ${s.shift}`);
  if (s.guidance !== null && s.guidance !== undefined) parts.push(`guidance ${s.guidance}`);
  for (const l of s.loras || []) parts.push(`LoRA ${l.name} ${l.scale}`);
  return parts.join(" \u00b7 ");
}

function progressBar() {
  const bar = el("div", { class: "bar" });
  const box = el("div", { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" }, bar);
  box.set = (p, label) => {
    bar.style.width = `${Math.round(p * 100)}%`;
    box.setAttribute("aria-valuenow", String(Math.round(p * 100)));
    if (label !== undefined) box.title = label;
  };
  return box;
}

// ------------------------------------------------------------------------------------------ models

function fillModels() {
  const select = $("#model");
  const boxes = $("#compare-models");
  for (const m of state.models) {
    select.append(el("option", { value: m.id, text: `${m.id} (${m.name})` }));
    const box = el("input", { type: "checkbox", value: m.id, name: "compare-model" });
    if (m === state.models[0]) box.checked = true;
    boxes.append(el("label", { class: "check" }, box, ` ${m.id}`));
  }
  select.addEventListener("change", showDefaults);
  showDefaults();
  const all = [...new Set(state.models.flatMap((m) => m.loras || []))];
  const axis = $("#compare-loras");
  axis.hidden = all.length === 0;
  for (const id of ["", ...all]) {
    const box = el("input", { type: "checkbox", value: id, name: "compare-lora" });
    if (id === "") box.checked = true;
    axis.append(el("label", { class: "check" }, box, ` ${id || "none"}`));
  }
}

// The chosen model's LoRAs, each with a checkbox and a scale.
function showLoras(model) {
  const box = $("#loras");
  box.replaceChildren(el("legend", { text: "LoRAs (scale)" }));
  const ids = (model && model.loras) || [];
  box.hidden = ids.length === 0;
  for (const id of ids) {
    box.append(el("label", { class: "check" },
      el("input", { type: "checkbox", name: "lora", value: id }), ` ${id} `,
      el("input", { type: "number", step: "0.1", value: "1", class: "scale", "data-lora": id })));
  }
}

function showDefaults() {
  const m = state.models.find((x) => x.id === $("#model").value) || state.models[0];
  if (!m) return;
  const d = m.defaults;
  for (const k of ["steps", "width", "height"]) $(`#${k}`).placeholder = String(d[k]);
  $("#cfg").placeholder = String(d.cfg_scale);
  $("#shift").placeholder = d.shift === null ? "none" : String(d.shift);
  $("#sampler").options[0].textContent = `${d.sampler} (default)`;
  showLoras(m);
}

async function refreshStatus() {
  try {
    const s = await getJSON("/v1/status");
    $("#server-status").textContent =
      `queue ${s.queued}/${s.queue_size} \u00b7 running ${s.running} \u00b7 ${s.store.images} images kept`;
  } catch (e) {
    $("#server-status").textContent = "server unreachable";
  }
}

// ------------------------------------------------------------------------------------------ generate

function formBody() {
  const body = { prompt: $("#prompt").value.trim() };
  const text = (id) => $(`#${id}`).value.trim();
  if (text("negative_prompt")) body.negative_prompt = text("negative_prompt");
  body.model = $("#model").value;
  if (text("sampler")) body.sampler = text("sampler");
  for (const k of ["steps", "width", "height", "seed", "n"]) if (text(k) !== "") body[k] = Number(text(k));
  for (const k of ["cfg", "guidance"]) if (text(k) !== "") body[k] = Number(text(k));
  body.loras = [...document.querySelectorAll("input[name=lora]:checked")].map((b) => ({
    id: b.value, scale: Number(document.querySelector(`input.scale[data-lora="${b.value}"]`).value || 1),
  }));
  const shift = text("shift");
  if (shift) body.shift = ["none", "flux"].includes(shift) ? shift : Number(shift);
  return body;
}

// The shapes-world scorer's verdict on an image of a shapes-world prompt (null for other prompts).
function verdictBadge(verdict) {
  if (!verdict) return null;
  return el("div", { class: `verdict ${verdict.correct ? "good" : "bad"}`,
                     text: verdict.correct ? "\u2713 correct" : `\u2717 ${verdict.failure}` });
}

function imageCard(url, settings, verdict) {
  const name = `rectiflow-${settings.seed}.png`;
  return el("figure", { class: "card" },
    el("a", { href: url, target: "_blank", class: "frame" }, el("img", { src: url, alt: settings.prompt })),
    el("figcaption", {},
      el("div", { class: "prompt", text: settings.prompt }),
      el("div", { class: "settings-line", text: settingsLines(settings) }),
      verdictBadge(verdict),
      el("a", { href: url, download: name, class: "download", text: "download" })));
}

async function generate(ev) {
  ev.preventDefault();
  const error = $("#generate-error");
  error.textContent = "";
  const body = formBody();
  const bar = progressBar();
  const note = el("div", { class: "settings-line", text: "queued" });
  const pending = el("figure", { class: "card pending" }, el("div", { class: "frame" }, bar),
    el("figcaption", {}, el("div", { class: "prompt", text: body.prompt }), note));
  $("#gallery").prepend(pending);
  try {
    const id = await submit(body, (msg) => { note.textContent = msg; });
    const job = await follow(id, (j) => {
      bar.set(j.progress);
      note.textContent = j.status === "queued" && j.queue_position !== null
        ? `queued (${j.queue_position} ahead)` : `${j.status} ${Math.round(j.progress * 100)}%`;
    });
    if (job.status !== "done") throw new Error(job.error || job.status);
    const cards = job.images.map((url, i) => imageCard(url, job.settings[i], (job.verdicts || [])[i]));
    pending.replaceWith(...cards);
  } catch (e) {
    pending.remove();
    error.textContent = e.message;
  }
}

// ------------------------------------------------------------------------------------------ compare

function numberList(text, what) {
  const values = text.split(",").map((s) => s.trim()).filter((s) => s !== "").map(Number);
  if (!values.length || values.some((v) => !Number.isInteger(v) || v < 0)) {
    throw new Error(`${what}: give whole numbers separated by commas, e.g. 1,4`);
  }
  return values;
}

async function compare(ev) {
  ev.preventDefault();
  const error = $("#compare-error");
  error.textContent = "";
  const out = $("#compare-grids");
  let prompts, steps, seeds;
  try {
    prompts = $("#compare-prompts").value.split("\n").map((s) => s.trim()).filter(Boolean);
    if (!prompts.length) throw new Error("prompts: give at least one");
    steps = numberList($("#compare-steps").value, "steps");
    seeds = numberList($("#compare-seeds").value, "seeds");
  } catch (e) { error.textContent = e.message; return; }
  const models = [...document.querySelectorAll("input[name=compare-model]:checked")].map((b) => b.value);
  if (!models.length) { error.textContent = "models: choose at least one"; return; }
  const loraChoices = [...document.querySelectorAll("input[name=compare-lora]:checked")].map((b) => b.value);
  const loras = loraChoices.length ? loraChoices : [""];
  const rows = models.flatMap((model) => loras
    .filter((l) => l === "" || (state.models.find((m) => m.id === model).loras || []).includes(l))
    .map((l) => ({ model, lora: l })));
  const cells = prompts.length * rows.length * steps.length * seeds.length;
  if (cells > 64) { error.textContent = `${cells} images: a comparison is limited to 64`; return; }
  const extra = {};
  for (const [k, id] of [["cfg", "compare-cfg"], ["width", "compare-width"], ["height", "compare-height"]]) {
    if ($(`#${id}`).value.trim() !== "") extra[k] = Number($(`#${id}`).value);
  }
  out.replaceChildren();
  const tasks = [];
  for (const prompt of prompts) {
    const table = el("table", { class: "grid" });
    const head = el("tr", {}, el("th", { class: "corner", text: "" }));
    for (const s of steps) head.append(el("th", { scope: "col", text: `${s} step${s === 1 ? "" : "s"}` }));
    table.append(el("thead", {}, head));
    const tbody = el("tbody");
    for (const { model, lora } of rows) {
      for (const seed of seeds) {
        const label = `${model}${lora ? ` + ${lora}` : ""} \u00b7 seed ${seed}`;
        const row = el("tr", {}, el("th", { scope: "row", text: label }));
        for (const s of steps) {
          const bar = progressBar();
          const cell = el("td", {}, el("div", { class: "frame" }, bar));
          row.append(cell);
          const body = { prompt, model, steps: s, seed, loras: lora ? [{ id: lora, scale: 1 }] : [], ...extra };
          tasks.push({ body, bar, cell });
        }
        tbody.append(row);
      }
    }
    table.append(tbody);
    out.append(el("section", { class: "compare" }, el("h2", { text: prompt }), table));
  }
  const button = $("#compare");
  button.disabled = true;
  const runs = [];
  for (const t of tasks) {  // submitted in order, so that the grid fills from the top left
    try {
      const id = await submit(t.body, (msg) => { t.bar.title = msg; });
      runs.push(follow(id, (j) => t.bar.set(j.progress)).then((job) => {
        if (job.status !== "done") throw new Error(job.error || job.status);
        const url = job.images[0];
        const s = job.settings[0];
        t.cell.replaceChildren(
          el("a", { href: url, target: "_blank", class: "frame" }, el("img", { src: url, alt: s.prompt })),
          el("div", { class: "settings-line", text: settingsLines(s) }),
          verdictBadge((job.verdicts || [])[0]) || "");
      }).catch((e) => { t.cell.replaceChildren(el("div", { class: "error", text: e.message })); }));
    } catch (e) {
      t.cell.replaceChildren(el("div", { class: "error", text: e.message }));
    }
  }
  await Promise.all(runs);
  button.disabled = false;
}

// ------------------------------------------------------------------------------------------ start

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
  $("#view-generate").hidden = name !== "generate";
  $("#view-compare").hidden = name !== "compare";
  if (name === "compare" && !$("#compare-prompts").value && $("#prompt").value) {
    $("#compare-prompts").value = $("#prompt").value;
  }
}

async function start() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  $("#generate-form").addEventListener("submit", generate);
  $("#compare-form").addEventListener("submit", compare);
  state.models = (await getJSON("/v1/models")).models;
  fillModels();
  refreshStatus();
  setInterval(refreshStatus, 2000);
  document.body.dataset.ready = "true";
}

start().catch((e) => { $("#generate-error").textContent = `could not load the models: ${e.message}`; });
