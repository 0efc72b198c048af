// The NATS bridge page: a thin UI over bridge-client.js, which does all the protocol work
// (requests and replies, reconnecting, renewing subscriptions).  This module renders.
// Everything that came from NATS or the server is put on the page as text, never as HTML.
//
// Under load the page must keep reading its socket: a message costs a counter and a push
// onto a bounded queue; rows are drawn once per animation frame, within a time budget, and
// the list keeps at most MAX_ROWS of them.  Large values are laid out by a worker.

import { BridgeClient } from "./bridge-client.js";
import { WorkerWebSocket } from "./worker-socket.js";
import { countLines, layoutJson, preview, requestProblem } from "./format.js";

const MAX_ROWS = 500; // rows kept in the list; older ones are dropped
const RAW_LOG_ROWS = 6; // request/reply pairs kept under the raw box
// Drawing work per animation frame.  Each row also costs the browser style, layout and
// paint after the script, so the row count is bounded as well as the script's time.
const FRAME_BUDGET_MS = 4;
const ROWS_PER_FRAME = 40;
// While messages pour in faster than rows are drawn, the list is redrawn at most this often,
// a few rows at a time: the browser's style, layout and paint of each redraw, not the script,
// is what would otherwise keep the main thread from the socket.  (In a burst the rows shown
// are a sample; the list catches up with the newest ones as soon as the burst ends.)
const BUSY_INTERVAL_MS = 1000;
const BUSY_ROWS = 4;
const FOLD_CHARS = 1500; // longer values start folded (<details>)
const FOLD_LINES = 20;
const HIGHLIGHT_MAX_CHARS = 20000; // coloured token by token up to this size; plain text above
const WORKER_MIN_CHARS = 32 * 1024; // JSON this large is laid out off the main thread
const SHOW_CHUNK_CHARS = 50000; // an unfolded value shows this much at a time
const RATE_WINDOW_S = 5;

