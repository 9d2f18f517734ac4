// The page: score dropped images through /v1/predict in small chunks, rank them as they arrive, and fetch
// Grad-CAM heatmaps from /v1/explain only for cards on screen. No build step, no external requests.
"use strict";

const $ = (id) => document.getElementById(id);
const SCORE_CHUNK = 4;  // small requests, so progress moves and results show early
const EXPLAIN_CHUNK = 2;
const RETRIES = 3;  // a 503 (queue full) is retried after Retry-After
// Friendly names for the datasets the bundled models name in their metadata.
const DATASETS = {
  lnsim: "LNSIM (natural outdoor scenes)", lamem: "LaMem", memcat: "MemCat", sun: "SUN memorability",
  synthetic: "synthetic test images",
};

// Every file ever added, in upload order (the order of `resmemnet predict`'s rows):
// {id, name, file, url, score, std, error, overlay, heat: "none"|"queued"|"loading"|"done"|"failed", card, tr}
const rows = [];
let limits = { max_files: 16, max_file_bytes: 10 * 2 ** 20 };
let view = "cards";
let sort = { key: "rank", dir: "asc" };
let nextId = 0;
let scoring = 0;  // uploads in flight; heatmaps wait for them, scores come first
const explainQueue = [];
let explaining = false;

function setStatus(text) { $("status").textContent = text; }

function setBusy(delta) {
  // Tests and screenshots wait for data-pending to reach 0.
  const n = Number(document.body.dataset.pending || 0) + delta;
  document.body.dataset.pending = String(n);
}

const scored = () => rows.filter((r) => r.score !== null);
const hasSpread = () => rows.some((r) => r.std !== null);
const fmt = (x) => x.toFixed(3);

// ------------------------------------------------------------------ ranking and "too close to call"
function ranked() {
  const list = scored().sort((a, b) => b.score - a.score || a.id - b.id);
  list.forEach((r, i) => {
    // Ties share the better rank, like the API's.
    r.rank = i > 0 && r.score === list[i - 1].score ? list[i - 1].rank : i + 1;
    r.closeTo = [];
  });
  for (let i = 0; i + 1 < list.length; i++) {
    const [a, b] = [list[i], list[i + 1]];
    if (a.std === null || b.std === null) continue;
    if (a.score - a.std <= b.score + b.std) {  // a is above b, so the ranges overlap when a's low end reaches b's high
      a.closeTo.push(b);
      b.closeTo.push(a);
    }
  }
  return list;
}

function closeText(r) {
  return r.closeTo.length ? `too close to call with ${r.closeTo.map((o) => `#${o.rank}`).join(" and ")}` : "";
}

// ------------------------------------------------------------------ the score bar
function meter(r) {
  const m = document.createElement("div");
  m.className = "meter";
  m.setAttribute("role", "meter");
  m.setAttribute("aria-valuemin", "0");
  m.setAttribute("aria-valuemax", "1");
  m.setAttribute("aria-valuenow", fmt(r.score));
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = `${(100 * r.score).toFixed(1)}%`;
  m.appendChild(fill);
  if (r.std !== null) {
    const lo = Math.max(0, r.score - r.std);
    const hi = Math.min(1, r.score + r.std);
    const range = document.createElement("span");
    range.className = "range";
    range.style.left = `${(100 * lo).toFixed(2)}%`;
    range.style.width = `${(100 * (hi - lo)).toFixed(2)}%`;
    m.appendChild(range);
    m.setAttribute("aria-valuetext", `${fmt(r.score)}, likely between ${fmt(lo)} and ${fmt(hi)}`);
    m.setAttribute("aria-label", `Score of ${r.name} with its range`);
  } else {
    m.setAttribute("aria-label", `Score of ${r.name}`);
  }
  return m;
}

function scoreText(r, parent) {
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = fmt(r.score);
  parent.appendChild(score);
  if (r.std !== null) {
    const std = document.createElement("span");
    std.className = "std";
    std.textContent = `± ${fmt(r.std)}`;
    std.setAttribute("aria-label", `plus or minus ${fmt(r.std)}`);
    parent.appendChild(std);
  }
}

