// The event debugger: polls the collector's /api/live with a cursor and renders what arrived.
// Plain DOM, textContent only (event data is never parsed as HTML).
"use strict";

const POLL_MS = 500;
const KEEP = 2000;   // events kept in the page, as the server keeps
const SHOW = 300;    // rows rendered at once
const QUEUE_MS = 2000;
const state = {
  cursor: 0, events: [], requests: [], selected: null, samples: [], tab: "events",
  queueAt: 0, queueShown: "",
};
const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1024 / 1024).toFixed(1) + " MiB";
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
  return (seconds / 86400).toFixed(1) + " d";
}

// --- events ----------------------------------------------------------------------------------

function matches(event) {
  const name = $("filter-name").value.trim().toLowerCase();
  const type = $("filter-type").value;
  const user = $("filter-user").value.trim().toLowerCase();
  if (name && !(event.name || "").toLowerCase().includes(name)) return false;
  if (type && event.type !== type) return false;
  if (user && !(event.distinct_id || "").toLowerCase().includes(user)) return false;
  return true;
}

function renderEvents() {
  const list = $("events");
  const shown = [];
  for (let i = state.events.length - 1; i >= 0 && shown.length < SHOW; i--) {
    if (matches(state.events[i])) shown.push(state.events[i]);
  }
  const rows = shown.map((event) => {
    const row = el("li", "event-row");
    row.dataset.seq = event.seq;
    row.tabIndex = 0;
    if (state.selected && state.selected.seq === event.seq) row.classList.add("selected");
    row.append(
      el("span", "time", clock(event.at)),
      el("span", "type", event.type),
      el("span", "name", event.name || "(no name)"),
      el("span", "user", event.distinct_id || "–"),
    );
    row.addEventListener("click", () => select(event));
    row.addEventListener("keydown", (e) => { if (e.key === "Enter") select(event); });
    return row;
  });
  list.replaceChildren(...rows);
  const total = state.events.length;
  $("shown").textContent = total ? `${shown.length} of ${total} shown` : "";
  $("empty").hidden = total > 0;
}

function select(event) {
  state.selected = event;
  $("detail").hidden = false;
  $("detail-title").textContent = `${event.name || "(no name)"} · ${event.type}`;
  const request = state.requests.find((r) => r.seq === event.request);
  const via = request
    ? `${request.path} → ${request.status}, ${bytes(request.size)}${request.gzip ? " gzip" : ""}`
    : event.protocol;
  $("detail-meta").textContent = `received ${clock(event.at)} via ${via} · id ${event.message_id || "–"}`;
  $("detail-json").textContent = JSON.stringify(event.event, null, 2);
  renderEvents();
}

// --- requests --------------------------------------------------------------------------------

function renderRequests() {
  const rows = state.requests.slice(-SHOW).reverse().map((r) => {
    const tr = el("tr");
    const ok = r.status >= 200 && r.status < 300;
    tr.append(
      el("td", "", clock(r.at)),
      el("td", "", r.path),
      el("td", ok ? "status-ok" : "status-bad", r.status || "dropped"),
      el("td", "", bytes(r.size)),
      el("td", "", r.gzip ? "gzip" : "–"),
      el("td", "", r.events),
      el("td", "", r.error || ""),
    );
    return tr;
  });
  $("requests").replaceChildren(...rows);
}

// --- stats -----------------------------------------------------------------------------------

function renderStats(stats) {
  $("count-events").textContent = stats.events;
  $("count-requests").textContent = stats.requests;
  $("count-rejected").textContent = stats.rejected;
  const now = performance.now() / 1000;
  state.samples.push([now, stats.events]);
  while (state.samples.length > 2 && now - state.samples[0][0] > 5) state.samples.shift();
  const [t0, n0] = state.samples[0];
  const rate = now - t0 > 0.2 ? (stats.events - n0) / (now - t0) : 0;
  $("rate").textContent = rate < 10 ? rate.toFixed(1) : Math.round(rate);
}

// --- queue -----------------------------------------------------------------------------------