const $ = (id) => document.getElementById(id);
const ui = {
  connState: $("conn-state"),
  natsState: $("nats-state"),
  connDetail: $("conn-detail"),
  connRetry: $("conn-retry"),
  connToggle: $("conn-toggle"),
  connectionId: $("connection-id"),
  user: $("user"),
  history: $("history"),
  publishPanel: $("publish-panel"),
  publishForm: $("publish-form"),
  publishSubject: $("publish-subject"),
  publishData: $("publish-data"),
  publishKind: $("publish-kind"),
  publishStatus: $("publish-status"),
  request: $("request"),
  requestAnswer: $("request-answer"),
  requestAnswerHead: $("request-answer-head"),
  requestAnswerData: $("request-answer-data"),
  subjectForm: $("subject-form"),
  subject: $("subject"),
  unsubscribe: $("unsubscribe"),
  subjectStatus: $("subject-status"),
  chips: $("subscriptions"),
  noSubs: $("no-subs"),
  rawForm: $("raw-form"),
  raw: $("messageText"),
  rawLog: $("raw-log"),
  rate: $("rate"),
  filter: $("filter"),
  pause: $("pause"),
  clear: $("clear"),
  counts: $("counts"),
  pausedNote: $("paused-note"),
  empty: $("empty"),
  list: $("messages"),
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function clip(text, max) {
  return text.length > max ? text.slice(0, max - 1) + "…" : text;
}

const number = new Intl.NumberFormat("en-US");
const fmt = (n) => number.format(n);
const plural = (n, word) => `${fmt(n)} ${word}${n === 1 ? "" : "s"}`;

function setStatus(node, ok, text) {
  node.textContent = text;
  node.dataset.tone = ok ? "ok" : "error";
}

// A token given in the page's own address (/?token=…) goes on to the socket, and is then
// kept in memory only: the address loses it at once, so it does not linger in the
// history, in a bookmark, on the screen, or go out as a Referer (the bridge also sends
// Referrer-Policy: no-referrer).  Reconnects use the one in memory; a reload needs it again.
const TOKEN = new URLSearchParams(window.location.search).get("token") || "";
if (TOKEN) {
  const address = new URL(window.location.href);
  address.searchParams.delete("token");
  window.history.replaceState(window.history.state, "", address);
}

// The socket lives next to the page: same scheme (ws/wss), host, port and path prefix.
// The socket itself lives in a worker (worker-socket.js): bursts never block this thread.
const client = new BridgeClient(new URL("stream", window.location.href).pathname, {
  token: TOKEN || null,
  WebSocket: WorkerWebSocket,
});

// Presence, per subject watched (below): subject -> {count, entries: Map(client -> entry),
// answered, shown, early}.  The answer asked after the subscribe's reply is the count; joins
// and leaves after it move it (those before it are in it already: the socket keeps the
// bridge's order, and the client numbers them: `order`).
const rooms = new Map();

// ---------------------------------------------------------------------------
// Connection state
// ---------------------------------------------------------------------------

const conn = {
  everConnected: false,
  failures: 0, // handshakes failed in a row
  dropReason: "",
  refusal: null, // what the bridge answered the last failed handshake over HTTP ("refused")
  retryAt: 0,
  tick: null,
  expiresAt: 0, // the token's exp (Unix seconds), while its warning counts down
  expiryTick: null,
};

const STATE_TEXT = {
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  closed: "Closed",
};

function setState(state, text) {
  ui.connState.dataset.state = state;
  ui.connState.textContent = text || STATE_TEXT[state];
  ui.connToggle.textContent = state === "closed" ? "Connect" : "Disconnect";
  ui.connToggle.hidden = false;
  ui.connRetry.hidden = !(state === "reconnecting" && conn.tick !== null);
}

function setNats(state, message) {
  ui.natsState.dataset.state = state;
  ui.natsState.textContent = { connected: "NATS: up", disconnected: "NATS: down" }[state] || "NATS: unknown";
  ui.natsState.title = message || "";
}

function showDetail(text, tone) {
  ui.connDetail.textContent = text || "";
  ui.connDetail.dataset.tone = tone || "";
}

function setDetail(text, tone) {
  clearInterval(conn.expiryTick); // whatever is said now replaces the expiry countdown
  conn.expiryTick = null;
  showDetail(text, tone);
}

// Close codes the bridge sends on purpose (docs/protocol.md), in words.
const CLOSE_TEXT = {
  1001: "The bridge is shutting down",
  1008: "The bridge closed the connection because this page sent requests too fast (rate limit, code 1008)",
  1009: "The bridge closed the connection because a request was larger than it accepts (code 1009)",
  1011: "The bridge closed the connection after an internal error (code 1011)",
  1013: "The bridge cut this page off because it fell behind reading messages (slow consumer, code 1013)",
  4001: "Your access token expired, so the bridge closed the connection (code 4001)",
  4003: "A backend closed this connection (code 4003)",
};
const SAID_CLOSES = new Set([1001, 1008, 1013, 4001]); // their reason only repeats the text above
const ERROR_CLOSES = new Set([1008, 1009, 1011, 1013]);

function describeClose({ code, reason }) {
  const why = reason && !SAID_CLOSES.has(code) ? `: ${clip(reason, 200)}` : "";
  if (CLOSE_TEXT[code]) return CLOSE_TEXT[code] + why;
  if (code === 1006) return reason ? `The connection was lost (${reason})` : "The connection was lost";
  if (code === 1000) return "The connection was closed" + why;
  return `The connection closed (code ${code}${why})`;
}

// How to give the page a token: in its address, which it then drops (see TOKEN).
const WITH_TOKEN = `${window.location.pathname}?token=…`;
// Statuses with which the bridge refuses a handshake (bridge-client.js "refused").
const REFUSED = new Set([401, 403, 429, 503]);

// A failed handshake looks to a page exactly like a bridge that is down (the socket fails
// with 1006); the client then asks the bridge over HTTP, and this says its answer.  Tokens
// come up only when the bridge asked for one (401): a bridge that is merely restarting must
// not send a user hunting for a token nobody needs.
function refusalText({ status, message }) {
  const said = message ? ` (${clip(message, 200)})` : "";
  if (status === 401) {
    return TOKEN
      ? `The bridge refused the token this page was opened with${said}. Open the page with a valid one: ${WITH_TOKEN}`
      : `The bridge needs a token${said}. Open this page as ${WITH_TOKEN}`;
  }
  if (status === 403) return `The bridge refuses connections from this page${said}.`;
  if (status === 429 || status === 503) return `The bridge takes no more connections now${said}; the page keeps trying.`;
  if (status === 0) return "The bridge does not answer: it is down, restarting or out of reach; the page keeps trying.";
  return "The bridge answers, but the connection failed; the page keeps trying.";
}

// While the bridge's answer is not known (or cannot be asked for).
function refusedHint() {
  const what = "It is down, full, or refusing this page.";
  return TOKEN ? `${what} The token this page was opened with may be wrong or expired.` : what;
}

function showFailure() {
  const n = conn.failures;
  const r = conn.refusal;
  const refused = r !== null && REFUSED.has(r.status);
  const why = r ? refusalText(r) : refusedHint();
  if (!conn.everConnected) {
    if (n < 2 && !refused) setDetail(`Cannot reach the bridge (attempt ${n}).`);
    else setDetail(`Cannot connect to the bridge (attempt ${n}). ${why}`, "error");
    return;
  }
  // It was connected before: most likely a restart, so say what ended it first.
  const loud = refused || n >= 4;
  const ended = conn.dropReason ? `${conn.dropReason}. ` : "";
  setDetail(`${ended}Cannot connect yet (attempt ${n}).${loud ? ` ${why}` : ""}`, loud ? "error" : "");
}

function showCountdown() {
  const seconds = Math.max(0, Math.ceil((conn.retryAt - Date.now()) / 1000));
  setState("reconnecting", seconds > 0 ? `Reconnecting in ${seconds} s` : "Reconnecting…");
}

client.on("state", (state, detail) => {
  clearInterval(conn.tick);
  conn.tick = null;
  renderChips(client.subjects()); // "not connected" or not: the chips follow the connection
  if (state === "connected") {
    conn.everConnected = true;
    conn.failures = 0;
    conn.refusal = null;
    setState("connected");
    // Keep saying why the last connection ended: the reconnect is quick, the cause matters.
    const why = conn.dropReason;
    setDetail(why ? `Reconnected. The last connection ended: ${why[0].toLowerCase()}${why.slice(1)}.` : "");
    conn.dropReason = "";
    return;
  }
  if (state === "connecting") {
    setState(conn.everConnected ? "reconnecting" : "connecting");
    return;
  }
  ui.connectionId.textContent = "—";
  ui.user.hidden = true; // who is signed in belongs to a connection: there is none now
  setNats("unknown");
  if (detail.expired) {
    // An expired token stays expired: no Connect button offering it again.
    setState("closed", "Token expired");
    ui.connToggle.hidden = true;
    setDetail(`${describeClose({ code: 4001 })}. This page cannot get a new token by itself: `
      + `open it again with a new one, as ${WITH_TOKEN}`, "error");
    return;
  }
  if (detail.code === 4003) {
    setState("closed");
    setDetail(describeClose(detail) + ". Connect again if you should still be here.", "error");
    return;
  }
  if (detail.closed) {
    setState("closed");
    setDetail("Disconnected. Subscriptions are kept and renewed when you connect.");
    return;
  }
  if (detail.wasConnected) {
    conn.failures = 0;
    conn.dropReason = describeClose(detail);
    setDetail(conn.dropReason + ".", ERROR_CLOSES.has(detail.code) ? "error" : "");
  } else if (detail.offline) {
    setDetail("This computer is offline; the page reconnects when the network is back.", "error");
  } else {
    conn.failures += 1;
    showFailure();
  }
  conn.retryAt = detail.retryAt;
  conn.tick = setInterval(showCountdown, 500);
  showCountdown();
  ui.connState.title = `attempt ${detail.attempt}`;
});

// The bridge's own answer to a failed handshake.
client.on("refused", (result) => {
  conn.refusal = result;
  const state = ui.connState.dataset.state;
  if (conn.failures > 0 && (state === "connecting" || state === "reconnecting")) showFailure();
});

function until(expiresAt) {
  return clock(new Date(expiresAt * 1000)).slice(0, 8);
}

client.on("welcome", (frame) => {
  ui.connectionId.textContent = String(frame.connection_id ?? "—");
  // With JWT on the bridge says who this is; the name is the token's, shown as text.
  ui.user.hidden = typeof frame.user !== "string";
  if (!ui.user.hidden) {
    ui.user.textContent = `Signed in as ${frame.user}`;
    ui.user.title = `The token expires at ${until(frame.expires_at)}`;
  }
  setNats(frame.nats);
  ui.publishPanel.hidden = frame.publish !== true;
});

client.on("status", (frame) => {
  setNats(frame.nats, frame.message);
  setDetail(frame.message ? String(frame.message) : "", frame.success === false ? "error" : "");
});

client.on("error", (err) => setDetail(String(err.message || err), "error"));

// Seconds under two minutes, minutes and seconds above: "in 45 s", "in 4 min 5 s".
function timeLeft(seconds) {
  if (seconds <= 0) return "now";
  if (seconds < 120) return `in ${seconds} s`;
  const s = seconds % 60;
  return `in ${Math.floor(seconds / 60)} min${s ? ` ${s} s` : ""}`;
}

function showExpiry() {
  const left = Math.ceil((conn.expiresAt * 1000 - Date.now()) / 1000);
  showDetail(`Your access token expires ${timeLeft(left)} (at ${until(conn.expiresAt)}); this page cannot `
    + `renew it. Open the page with a new token (${WITH_TOKEN}) to stay connected.`, "error");
}

client.on("expiring", (frame) => {
  const expiresAt = Number(frame.expires_at);
  if (!Number.isFinite(expiresAt)) return setDetail(String(frame.message ?? "Your access token expires soon."), "error");
  setDetail("");
  conn.expiresAt = expiresAt;
  showExpiry();
  conn.expiryTick = setInterval(showExpiry, 1000); // counts down until the bridge closes (4001)
});

ui.connToggle.addEventListener("click", () => {
  if (ui.connState.dataset.state === "closed") client.connect();
  else client.close();
});
ui.connRetry.addEventListener("click", () => client.reconnect());

// ---------------------------------------------------------------------------
// Subscriptions: chips follow the client's subjects
// ---------------------------------------------------------------------------

const CHIP_STATE_TEXT = { pending: "subscribing", removing: "unsubscribing", failed: "not subscribed" };

function chipStateText(state) {
  // Waiting for a connection is not subscribing: nothing is being asked for.
  if (state === "pending" && client.state !== "connected") return "not connected";
  return CHIP_STATE_TEXT[state];
}

function renderChips(subjects) {
  const focused = document.activeElement?.closest?.(".chip")?.dataset.subject;
  const frag = document.createDocumentFragment();
  for (const { subject, state, error } of [...subjects].sort((a, b) => a.subject.localeCompare(b.subject))) {
    const chip = el("li", "chip");
    chip.dataset.subject = subject;
    chip.dataset.state = state;
    chip.append(el("span", "chip-subject", subject));
    const stateText = chipStateText(state);
    if (stateText) chip.append(el("span", "chip-state", stateText));
    const room = rooms.get(subject);
    if (room?.shown) chip.append(el("span", "chip-presence", presenceText(room)));
    if (error) chip.title = error;
    const remove = el("button", "chip-remove", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Unsubscribe from ${subject}`);
    remove.title = `Unsubscribe from ${subject}`;
    remove.disabled = state === "removing";
    remove.addEventListener("click", () => {
      unsubscribe([subject]);
      // Keep the keyboard user in the chip list.
      (ui.chips.querySelector(".chip-remove:not(:disabled)") || ui.subject).focus();
    });
    chip.append(remove);
    frag.append(chip);
  }
  ui.chips.replaceChildren(frag);
  for (const subject of rooms.keys()) if (!subjects.some((s) => s.subject === subject)) rooms.delete(subject);
  ui.noSubs.hidden = subjects.length > 0;
  updateCounts(); // the empty list names what it waits for
  if (focused) {
    const again = [...ui.chips.children].find((c) => c.dataset.subject === focused);
    again?.querySelector("button:not(:disabled)")?.focus();
  }
}

client.on("subjects", renderChips);

// ---------------------------------------------------------------------------
// Presence: for subjects the bridge keeps it on, how many are here and who
// ---------------------------------------------------------------------------

const isExact = (subject) => !subject.split(".").some((t) => t === "*" || t === ">");

function presenceText(room) {
  const listed = [...room.entries.values()];
  const users = [...new Set(listed.map((e) => e.user).filter((u) => u !== null))].sort();
  const anonymous = listed.filter((e) => e.user === null).length;
  const who = [...users, ...(anonymous ? [`${fmt(anonymous)} anonymous`] : [])];
  if (room.count > listed.length) who.push(`${fmt(room.count - listed.length)} more`);
  return `${fmt(room.count)} here` + (who.length ? `: ${who.join(", ")}` : "");
}

function showRooms() {
  renderChips(client.subjects());
}

async function askPresence(subject) {
  const room = rooms.get(subject);
  if (!room) return;
  room.answered = false;
  try {
    const answer = await client.presence(subject);
    if (rooms.get(subject) !== room) return;
    room.count = answer.count;
    room.entries = new Map(answer.presence.map((e) => [e.client, e]));
    room.answered = room.shown = true;
    // Frames that came after the answer, while this waited for its turn, move it.
    const later = room.early.filter((e) => e.order > answer.order);
    room.early = [];
    later.forEach(applyPresence);
  } catch (err) {
    room.shown = false; // asked again after the next reconnect
  }
  showRooms();
}

function onPresence(event) {
  const room = rooms.get(event.subject);
  if (!room) return;
  if (!room.answered) room.early.push(event); // the answer decides whether it counts
  else applyPresence(event);
  showRooms();
}

function applyPresence(event) {
  const room = rooms.get(event.subject);
  const known = room.entries.has(event.client);
  if (event.type === "join" && !known) {
    room.entries.set(event.client, event);
    room.count += 1;
  } else if (event.type === "leave" && (known || room.count > room.entries.size)) {
    room.entries.delete(event.client);
    room.count = Math.max(0, room.count - 1);
  }
}

client.on("join", onPresence);
client.on("leave", onPresence);
// A new connection watches anew: the count starts again from a fresh answer.
client.on("resubscribed", () => rooms.forEach((_, subject) => askPresence(subject)));

// Which of `subjects` keep presence: one question each (exact ones only, while connected).
async function withPresence(subjects) {
  if (client.state !== "connected") return [];
  const asked = subjects.filter(isExact).map((s) => client.presence(s).then(() => s, () => null));
  return (await Promise.all(asked)).filter((s) => s !== null);
}

// After a reconnect, stored subjects resume where they left off (bridge-client.js); what
// each resume found is said together with the renewal.
const resumed = { notes: [], gap: false };

client.on("resubscribed", ({ failed }) => {
  const notes = resumed.notes.join(" ");
  const gap = resumed.gap;
  resumed.notes = [];
  resumed.gap = false;
  if (failed.length === 0) setStatus(ui.subjectStatus, !gap, `Subscriptions renewed after reconnecting. ${notes}`.trim());
  else setStatus(ui.subjectStatus, false, `Could not renew ${failed[0].subject}: ${failed[0].error}`);
});

client.on("recovered", ({ subject, count }) => {
  resumed.notes.push(count
    ? `Recovered ${plural(count, "message")} of ${subject} published meanwhile.`
    : `Nothing of ${subject} was missed.`);
});

client.on("gap", ({ subject, afterSeq }) => {
  const text = `Messages of ${subject} after #${afterSeq ?? "?"} were lost while disconnected: `
    + "the stream no longer holds them all.";
  resumed.notes.push(text);
  resumed.gap = true;
  pushBounded(view.paused ? view.held : view.pending, { gap: true, text, receivedAt: Date.now() });
  schedule();
});

client.on("reply", (frame, matched) => {
  if (frame.source === "http") {
    // A backend acted for this page with POST /clients/{id}; the client already follows it.
    const where = frame.action === "publish" && !ui.publishPanel.hidden ? ui.publishStatus : ui.subjectStatus;
    setStatus(where, frame.success === true, "A backend asked: " + String(frame.message ?? ""));
  } else if (!matched) {
    const entry = addRawEntry("(a reply to no request of this page)");
    addRawReply(entry, frame.success === true, String(frame.message ?? ""));
  }
});

function subjectsFromField() {
  return [...new Set(ui.subject.value.split(/[\s,]+/).filter(Boolean))];
}

function subscribeFromField() {
  const text = ui.subject.value.trim();
  // The example's JSON typed where a person types first: it is a request, send it as one.
  if (text.startsWith("{")) {
    if (sendRaw(text, ui.subjectStatus)) ui.subject.value = "";
    return;
  }
  const subjects = subjectsFromField();
  if (subjects.length === 0) {
    setStatus(ui.subjectStatus, false, "Type a subject first.");
    ui.subject.focus();
    return;
  }
  // Stored messages first, when the page asks for them (only subjects a stream stores have any).
  const last = Number(ui.history.value);
  const options = last > 0 ? { history: { last } } : {};
  ui.subject.value = "";
  if (client.state !== "connected") {
    setStatus(ui.subjectStatus, true, "Not connected: will subscribe once the connection is back.");
  } else {
    setStatus(ui.subjectStatus, true, "Subscribing…");
  }
  // Subjects where the bridge keeps presence are watched: the chip says who is here.
  withPresence(subjects).then((watched) => {
    const plain = subjects.filter((s) => !watched.includes(s));
    const subs = [];
    if (watched.length) {
      for (const s of watched) {
        rooms.set(s, { count: 0, entries: new Map(), answered: false, shown: false, early: [] });
      }
      const sub = client.subscribe(watched, { ...options, presence: true });
      sub.ready.then(() => watched.forEach(askPresence), () => watched.forEach((s) => rooms.delete(s)));
      subs.push(sub);
    }
    if (plain.length) subs.push(client.subscribe(plain, options));
    Promise.all(subs.map((s) => s.ready)).then(
      (replies) => setStatus(ui.subjectStatus, true, replies.map((r) => String(r.message)).join("; ")),
      (err) => setStatus(ui.subjectStatus, false, err.message),
    );
  });
}

function unsubscribe(subjects) {
  const connected = client.state === "connected";
  client.unsubscribe(subjects).then((replies) => {
    if (!connected) {
      setStatus(ui.subjectStatus, true, "Removed; nothing to tell the server while disconnected.");
      return;
    }
    if (replies.length === 0) {
      setStatus(ui.subjectStatus, false, "No reply: the connection closed; the next connection does not hold it.");
      return;
    }
    const failed = replies.find((r) => r.success !== true);
    setStatus(ui.subjectStatus, !failed, replies.map((r) => String(r.message)).join("; "));
  });
}

ui.subjectForm.addEventListener("submit", (event) => {
  event.preventDefault();
  subscribeFromField();
});

ui.unsubscribe.addEventListener("click", () => {
  const subjects = subjectsFromField();
  if (subjects.length === 0 || ui.subject.value.trim().startsWith("{")) {
    setStatus(ui.subjectStatus, false, "Type the subject to unsubscribe from.");
    ui.subject.focus();
    return;
  }
  unsubscribe(subjects);
  ui.subject.value = "";
});

// ---------------------------------------------------------------------------
// Raw requests (the raw box, and JSON typed into the subject field)
// ---------------------------------------------------------------------------

let lastRaw = "";

function addRawEntry(text) {
  const item = el("li", "raw-entry");
  item.append(el("code", "raw-request", clip(text, 300)));
  const replies = el("ul", "raw-replies");
  item.append(replies);
  ui.rawLog.prepend(item);
  while (ui.rawLog.children.length > RAW_LOG_ROWS) ui.rawLog.lastElementChild.remove();
  return replies;
}

function addRawReply(replies, ok, message) {
  const line = el("li", ok ? "reply ok" : "reply error");
  line.append(el("span", "mark", ok ? "✓" : "✗"), el("span", "reply-text", message));
  replies.append(line);
}

// Returns false when nothing was sent (the text stays where it was typed, to be fixed).
function sendRaw(text, statusLine = null) {
  lastRaw = text;
  const entry = addRawEntry(text);
  const show = (ok, message) => {
    addRawReply(entry, ok, message);
    if (statusLine) setStatus(statusLine, ok, message);
  };
  const problem = requestProblem(text);
  if (problem) {
    show(false, problem);
    return false;
  }
  if (client.state !== "connected") {
    show(false, "Not sent: not connected.");
    return false;
  }
  client.send(text).then(
    (replies) => {
      for (const r of replies) show(r.success === true, String(r.message ?? ""));
    },
    (err) => show(false, err.message),
  );
  return true;
}

ui.rawForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.raw.value.trim();
  if (!text) {
    ui.raw.focus();
    return;
  }
  if (sendRaw(text)) ui.raw.value = "";
});