// ------------------------------------------------------------------ cards (built once per image, then moved)
function card(r) {
  const li = document.createElement("li");
  li.className = "result";
  li.dataset.score = r.score;
  if (r.std !== null) li.dataset.std = r.std;
  li.dataset.name = r.name;
  const head = document.createElement("div");
  head.className = "result-head";
  const badge = document.createElement("span");
  badge.className = "rank";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = r.name;
  name.title = r.name;
  head.append(badge, name);
  scoreText(r, head);
  const close = document.createElement("p");
  close.className = "close";
  close.hidden = true;
  const figures = document.createElement("div");
  figures.className = "figures";
  const photo = figure(r.url, "photo", `photo of ${r.name}`);
  const heat = document.createElement("figure");
  heat.className = "heat-slot";
  const wait = document.createElement("div");
  wait.className = "placeholder";
  wait.textContent = "heatmap…";
  const cap = document.createElement("figcaption");
  cap.textContent = "heatmap";
  heat.append(wait, cap);
  figures.append(photo, heat);
  li.append(head, meter(r), close, figures);
  observer.observe(li);
  return li;
}

function figure(src, cls, alt) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.className = cls;
  img.src = src;
  img.alt = alt;
  img.decoding = "async";
  const cap = document.createElement("figcaption");
  cap.textContent = cls;
  fig.append(img, cap);
  return fig;
}

function showHeatmap(r) {
  if (!r.card) return;
  const slot = r.card.querySelector(".heat-slot");
  if (r.heat === "done") {
    slot.replaceWith(figure(r.overlay, "heatmap", `heatmap of ${r.name}`));
  } else if (r.heat === "failed") {
    slot.querySelector(".placeholder").textContent = "heatmap unavailable";
    slot.title = r.heatError || "";
  }
}

// ------------------------------------------------------------------ table rows (built once per image)
function tableRow(r) {
  const tr = document.createElement("tr");
  tr.dataset.score = r.score;
  tr.dataset.name = r.name;
  const rank = document.createElement("td");
  rank.className = "rank";
  const thumb = document.createElement("td");
  const img = document.createElement("img");
  img.className = "thumb";
  img.src = r.url;
  img.alt = "";  // the file name is in the next cell
  img.loading = "lazy";
  img.decoding = "async";
  thumb.appendChild(img);
  // The note sits under the name, so the table needs no fifth column on a phone.
  const name = document.createElement("td");
  const label = document.createElement("span");
  label.className = "name";
  label.textContent = r.name;
  label.title = r.name;
  const note = document.createElement("span");
  note.className = "close";
  name.append(label, note);
  const score = document.createElement("td");
  score.className = "score-cell";
  scoreText(r, score);
  score.appendChild(meter(r));
  tr.append(rank, thumb, name, score);
  return tr;
}

function tableOrder(list) {
  const dir = sort.dir === "asc" ? 1 : -1;
  const key = {
    rank: (a, b) => a.rank - b.rank || a.id - b.id,
    score: (a, b) => a.score - b.score || b.id - a.id,
    name: (a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }) || a.id - b.id,
  }[sort.key];
  return [...list].sort((a, b) => dir * key(a, b));
}

// ------------------------------------------------------------------ render: reorder the cached elements
function render() {
  const list = ranked();
  for (const r of list) {
    r.card = r.card || card(r);
    r.tr = r.tr || tableRow(r);
    const note = closeText(r);
    r.card.querySelector(".rank").textContent = `#${r.rank}`;
    r.tr.querySelector(".rank").textContent = `${r.rank}`;
    const close = r.card.querySelector(".close");
    close.textContent = note;
    close.hidden = !note;
    r.card.classList.toggle("is-close", Boolean(note));
    r.tr.querySelector(".close").textContent = note;
  }
  // appendChild moves an element, so images already decoded are not reloaded.
  const results = $("results");
  for (const r of list) results.appendChild(r.card);
  const body = $("table-body");
  for (const r of tableOrder(list)) body.appendChild(r.tr);
  for (const th of document.querySelectorAll("#table th[data-key]")) {
    th.setAttribute("aria-sort", th.dataset.key === sort.key ? (sort.dir === "asc" ? "ascending" : "descending") : "none");
  }
  const any = rows.length > 0;
  $("download-csv").disabled = !any;
  $("download-json").disabled = !any;
  $("clear").hidden = !any && $("errors").children.length === 0;
}

function setView(next) {
  view = next;
  $("results").hidden = view !== "cards";
  $("table-wrap").hidden = view !== "table";
  $("view-cards").setAttribute("aria-pressed", String(view === "cards"));
  $("view-table").setAttribute("aria-pressed", String(view === "table"));
}

function sortBy(key) {
  if (sort.key === key) sort.dir = sort.dir === "asc" ? "desc" : "asc";
  else sort = { key, dir: key === "score" ? "desc" : "asc" };
  render();
}