async function loadQueue() {
  const answer = await fetch("/api/queue", { cache: "no-store" });
  const data = await answer.json();
  if (!answer.ok) {
    $("queue-message").textContent = data.error;
    return;
  }
  $("queue-message").textContent = `${data.directory} · read ${clock(data.read_at)}`;
  // Rebuild the rows only when the queue changed: a button must not vanish under the pointer.
  const shown = JSON.stringify([data.files, data.dead_letters]);
  if (shown === state.queueShown) return;
  state.queueShown = shown;
  $("queue-files").replaceChildren(...data.files.map((f) => {
    const tr = el("tr");
    tr.append(el("td", "", f.path), el("td", "", f.pending), el("td", "", age(f.oldest_age)),
      el("td", "", bytes(f.size)), el("td", "", f.dead_letters));
    return tr;
  }));
  const letters = data.dead_letters.map((d) => {
    const tr = el("tr", "dead-letter");
    tr.dataset.id = d.id;
    const button = el("button", "replay", "Replay");
    button.type = "button";
    button.dataset.id = d.id;
    button.addEventListener("click", () => replay(d.id, d.file, button));
    const answerText = [d.status_code, d.response].filter((x) => x !== null && x !== "").join(" ");
    const cell = el("td");
    cell.append(button);
    tr.append(el("td", "", d.file ? `${d.file}:${d.id}` : d.id), el("td", "", d.failed_at), el("td", "", d.reason),
      el("td", "", answerText || "–"), el("td", "", d.event || d.type),
      el("td", "", d.distinct_id || "–"), cell);
    return tr;
  });
  if (!letters.length) {
    const tr = el("tr");
    const td = el("td", "muted", "no dead letters");
    td.colSpan = 7;
    tr.append(td);
    letters.push(tr);
  }
  $("dead-letters").replaceChildren(...letters);
}

async function replay(id, file, button) {
  button.disabled = true;
  const answer = await fetch("/api/queue/replay", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(file ? { id, file } : { id }),
  });
  const data = await answer.json();
  $("replay-status").textContent = answer.ok
    ? `replayed ${data.replayed} dead letter(s): the app's flusher or \`durable-analytics flush\` sends them`
    : `replay failed: ${data.error}`;
  button.disabled = false;
  await loadQueue();
}

// --- polling and tabs ------------------------------------------------------------------------

async function poll() {
  try {
    const answer = await fetch(`/api/live?after=${state.cursor}`, { cache: "no-store" });
    const data = await answer.json();
    state.cursor = data.cursor;
    $("tab-queue").hidden = !data.queue;
    if (data.requests.length) {
      state.requests.push(...data.requests);
      state.requests.splice(0, Math.max(0, state.requests.length - KEEP));
      renderRequests();
    }
    if (data.events.length) {
      state.events.push(...data.events);
      state.events.splice(0, Math.max(0, state.events.length - KEEP));
      renderEvents();
    }
    renderStats(data.stats);
    $("connection").className = "dot live";
    if (state.tab === "queue" && performance.now() - state.queueAt > QUEUE_MS) {
      state.queueAt = performance.now();
      await loadQueue();
    }
  } catch (err) {
    $("connection").className = "dot down";
  }
  setTimeout(poll, POLL_MS);
}

function showTab(name) {
  state.tab = name;
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.tab === name);
    $("panel-" + tab.dataset.tab).hidden = tab.dataset.tab !== name;
  }
  if (name === "queue") loadQueue();
}

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => showTab(tab.dataset.tab));
}
for (const id of ["filter-name", "filter-type", "filter-user"]) {
  $(id).addEventListener("input", renderEvents);
}
// Only the select: a text field's change fires on blur, and re-rendering then would swallow
// the click on the row that took the focus.
$("filter-type").addEventListener("change", renderEvents);
$("filters").addEventListener("submit", (e) => e.preventDefault());
$("detail-close").addEventListener("click", () => {
  state.selected = null;
  $("detail").hidden = true;
  renderEvents();
});
$("base-url").textContent = location.origin;
if (location.hash === "#queue") showTab("queue");
poll();