for (const box of [ui.raw, ui.subject]) {
  box.addEventListener("keydown", (event) => {
    if (event.key === "ArrowUp" && box.value === "" && lastRaw && (box === ui.raw || lastRaw.startsWith("{"))) {
      event.preventDefault();
      box.value = lastRaw;
    }
  });
}

// ---------------------------------------------------------------------------
// Publish box (only when the welcome frame says the bridge allows publishing)
// ---------------------------------------------------------------------------

// Data that parses as JSON goes as that JSON text, verbatim (big numbers and key order
// survive); anything else as text.
function publishData() {
  const raw = ui.publishData.value;
  const trimmed = raw.trim();
  if (trimmed) {
    try {
      const value = JSON.parse(trimmed);
      const kind = Array.isArray(value) ? "array" : value === null ? "null" : typeof value;
      return { data: trimmed, json: true, kind: `JSON ${kind}` };
    } catch {
      // not JSON: text
    }
  }
  return { data: raw, json: false, kind: raw ? "text" : "empty text" };
}

function showPublishKind() {
  ui.publishKind.textContent = `sent as ${publishData().kind}`;
}

// The data box starts one line high, like the subject beside it, and grows with its text.
function fitPublishData() {
  const box = ui.publishData;
  box.style.height = "auto";
  box.style.height = `${box.scrollHeight + box.offsetHeight - box.clientHeight}px`;
}