// ------------------------------------------------------------------ errors appear as files fail
function fail(r, reason) {
  r.error = reason;
  const li = document.createElement("li");
  li.textContent = `${r.name}: ${reason}`;
  $("errors").appendChild(li);
}

function requestError(message) {
  const li = document.createElement("li");
  li.textContent = message;
  $("errors").appendChild(li);
}

// ------------------------------------------------------------------ talking to the server
const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

async function post(path, files) {
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(path, { method: "POST", body: form });
    if (response.status === 503 && attempt < RETRIES) {
      await sleep(1000 * Number(response.headers.get("Retry-After") || 1));
      continue;
    }
    const body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    return { ok: response.ok, status: response.status, body, detail };
  }
}

// The server answers 422 for a request with no usable image at all; its message then names every file.
function reasonFor(detail, name) {
  const all = /^No usable image in the upload \((.*)\)$/s.exec(detail || "");
  const text = all ? all[1] : detail;
  return text.startsWith(`${name}: `) ? text.slice(name.length + 2) : text;
}

async function scoreChunk(chunk) {
  let reply;
  try {
    reply = await post("/v1/predict", chunk.map((r) => r.file));
  } catch (err) {
    for (const r of chunk) fail(r, `could not reach the server (${err.message})`);
    return;
  }
  if (reply.ok) {
    for (const x of reply.body.results) {
      const r = chunk[x.index];
      if (x.error) fail(r, x.error);
      else { r.score = x.score; r.std = x.score_std ?? null; }
    }
  } else if (reply.status === 422 && chunk.length > 1) {
    for (const r of chunk) await scoreChunk([r]);  // each file's own reason
  } else {
    for (const r of chunk) fail(r, chunk.length === 1 ? reasonFor(reply.detail, r.name) : reply.detail);
  }
}

async function upload(fileList) {
  const added = [];
  for (const f of fileList) {
    const r = { id: nextId++, name: f.name, file: f, url: URL.createObjectURL(f), score: null, std: null,
                error: "", overlay: null, heat: "none" };
    rows.push(r);
    added.push(r);
    if (f.size > limits.max_file_bytes) fail(r, `larger than ${(limits.max_file_bytes / 2 ** 20).toFixed(0)} MB`);
  }
  const todo = added.filter((r) => !r.error);
  if (!added.length) return;
  scoring++;
  setBusy(1);
  const progress = $("progress");
  progress.max = added.length;
  progress.hidden = false;
  let done = added.length - todo.length;
  const size = Math.max(1, Math.min(SCORE_CHUNK, limits.max_files));
  const report = () => {
    progress.value = done;
    setStatus(`${done} of ${added.length} scored…`);
  };
  report();
  render();
  for (let start = 0; start < todo.length; start += size) {
    const chunk = todo.slice(start, start + size);
    await scoreChunk(chunk);
    done += chunk.length;
    report();
    render();
  }
  progress.hidden = true;
  scoring--;
  setBusy(-1);
  const n = scored().length;
  const bad = rows.length - n;
  setStatus(n ? `${n} image${n > 1 ? "s" : ""} scored, most memorable first` +
               (bad ? `; ${bad} could not be scored` : "") : "No image could be scored");
  drainExplanations();
}

// Heatmaps cost a Grad-CAM pass each: fetch them only for cards that come on screen, a few at a time.
const observer = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (!e.isIntersecting) continue;
    const r = rows.find((x) => x.card === e.target);
    observer.unobserve(e.target);
    if (r && r.heat === "none") {
      r.heat = "queued";
      explainQueue.push(r);
      setBusy(1);
    }
  }
  drainExplanations();
}, { rootMargin: "200px" });

async function drainExplanations() {
  if (explaining || scoring) return;
  explaining = true;
  while (explainQueue.length && !scoring) {
    const chunk = explainQueue.splice(0, EXPLAIN_CHUNK).filter((r) => rows.includes(r));
    for (const r of chunk) r.heat = "loading";
    try {
      const reply = await post("/v1/explain", chunk.map((r) => r.file));
      for (const [i, r] of chunk.entries()) {
        const x = reply.ok ? reply.body.results[i] : null;
        if (x && x.overlay_png) { r.overlay = `data:image/png;base64,${x.overlay_png}`; r.heat = "done"; }
        else { r.heat = "failed"; r.heatError = x ? x.error : reply.detail; }
        showHeatmap(r);
      }
    } catch (err) {
      for (const r of chunk) { r.heat = "failed"; r.heatError = err.message; showHeatmap(r); }
    }
    setBusy(-chunk.length);
  }
  explaining = false;
}

