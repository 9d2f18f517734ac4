// The page: send dropped images to /v1/explain, then list them ranked by score. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const items = [];  // {name, score, original, overlay} across uploads, so new images join the ranking
let limits = { max_files: 16, max_file_bytes: 10 * 2 ** 20 };

function setStatus(text) { $("status").textContent = text; }

function showError(name, message) {
  const li = document.createElement("li");
  li.textContent = name ? `${name}: ${message}` : message;
  $("errors").appendChild(li);
}

function card(item, rank) {
  const li = document.createElement("li");
  li.className = "result";
  li.dataset.score = item.score;
  const head = document.createElement("div");
  head.className = "result-head";
  const badge = document.createElement("span");
  badge.className = "rank";
  badge.textContent = `#${rank}`;
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = item.name;
  name.title = item.name;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = item.score.toFixed(3);
  head.append(badge, name, score);
  const meter = document.createElement("div");
  meter.className = "meter";
  meter.setAttribute("role", "meter");
  meter.setAttribute("aria-valuemin", "0");
  meter.setAttribute("aria-valuemax", "1");
  meter.setAttribute("aria-valuenow", item.score.toFixed(3));
  const fill = document.createElement("span");
  fill.style.width = `${(100 * item.score).toFixed(1)}%`;
  meter.appendChild(fill);
  const figures = document.createElement("div");
  figures.className = "figures";
  for (const [src, cls, caption] of [[item.original, "photo", "photo"], [item.overlay, "heatmap", "heatmap"]]) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.className = cls;
    img.src = src;
    img.alt = `${caption} of ${item.name}`;
    const cap = document.createElement("figcaption");
    cap.textContent = caption;
    fig.append(img, cap);
    figures.appendChild(fig);
  }
  li.append(head, meter, figures);
  return li;
}

function render() {
  items.sort((a, b) => b.score - a.score);
  $("results").replaceChildren(...items.map((item, i) => card(item, i + 1)));
  $("clear").hidden = items.length === 0 && $("errors").children.length === 0;
}

async function explainChunk(files) {
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const response = await fetch("/v1/explain", { method: "POST", body: form });
  const body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    showError("", detail);
    return;
  }
  for (const r of body.results) {
    if (r.error) { showError(r.filename, r.error); continue; }
    items.push({
      name: r.filename,
      score: r.score,
      original: URL.createObjectURL(files[r.index]),
      overlay: `data:image/png;base64,${r.overlay_png}`,
    });
  }
}

async function upload(fileList) {
  const files = [];
  for (const f of fileList) {
    if (f.size > limits.max_file_bytes) showError(f.name, `larger than ${(limits.max_file_bytes / 2 ** 20).toFixed(0)} MB`);
    else files.push(f);
  }
  for (let start = 0; start < files.length; start += limits.max_files) {
    setStatus(`Scoring ${Math.min(start + limits.max_files, files.length)} of ${files.length}…`);
    try {
      await explainChunk(files.slice(start, start + limits.max_files));
    } catch (err) {
      showError("", `could not reach the server (${err.message})`);
    }
    render();
  }
  setStatus(items.length ? `${items.length} image${items.length > 1 ? "s" : ""}, most memorable first` : "");
}

function clearAll() {
  for (const item of items) URL.revokeObjectURL(item.original);
  items.length = 0;
  $("errors").replaceChildren();
  setStatus("");
  render();
}

async function loadModel() {
  try {
    const card = await (await fetch("/v1/model")).json();
    limits = card.limits;
    $("model").textContent = `Model: ${card.backbone} + ${card.head}.`;
    $("limits").textContent = `Up to ${(limits.max_file_bytes / 2 ** 20).toFixed(0)} MB per image`;
  } catch (err) {
    setStatus(`The model card could not be loaded (${err.message}); uploads may still work.`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => { upload(e.target.files); e.target.value = ""; });
  $("clear").addEventListener("click", clearAll);
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => upload(e.dataTransfer.files));
  loadModel();
});