// The form's subject when it can be sent now, else null with the reason said beside the form.
function sendableSubject(missing) {
  const subject = ui.publishSubject.value.trim();
  if (!subject) {
    setStatus(ui.publishStatus, false, missing);
    ui.publishSubject.focus();
    return null;
  }
  if (client.state !== "connected") {
    setStatus(ui.publishStatus, false, "Not sent: not connected.");
    return null;
  }
  return subject;
}

function publishFromForm() {
  const subject = sendableSubject("Type the subject to publish to.");
  if (subject === null) return;
  const { data, json } = publishData();
  setStatus(ui.publishStatus, true, `Publishing to ${subject}…`);
  client.publish(subject, data, { json }).then(
    (reply) => setStatus(ui.publishStatus, true, String(reply.message)),
    (err) => setStatus(ui.publishStatus, false, err.message),
  );
}

// Request: the same subject and data as a NATS request; the service's answer is shown under
// the box, as text, with the time it took; a failure is said in words beside it.
const ANSWER_MAX_CHARS = 32 * 1024; // laid out (and shown) up to this; longer answers are cut

function answerText(answer) {
  if (answer.encoding === "base64") return { text: String(answer.data), kind: "bytes, as base64" };
  if (answer.encoding === "text") return { text: String(answer.data), kind: "text" };
  const json = answer.dataJson;
  // The JSON's own text, laid out (digits exactly as the service wrote them).
  return { text: json.length <= ANSWER_MAX_CHARS ? layoutJson(json, { highlight: false }).text : json, kind: "JSON" };
}