// ------------------------------------------------------------------ downloads, in `resmemnet predict`'s format
// Python's repr of a float, so the files match the CLI's byte for byte: shortest round-trip digits,
// exponent form below 1e-4 with a two-digit exponent, and ".0" on whole numbers.
function pyFloat(x) {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "nan" : (x > 0 ? "inf" : "-inf");
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-4 || a >= 1e16)) {
    return x.toExponential().replace(/e([+-])(\d)$/, "e$10$2");
  }
  const s = String(x);
  return Number.isInteger(x) ? `${s}.0` : s;
}

// The CLI's CSV guard against spreadsheet formulas (OWASP): a leading quote, doubled if already there.
const csvEscape = (text) => (/^[=+\-@\t\r']/.test(text) ? `'${text}` : text);
const csvCell = (text) => (/[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text);
// Python's json.dumps escapes every non-ASCII character.
const pyJson = (text) => JSON.stringify(text).replace(/[\u0080-\uffff]/g,
  (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);

function fields() {
  return hasSpread() ? ["path", "score", "error", "score_std"] : ["path", "score", "error"];
}

function toCsv() {
  const cols = fields();
  const lines = [cols.join(",")];
  for (const r of rows) {
    const cells = [csvEscape(r.name), r.score === null ? "" : pyFloat(r.score), csvEscape(r.error)];
    if (cols.length === 4) cells.push(r.std === null ? "" : pyFloat(r.std));
    lines.push(cells.map(csvCell).join(","));
  }
  return lines.join("\r\n") + "\r\n";
}

function toJson() {
  const spread = fields().length === 4;
  const items = rows.map((r) => {
    let s = `{"path": ${pyJson(r.name)}, "score": ${r.score === null ? "null" : pyFloat(r.score)}, ` +
            `"error": ${pyJson(r.error)}`;
    if (spread) s += `, "score_std": ${r.std === null ? "null" : pyFloat(r.std)}`;
    return `${s}}`;
  });
  return `[${items.map((s) => `\n${s}`).join(",")}\n]\n`;
}

function download(text, type, name) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ------------------------------------------------------------------ clearing and the model card
function clearAll() {
  for (const r of rows) {
    URL.revokeObjectURL(r.url);
    if (r.card) observer.unobserve(r.card);
  }
  const pending = explainQueue.length;
  explainQueue.length = 0;
  setBusy(-pending);
  rows.length = 0;
  $("results").replaceChildren();
  $("table-body").replaceChildren();
  $("errors").replaceChildren();
  setStatus("");
  render();
  $("files").focus();
}

function trainingLine(card) {
  const meta = card.metadata || {};
  const dataset = meta.split && meta.split.dataset;
  const where = dataset ? (DATASETS[dataset] || dataset) : null;
  const detail = meta.training_data;
  let text;
  if (where && detail) text = `This model was trained on ${where}: ${detail}.`;
  else if (detail) text = `This model was trained on ${detail}.`;
  else if (where) text = `This model was trained on ${where}.`;
  else text = "This model's file does not say what it was trained on.";
  return `${text} Scores are best compared within one kind of photo (landscapes with landscapes, food with food).`;
}

async function loadModel() {
  try {
    const card = await (await fetch("/v1/model")).json();
    limits = card.limits;
    const name = card.metadata && card.metadata.name ? `${card.metadata.name}: ` : "";
    $("model").textContent = `Model: ${name}${card.backbone} + ${card.head}.`;
    $("limits").textContent = `JPEG, PNG, WebP, GIF, BMP or TIFF; up to ${(limits.max_file_bytes / 2 ** 20).toFixed(0)} MB per image`;
    $("context").textContent = trainingLine(card);
  } catch (err) {
    setStatus(`The model card could not be loaded (${err.message}); uploads may still work.`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
  $("clear").addEventListener("click", clearAll);
  $("view-cards").addEventListener("click", () => setView("cards"));
  $("view-table").addEventListener("click", () => setView("table"));
  for (const b of document.querySelectorAll("#table th button")) b.addEventListener("click", () => sortBy(b.dataset.key));
  $("download-csv").addEventListener("click", () => download(toCsv(), "text/csv", "resmemnet-scores.csv"));
  $("download-json").addEventListener("click", () => download(toJson(), "application/json", "resmemnet-scores.json"));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => upload([...e.dataTransfer.files]));
  document.body.dataset.pending = "0";
  loadModel();
});
