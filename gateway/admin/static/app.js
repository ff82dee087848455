// devicegate admin page: vanilla JS ES modules, no dependencies, no build step. Data is only
// ever put on the page with textContent / value / createElement, never innerHTML.
import { devicePath } from "./paths.js";
import { displayParts, displayText } from "./text.js";

const TOKEN_KEY = "devicegate.adminToken";
const state = {
  name: "", blocked: "all", page: 1, amount: 20, total: 0, truncated: false, selected: null,
};
// Page number -> the cursor (X-Next-Cursor) that starts it: the next page is asked with
// after=, whose cost does not grow with depth; a page reached otherwise goes by number.
let cursors = new Map();
let listSeq = 0; // drops answers to superseded list requests (typing in the search box)

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + token(), Accept: "application/json" };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init); // relative: works behind a path prefix too
  } catch (err) {
    throw new ApiError("Cannot reach the admin API", 0);
  }
  let payload = null;
  try {
    payload = await resp.json();
  } catch (err) {
    payload = null;
  }
  const message =
    payload && typeof payload.result === "string" ? payload.result : `HTTP ${resp.status}`;
  if (resp.status === 401) {
    signOut(message);
    throw new ApiError(message, 401);
  }
  if (!resp.ok || !payload || payload.status !== true) {
    throw new ApiError(message, resp.status);
  }
  return { result: payload.result, headers: resp.headers };
}

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

function joined(...parts) {
  const text = parts.filter((p) => p).join(" ");
  return text || "—";
}

// Puts `text` in `element`, hidden characters (text.js) as visibly styled markers.
function show(element, text) {
  const nodes = displayParts(text).map((part) => {
    if (!part.escaped) return document.createTextNode(part.text);
    const span = document.createElement("span");
    span.className = "esc";
    span.textContent = part.text;
    return span;
  });
  element.replaceChildren(...nodes);
}

function cell(text, className) {
  const td = document.createElement("td");
  show(td, text);
  td.title = displayText(text);
  if (className) td.className = className;
  return td;
}

// ---- sign-in ----------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  $("devices").hidden = true;
  $("signout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

function signedIn() {
  $("login").hidden = true;
  $("devices").hidden = false;
  $("signout").hidden = false;
  loadList();
}

// ---- list -------------------------------------------------------------------------------

async function loadList() {
  const seq = ++listSeq;
  const params = new URLSearchParams({ blocked: state.blocked, amount: String(state.amount) });
  const after = cursors.get(state.page);
  if (after) params.set("after", after);
  else params.set("page", String(state.page));
  if (state.name) {
    params.set("name", state.name);
    params.set("match", "prefix"); // served from the indexes: the start of an id or a word
  }
  try {
    const { result, headers } = await api("GET", "devices?" + params.toString());
    if (seq !== listSeq) return;
    state.total = Number(headers.get("X-Total-Count")) || 0;
    state.truncated = headers.get("X-Search-Truncated") === "yes";
    const next = headers.get("X-Next-Cursor");
    if (next) cursors.set(state.page + 1, next);
    const lastPage = Math.max(1, Math.ceil(state.total / state.amount));
    if (result.length === 0 && state.page > lastPage) {
      state.page = lastPage; // the page emptied under us (devices removed): step back
      loadList();
      return;
    }
    $("list-error").textContent = "";
    renderRows(result);
  } catch (err) {
    if (seq === listSeq && err.status !== 401) $("list-error").textContent = err.message;
  }
}

function renderRows(devices) {
  const rows = devices.map((device) => {
    const tr = document.createElement("tr");
    tr.tabIndex = 0;
    tr.dataset.id = device.id;
    tr.setAttribute("aria-selected", String(device.id === state.selected));
    const name = cell(device.display_name);
    if (device.blocked) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "Blocked";
      name.append(badge);
    }
    tr.append(
      name,
      cell(joined(device.application, device.application_version)),
      cell(joined(device.manufacturer, device.model), "hw"),
      cell(when(device.last_activity)),
    );
    tr.addEventListener("click", () => openDevice(device.id));
    tr.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        openDevice(device.id);
      }
    });
    return tr;
  });
  $("rows").replaceChildren(...rows);
  $("empty").hidden = devices.length > 0;
  const first = state.total === 0 ? 0 : (state.page - 1) * state.amount + 1;
  const last = (state.page - 1) * state.amount + devices.length;
  $("range").textContent =
    `${first}–${last} of ${state.total}` +
    (state.truncated ? " (too many matches: the first looked at; type more to narrow)" : "");
  $("prev").disabled = state.page <= 1;
  $("next").disabled = state.page * state.amount >= state.total;
}

// ---- details ----------------------------------------------------------------------------

function showDevice(device) {
  state.selected = device.id;
  $("details").hidden = false;
  show($("d-title"), device.display_name);
  $("d-name").value = device.name || ""; // raw: saving must not turn markers into data
  show($("d-id"), device.id);
  show($("d-manufacturer"), device.manufacturer || "—");
  show($("d-model"), device.model || "—");
  show($("d-application"), joined(device.application, device.application_version));
  show($("d-os"), joined(device.os, device.os_version));
  $("d-upload").textContent = when(device.last_data_upload);
  $("d-active").textContent = when(device.last_active);
  $("d-blocked").textContent = device.blocked ? when(device.blocked_at) : "Not blocked";
  $("d-block").hidden = device.blocked;
  $("d-unblock").hidden = !device.blocked;
  for (const tr of $("rows").children) {
    tr.setAttribute("aria-selected", String(tr.dataset.id === device.id));
  }
}

function setStatus(text) {
  $("d-status").textContent = text;
}

async function openDevice(id) {
  setStatus("");
  try {
    const { result } = await api("GET", devicePath(id));
    showDevice(result);
  } catch (err) {
    if (err.status !== 401) $("list-error").textContent = err.message;
  }
}

async function act(method, suffix, body, done) {
  const id = state.selected;
  if (id === null) return;
  const buttons = $("details").querySelectorAll("button");
  buttons.forEach((b) => (b.disabled = true));
  try {
    const { result } = await api(method, devicePath(id, suffix), body);
    showDevice(result);
    setStatus(done);
    loadList();
  } catch (err) {
    setStatus(err.message);
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

// ---- wiring -----------------------------------------------------------------------------

function init() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    signedIn();
  });
  $("signout").addEventListener("click", () => signOut(""));

  let debounce = 0;
  $("f-name").addEventListener("input", () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => {
      state.name = $("f-name").value.trim();
      state.page = 1;
      cursors = new Map();
      loadList();
    }, 250);
  });
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  $("f-blocked").addEventListener("change", () => {
    state.blocked = $("f-blocked").value;
    state.page = 1;
    cursors = new Map();
    loadList();
  });
  $("amount").addEventListener("change", () => {
    state.amount = Number($("amount").value);
    state.page = 1;
    cursors = new Map();
    loadList();
  });
  $("prev").addEventListener("click", () => {
    state.page = Math.max(1, state.page - 1);
    loadList();
  });
  $("next").addEventListener("click", () => {
    state.page += 1;
    loadList();
  });

  $("d-close").addEventListener("click", () => {
    state.selected = null;
    $("details").hidden = true;
    loadList();
  });
  $("rename-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act("PUT", "", { name: $("d-name").value }, "Name saved.");
  });
  $("d-block").addEventListener("click", () => act("POST", "/block", undefined, "Device blocked."));
  $("d-unblock").addEventListener("click", () =>
    act("POST", "/unblock", undefined, "Device unblocked."),
  );

  if (token()) signedIn();
  else signOut("");
}

document.addEventListener("DOMContentLoaded", init);