function requestFromForm() {
  const subject = sendableSubject("Type the subject of the service to call.");
  if (subject === null) return;
  const { data, json } = publishData();
  setStatus(ui.publishStatus, true, `Calling ${subject}…`);
  ui.requestAnswer.hidden = true;
  const started = performance.now();
  client.request(subject, data, { json }).then(
    (answer) => {
      const ms = performance.now() - started;
      const { text, kind } = answerText(answer);
      const headers = Object.entries(answer.headers ?? {}).map(([k, v]) => `${k}: ${v}`).join(", ");
      setStatus(ui.publishStatus, true, `Answered in ${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`);
      ui.requestAnswerHead.textContent = `Answer from ${subject} (${kind})` + (headers ? `; headers ${headers}` : "");
      ui.requestAnswerData.textContent = clip(text, ANSWER_MAX_CHARS);
      ui.requestAnswer.hidden = false;
    },
    (err) => setStatus(ui.publishStatus, false, err.message),
  );
}

ui.request.addEventListener("click", requestFromForm);

ui.publishForm.addEventListener("submit", (event) => {
  event.preventDefault();
  publishFromForm();
});
ui.publishData.addEventListener("input", () => {
  showPublishKind();
  fitPublishData();
});
ui.publishData.addEventListener("keydown", (event) => {
  // Enter makes a new line in the data; Ctrl+Enter (⌘+Enter) publishes.
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    publishFromForm();
  }
});

// ---------------------------------------------------------------------------
// Messages: counted as they come, drawn per animation frame
// ---------------------------------------------------------------------------

const view = {
  pending: [], // arrived, not drawn yet (only the newest MAX_ROWS matter)
  held: [], // arrived while paused (the newest MAX_ROWS)
  heldCount: 0, // every message that arrived while paused
  paused: false,
  received: 0,
  rows: 0, // message rows in the list
  hiddenRows: 0, // of those, hidden by the filter
  match: null,
  cleared: false, // Clear emptied the list (said while it stays empty)
  frameRequested: false,
  lastDraw: 0,
  arrived: 0, // messages since the last draw
  busy: false, // more arrived between two draws than one draw shows
  perSecond: [0], // arrivals per second; the last entry is the current second
};

// Kept bounded without shifting on every push: trimmed once it doubles.
function pushBounded(list, item) {
  list.push(item);
  if (list.length >= 2 * MAX_ROWS) list.splice(0, list.length - MAX_ROWS);
}

function schedule() {
  if (view.frameRequested) return;
  view.frameRequested = true;
  const wait = view.lastDraw + BUSY_INTERVAL_MS - performance.now();
  if (view.busy && wait > 0) setTimeout(() => requestAnimationFrame(draw), wait);
  else requestAnimationFrame(draw);
}

client.on("message", (message) => {
  view.received += 1;
  view.arrived += 1;
  view.perSecond[view.perSecond.length - 1] += 1;
  if (view.paused) {
    view.heldCount += 1;
    pushBounded(view.held, message);
  } else {
    pushBounded(view.pending, message);
  }
  schedule();
});

// The bridge dropped messages for this page (drop_oldest): mark the gap where it happened.
client.on("dropped", (frame) => {
  const n = Number(frame.dropped) || 0;
  const gap = { gap: true, text: String(frame.message ?? `${n} messages dropped`), receivedAt: Date.now() };
  pushBounded(view.paused ? view.held : view.pending, gap);
  schedule();
});

function draw() {
  view.frameRequested = false;
  const start = performance.now();
  view.lastDraw = start;
  const pending = view.pending;
  if (pending.length > MAX_ROWS) pending.splice(0, pending.length - MAX_ROWS);
  // Oldest first, so that what is left for the next frame still goes above it.
  const rows = [];
  view.busy = view.arrived > ROWS_PER_FRAME;
  view.arrived = 0;
  const most = Math.min(pending.length, view.busy ? BUSY_ROWS : ROWS_PER_FRAME);
  while (rows.length < most && (rows.length === 0 || performance.now() - start < FRAME_BUDGET_MS)) {
    rows.push(renderItem(pending[rows.length]));
  }
  pending.splice(0, rows.length);
  if (rows.length) {
    const frag = document.createDocumentFragment();
    for (let i = rows.length - 1; i >= 0; i--) frag.append(rows[i]);
    ui.list.prepend(frag);
    while (ui.list.children.length > MAX_ROWS) removeRow(ui.list.lastElementChild);
  }
  updateCounts();
  if (view.paused) showPaused();
  if (pending.length) schedule();
}

// Each row's data as text, for the filter (the rows are bounded, and so is this).
const rowText = new WeakMap();

function removeRow(row) {
  if (row.classList.contains("msg")) {
    view.rows -= 1;
    if (row.hidden) view.hiddenRows -= 1;
  }
  row.remove();
}

function two(n, width = 2) {
  return String(n).padStart(width, "0");
}

function clock(date) {
  return `${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}.${two(date.getMilliseconds(), 3)}`;
}

function timeEl(at) {
  const date = new Date(at);
  const time = el("time", "msg-time", clock(date));
  time.dateTime = date.toISOString();
  return time;
}

const sameDay = (a, b) => a.toDateString() === b.toDateString();

// A stored message shows when it was published (JetStream's time), which for history can be
// long before it reached the page; the date comes first when it was not today.  The time is
// the bridge's text: parsed to the millisecond for the clock, kept whole in the datetime.
function publishedEl(msg) {
  const published = new Date(Date.parse(msg.time.replace(/(\.\d{3})\d+/, "$1")));
  if (Number.isNaN(published.getTime())) return null;
  const date = `${published.getFullYear()}-${two(published.getMonth() + 1)}-${two(published.getDate())} `;
  const time = el("time", "msg-time published", (sameDay(published, new Date()) ? "" : date) + clock(published));
  time.dateTime = msg.time;
  time.title = `Published ${msg.time} (stored by JetStream); reached this page at ${clock(new Date(msg.receivedAt))}`;
  return time;
}

function renderItem(item) {
  if (item.gap) {
    const row = el("li", "gap");
    row.append(el("span", "gap-text", item.text), timeEl(item.receivedAt));
    return row;
  }
  const row = renderMessage(item);
  view.rows += 1;
  if (view.match && !view.match(item.subject, rowText.get(row))) {
    row.hidden = true;
    view.hiddenRows += 1;
  }
  return row;
}

function utf8Bytes(text) {
  let n = text.length;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    // 2 bytes from U+0080, 3 from U+0800; a surrogate pair (4 bytes) is two units of 2.
    if (c >= 0x80) n += c >= 0x800 && (c < 0xd800 || c > 0xdfff) ? 2 : 1;
  }
  return n;
}

function size(bytes) {
  if (bytes < 1024) return plural(bytes, "byte");
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function renderMessage(msg) {
  const row = el("li", "msg");
  row.dataset.subject = msg.subject;
  const head = el("div", "msg-head");
  const arrived = timeEl(msg.receivedAt);
  arrived.title = "when it reached this page";
  head.append(el("span", "subject", msg.subject), (msg.time && publishedEl(msg)) || arrived);

  let kind;
  if (msg.encoding === "base64") {
    const text = String(msg.data);
    const bytes = Math.floor((text.length * 3) / 4) - (text.endsWith("==") ? 2 : text.endsWith("=") ? 1 : 0);
    head.append(el("span", "badge base64", `base64 · ${plural(bytes, "byte")}`));
    kind = "base64";
  } else if (msg.encoding === "text") {
    head.append(el("span", "badge text", "text"));
    kind = "text";
  } else {
    if (typeof msg.data === "string") head.append(el("span", "badge json-string", "JSON string"));
    kind = "json";
  }
  // Which of this page's subscriptions brought it (the bridge sends the subject only).
  const via = msg.matches.filter((p) => p !== msg.subject);
  if (via.length) {
    const badge = el("span", "badge via", `via ${via.join(", ")}`);
    badge.title = "the subscription it matched";
    head.append(badge);
    row.dataset.matched = msg.matches.join(" ");
  }
  if (msg.reply) head.append(el("span", "badge reply", `reply → ${msg.reply}`));
  if (msg.seq !== undefined) {
    // Stored in a JetStream stream: its sequence, and "stored" when it came as history.
    const badge = el("span", msg.history ? "badge stored" : "badge seq", msg.history ? `stored #${msg.seq}` : `#${msg.seq}`);
    badge.title = msg.history ? "sent from the stream's history" : "its stream sequence";
    head.append(badge);
    if (msg.history) row.dataset.history = "true";
  }
  row.append(head);

  if (msg.headers && typeof msg.headers === "object") {
    const entries = Object.entries(msg.headers);
    if (entries.length) {
      const headers = el("dl", "headers");
      for (const [k, v] of entries) headers.append(el("dt", null, k), el("dd", null, String(v)));
      row.append(headers);
    }
  }
  const data = kind === "json" ? msg.dataJson : String(msg.data);
  rowText.set(row, data);
  if (kind === "json") renderJson(row, data);
  else renderText(row, data, kind);
  return row;
}

function renderText(row, text, kind) {
  const lines = countLines(text);
  if (text.length <= FOLD_CHARS && lines <= FOLD_LINES) {
    row.append(el("pre", `payload ${kind}`, text));
    return;
  }
  const label = kind === "base64" ? `${fmt(text.length)} chars` : `${plural(lines, "line")} · ${size(utf8Bytes(text))}`;
  fold(row, kind, preview(text), label, (pre, box) => fillPlain(pre, box, text));
}

function renderJson(row, json) {
  if (json.length >= WORKER_MIN_CHARS) {
    renderLargeJson(row, json);
    return;
  }
  let layout;
  try {
    layout = layoutJson(json, { highlight: json.length <= HIGHLIGHT_MAX_CHARS });
  } catch {
    layout = { text: json, lines: countLines(json), parts: null };
  }
  const fill = (pre) => (layout.classes ? fillHighlighted(pre, layout) : (pre.textContent = layout.text));
  if (layout.text.length <= FOLD_CHARS && layout.lines <= FOLD_LINES) {
    const pre = el("pre", "payload json");
    fill(pre);
    row.append(pre);
    return;
  }
  fold(row, "json", preview(json), `${plural(layout.lines, "line")} · ${size(utf8Bytes(json))}`, fill);
}

// Folded: a one-line summary; the value goes into the page only when opened.
function fold(row, kind, summaryText, label, fill) {
  const details = el("details", "payload-details");
  const summary = el("summary");
  const sizeLabel = el("span", "size", ` ${label}`);
  summary.append(el("span", "preview", summaryText), sizeLabel);
  const box = el("div", "payload-box");
  const pre = el("pre", `payload ${kind}`);
  box.append(pre);
  details.append(summary, box);
  let filled = false;
  let content = fill;
  details.addEventListener("toggle", () => {
    if (details.open && !filled && content) {
      filled = true;
      content(pre, box);
    }
  });
  row.append(details);
  return {
    label(text) {
      sizeLabel.textContent = ` ${text}`;
    },
    content(fn) {
      content = fn;
      if (details.open && !filled) {
        filled = true;
        fn(pre, box);
      }
    },
  };
}

// A big value shows a chunk at a time: a megabyte of text in one go would freeze the page.
function fillPlain(pre, box, text) {
  let shown = 0;
  const more = el("button", "more secondary");
  more.type = "button";
  const step = () => {
    let end = Math.min(text.length, shown + SHOW_CHUNK_CHARS);
    if (end < text.length) {
      const nl = text.lastIndexOf("\n", end);
      if (nl > shown) end = nl + 1;
    }
    pre.append(text.slice(shown, end));
    shown = end;
    if (shown >= text.length) {
      more.remove();
    } else {
      const rest = text.slice(shown);
      more.textContent = `Show more (${plural(countLines(rest), "more line")}, ${size(utf8Bytes(rest))})`;
    }
  };
  more.addEventListener("click", step);
  box.append(more);
  step();
}

function fillHighlighted(pre, { parts, classes }) {
  let plain = "";
  for (let i = 0; i < parts.length; i++) {
    if (classes[i] === null) {
      plain += parts[i];
      continue;
    }
    if (plain) pre.append(plain);
    plain = "";
    pre.append(el("span", classes[i], parts[i]));
  }
  if (plain) pre.append(plain);
}

// Large JSON: folded at once with what is known cheaply; the layout (and so the true line
// count) comes from the worker.
let worker = null;
let workerJobs = 0;
const workerWaiting = new Map();

function layoutInWorker(json) {
  if (worker === null) {
    try {
      worker = new Worker(new URL("./format-worker.js", import.meta.url), { type: "module" });
      worker.onmessage = ({ data }) => {
        workerWaiting.get(data.id)?.(data);
        workerWaiting.delete(data.id);
      };
      worker.onerror = () => {
        for (const [id, done] of workerWaiting) done({ id, text: null });
        workerWaiting.clear();
      };
    } catch {
      worker = false;
    }
  }
  if (!worker) return Promise.resolve({ text: null });
  const id = ++workerJobs;
  return new Promise((resolve) => {
    workerWaiting.set(id, resolve);
    worker.postMessage({ id, json });
  });
}

function renderLargeJson(row, json) {
  const folded = fold(row, "json", preview(json), `laying out… · ${size(utf8Bytes(json))}`, null);
  row.dataset.layout = "pending";
  layoutInWorker(json).then(({ text, lines }) => {
    const shown = text ?? json; // no worker: shown exactly as it came
    folded.label(`${plural(lines ?? countLines(shown), "line")} · ${size(utf8Bytes(json))}`);
    folded.content((pre, box) => fillPlain(pre, box, shown));
    row.dataset.layout = "done";
  });
}

// ---------------------------------------------------------------------------
// Filter, pause, clear, counts, rate
// ---------------------------------------------------------------------------

// A filter with * or > as a token is a NATS pattern, matched against subjects; anything else
// is text, found (whatever its case) in the subject or in the data as it came.  A regular
// expression built once scans each value in place: no lower-cased copy of a large one.
function makeMatcher(raw) {
  const f = raw.trim();
  if (!f) return null;
  if (/(^|\.)(\*|>)(\.|$)/.test(f)) {
    const pattern = f.split(".");
    return (subject) => {
      const tokens = subject.split(".");
      for (let i = 0; i < pattern.length; i++) {
        if (pattern[i] === ">") return tokens.length > i;
        if (i >= tokens.length) return false;
        if (pattern[i] !== "*" && pattern[i] !== tokens[i]) return false;
      }
      return tokens.length === pattern.length;
    };
  }
  const needle = new RegExp(f.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"), "i");
  return (subject, text) => needle.test(subject) || (text !== undefined && needle.test(text));
}

function applyFilter() {
  view.match = makeMatcher(ui.filter.value);
  view.hiddenRows = 0;
  for (const row of ui.list.children) {
    if (!row.classList.contains("msg")) continue;
    row.hidden = view.match ? !view.match(row.dataset.subject, rowText.get(row)) : false;
    if (row.hidden) view.hiddenRows += 1;
  }
  updateCounts();
}

function updateCounts() {
  const shown = view.rows - view.hiddenRows;
  const parts = [view.match ? `${fmt(shown)} of ${fmt(view.rows)} shown` : `${fmt(view.rows)} shown`];
  parts.push(`${fmt(view.received)} received`);
  if (view.rows >= MAX_ROWS) parts.push(`the newest ${MAX_ROWS} are kept`);
  ui.counts.textContent = parts.join(" · ");
  if (view.rows === 0) {
    ui.empty.textContent = view.paused && view.heldCount
      ? "Paused before anything was shown: Resume to see the messages."
      : emptyText();
  } else {
    ui.empty.textContent = `No message matches “${ui.filter.value.trim()}”.`;
  }
  ui.empty.hidden = shown > 0;
}

// An empty list says what is true: what it waits for, and whether it was just cleared.
function emptyText() {
  const subjects = client.subjects().filter((s) => s.state !== "removing" && s.state !== "failed")
    .map((s) => s.subject).sort();
  const start = view.cleared ? "Cleared" : "No messages yet";
  if (!subjects.length) return `${start}. Subscribe to a subject to watch it here.`;
  const named = subjects.length <= 3 ? subjects.join(", ")
    : `${subjects.slice(0, 3).join(", ")} and ${plural(subjects.length - 3, "more subject")}`;
  return `${start}; waiting for messages on ${clip(named, 300)}.`;
}

// The note says exactly what Resume will add to the list.
function showPaused() {
  const n = view.heldCount;
  const onResume = Math.min(n, MAX_ROWS);
  let text;
  if (n === 0) text = "Paused: new messages are counted and kept until you resume.";
  else if (n <= MAX_ROWS) text = `Paused: ${plural(n, "new message")}; Resume shows ${n === 1 ? "it" : "all of them"}.`;
  else {
    text = `Paused: ${plural(n, "new message")}; Resume shows the newest ${fmt(onResume)} ` +
      `(the list keeps ${MAX_ROWS}); all are counted in “received”.`;
  }
  ui.pausedNote.textContent = text;
  ui.pause.textContent = onResume ? `Resume (${fmt(onResume)})` : "Resume";
}

function setPaused(paused) {
  view.paused = paused;
  ui.pause.classList.toggle("active", paused);
  ui.pausedNote.hidden = !paused;
  if (paused) {
    showPaused();
    return;
  }
  ui.pause.textContent = "Pause";
  for (const item of view.held) pushBounded(view.pending, item);
  view.held = [];
  view.heldCount = 0;
  schedule();
}

ui.pause.addEventListener("click", () => setPaused(!view.paused));
ui.clear.addEventListener("click", () => {
  view.pending = [];
  view.held = [];
  view.heldCount = 0;
  view.received = 0;
  view.rows = 0;
  view.hiddenRows = 0;
  view.cleared = true;
  ui.list.replaceChildren();
  if (view.paused) showPaused();
  updateCounts();
});
ui.filter.addEventListener("input", applyFilter);

// Messages per second, averaged over the last few whole seconds.
setInterval(() => {
  view.perSecond.push(0);
  if (view.perSecond.length > RATE_WINDOW_S + 1) view.perSecond.shift();
  const done = view.perSecond.slice(0, -1);
  const rate = done.reduce((a, b) => a + b, 0) / done.length;
  ui.rate.textContent = `${rate === 0 ? "0" : rate < 10 ? rate.toFixed(1) : fmt(Math.round(rate))} msg/s`;
}, 1000);

renderChips([]);
updateCounts();
showPublishKind();
