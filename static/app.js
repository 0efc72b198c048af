// The NATS bridge page: one WebSocket to /stream, subscriptions, a live message list.
// Everything that came from NATS or the server is put on the page with textContent.
"use strict";

(() => {
  const MAX_ROWS = 500; // rows kept in the list; older ones are dropped
  const PAUSE_CAP = 5000; // messages kept while paused; past it the oldest go
  const RAW_LOG_ROWS = 6; // request/reply pairs kept under the raw box
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  const STABLE_MS = 5000; // a connection that lived this long resets the backoff
  const COLLAPSE_CHARS = 1500; // longer values start folded (<details>)
  const COLLAPSE_LINES = 20;
  const PRETTY_WIDTH = 72; // JSON that fits in this many columns stays on one line
  const RATE_WINDOW_S = 5;
  const HIGHLIGHT_MAX_CHARS = 20000;
  const RESUBSCRIBE_CHUNK = 25; // subjects per request when renewing after a reconnect

  // The example's wire strings (see handler.py).
  const NOT_SUBSCRIBED_PREFIX = "The user did not subscribe to event";
  const SUBSCRIBED_PREFIX = "Successfully connected to events:";
  const UNSUBSCRIBED_PREFIX = "Successfully unsubscribed from event:";

  const $ = (id) => document.getElementById(id);
  const ui = {
    connState: $("conn-state"),
    natsState: $("nats-state"),
    connDetail: $("conn-detail"),
    connRetry: $("conn-retry"),
    connToggle: $("conn-toggle"),
    connectionId: $("connection-id"),
    publishPanel: $("publish-panel"),
    publishForm: $("publish-form"),
    publishSubject: $("publish-subject"),
    publishData: $("publish-data"),
    publishKind: $("publish-kind"),
    publishStatus: $("publish-status"),
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

  // A token given in the page's own address (/?token=…): browsers cannot put headers on a
  // WebSocket, so it goes on to the socket's URL the same way.
  const TOKEN = new URLSearchParams(window.location.search).get("token") || "";

  // The socket lives next to the page: same scheme (ws/wss), host, port and path prefix.
  function streamUrl() {
    const url = new URL("stream", window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    url.hash = "";
    if (TOKEN) url.searchParams.set("token", TOKEN);
    return url.href;
  }

  // ---------------------------------------------------------------------------
  // Connection
  // ---------------------------------------------------------------------------

  const conn = {
    ws: null,
    state: "connecting",
    attempt: 0,
    everOpen: false,
    userClosed: false,
    openedAt: 0,
    retryTimer: null,
    tickTimer: null,
    retryAt: 0,
    dropReason: "", // why the last open connection ended, kept while retrying
    failures: 0, // attempts in a row that never opened
  };

  const STATE_TEXT = {
    connecting: "Connecting…",
    connected: "Connected",
    reconnecting: "Reconnecting…",
    closed: "Closed",
  };

  function setState(state, text) {
    conn.state = state;
    ui.connState.dataset.state = state;
    ui.connState.textContent = text || STATE_TEXT[state];
    ui.connToggle.textContent = state === "closed" ? "Connect" : "Disconnect";
    ui.connRetry.hidden = !(state === "reconnecting" && conn.retryTimer !== null);
  }

  function setNats(state, message) {
    ui.natsState.dataset.state = state;
    ui.natsState.textContent = { connected: "NATS: up", disconnected: "NATS: down" }[state] || "NATS: unknown";
    ui.natsState.title = message || "";
  }

  function setDetail(text, tone) {
    ui.connDetail.textContent = text || "";
    ui.connDetail.dataset.tone = tone || "";
  }

  function connect() {
    clearTimeout(conn.retryTimer);
    clearInterval(conn.tickTimer);
    conn.retryTimer = null;
    conn.tickTimer = null;
    conn.userClosed = false;
    setState(conn.everOpen ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new WebSocket(streamUrl());
    } catch (err) {
      setDetail("Cannot open the socket: " + err.message, "error");
      scheduleReconnect();
      return;
    }
    conn.ws = ws;
    ws.addEventListener("open", () => {
      if (conn.ws !== ws) return;
      conn.openedAt = Date.now();
      conn.everOpen = true;
      conn.failures = 0;
      setState("connected");
      // Keep saying why the last connection ended: the reconnect is quick, the cause matters.
      const why = conn.dropReason;
      setDetail(why ? `Reconnected. The last connection ended: ${why[0].toLowerCase()}${why.slice(1)}.` : "");
      conn.dropReason = "";
      resubscribe();
    });
    ws.addEventListener("message", (event) => {
      if (conn.ws === ws) onFrame(event.data);
    });
    ws.addEventListener("close", (event) => {
      if (conn.ws === ws) onClose(event);
    });
  }

  // Close codes the bridge sends on purpose (docs/protocol.md), in words.
  const CLOSE_TEXT = {
    1001: "The bridge is shutting down",
    1008: "The bridge closed the connection because this page sent requests too fast (rate limit, code 1008)",
    1009: "The bridge closed the connection because a request was larger than it accepts (code 1009)",
    1011: "The bridge closed the connection after an internal error (code 1011)",
    1013: "The bridge cut this page off because it fell behind reading messages (slow consumer, code 1013)",
  };
  // The bridge's reason for these only repeats what the text above says.
  const SAID_CLOSES = new Set([1001, 1008, 1013]);
  const ERROR_CLOSES = new Set([1008, 1009, 1011, 1013]);
  // After these, wait a little before trying again: hammering the bridge would not help.
  const SLOW_RETRY_CLOSES = new Set([1008, 1013]);

  function describeClose(event) {
    const reason = event.reason && !SAID_CLOSES.has(event.code) ? `: ${clip(event.reason, 200)}` : "";
    if (CLOSE_TEXT[event.code]) return CLOSE_TEXT[event.code] + reason;
    if (event.code === 1006) return "The connection was lost";
    if (event.code === 1000) return "The connection was closed" + reason;
    return `The connection closed (code ${event.code}${reason})`;
  }

  // A refused handshake (401 no token, 403 other origin, 503 full) looks to a page exactly
  // like a bridge that is down: the socket fails with 1006.  Say what it may be.
  function refusedHint() {
    const what = "It is down, full, or refusing this page.";
    if (TOKEN) return `${what} The token in this page's address may be wrong.`;
    return `${what} If this bridge needs a token, open the page as ${window.location.pathname}?token=…`;
  }

  function cannotConnectText() {
    if (conn.failures < 2) return `Cannot reach the bridge (attempt ${conn.failures}).`;
    return `Cannot connect to the bridge (attempt ${conn.failures}). ${refusedHint()}`;
  }

  function onClose(event) {
    const opened = conn.openedAt > 0;
    const lived = opened ? Date.now() - conn.openedAt : 0;
    conn.ws = null;
    conn.openedAt = 0;
    ui.connectionId.textContent = "—";
    setNats("unknown");
    dropPending(event.code);
    if (conn.userClosed) {
      setState("closed");
      setDetail("Disconnected. Subscriptions are kept and renewed when you connect.");
      return;
    }
    if (lived >= STABLE_MS) conn.attempt = 0;
    if (opened) {
      conn.failures = 0;
      conn.dropReason = describeClose(event);
      setDetail(conn.dropReason + ".", ERROR_CLOSES.has(event.code) ? "error" : "");
    } else {
      conn.failures += 1;
      if (!conn.everOpen) {
        setDetail(cannotConnectText(), conn.failures >= 2 ? "error" : "");
      } else {
        // It was connected before: most likely a restart, so say what ended it first.
        const more = conn.failures >= 4 ? ` ${refusedHint()}` : "";
        const why = conn.dropReason || "The bridge could not be reached";
        setDetail(`${why}. Not reachable yet (attempt ${conn.failures}).${more}`,
          conn.failures >= 4 ? "error" : "");
      }
    }
    scheduleReconnect(opened && SLOW_RETRY_CLOSES.has(event.code) ? 2000 : 0);
  }

  function scheduleReconnect(minDelay = 0) {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** conn.attempt);
    const delay = Math.max(minDelay, Math.round(ceiling * (0.5 + Math.random() * 0.5)));
    conn.attempt += 1;
    conn.retryAt = Date.now() + delay;
    conn.retryTimer = setTimeout(connect, delay);
    conn.tickTimer = setInterval(showCountdown, 500);
    showCountdown();
  }

  function showCountdown() {
    const seconds = Math.max(0, Math.ceil((conn.retryAt - Date.now()) / 1000));
    setState("reconnecting", seconds > 0 ? `Reconnecting in ${seconds} s` : "Reconnecting…");
    ui.connState.title = `attempt ${conn.attempt}`;
  }

  function disconnect() {
    conn.userClosed = true;
    clearTimeout(conn.retryTimer);
    clearInterval(conn.tickTimer);
    conn.retryTimer = null;
    conn.tickTimer = null;
    if (conn.ws) {
      conn.ws.close(1000, "closed by the user");
    } else {
      setState("closed");
      setDetail("Disconnected.");
    }
  }

  function isOpen() {
    return conn.ws !== null && conn.ws.readyState === WebSocket.OPEN;
  }

  ui.connToggle.addEventListener("click", () => {
    if (conn.state === "closed") {
      conn.attempt = 0;
      connect();
    } else {
      disconnect();
    }
  });
  ui.connRetry.addEventListener("click", () => connect());

  // ---------------------------------------------------------------------------
  // Frames from the server
  // ---------------------------------------------------------------------------

  // ---------------------------------------------------------------------------
  // Faithful JSON: JSON.parse moves integer-like keys to the front and rounds big
  // numbers; the bridge passes payloads through verbatim, so the page shows them
  // as sent.  Objects become Obj (ordered entries), numbers Num (their literal).
  // ---------------------------------------------------------------------------

  class Obj {
    constructor(entries) {
      this.entries = entries;
    }
  }

  class Num {
    constructor(raw) {
      this.raw = raw;
    }
  }

  const WS_RE = /[ \t\n\r]*/y;
  const STRING_RE = /"(?:[^"\\\u0000-\u001f]|\\.)*"/y;
  const NUMBER_RE = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;

  function parseFaithful(text) {
    let pos = 0;
    const skip = () => {
      WS_RE.lastIndex = pos;
      WS_RE.exec(text);
      pos = WS_RE.lastIndex;
    };
    const token = (re) => {
      re.lastIndex = pos;
      const m = re.exec(text);
      if (!m) throw new SyntaxError(`bad JSON at ${pos}`);
      pos = re.lastIndex;
      return m[0];
    };
    const value = (depth) => {
      if (depth > 500) throw new SyntaxError("too deep");
      skip();
      const c = text[pos];
      if (c === "{") {
        pos++;
        const entries = [];
        skip();
        if (text[pos] === "}") {
          pos++;
          return new Obj(entries);
        }
        for (;;) {
          skip();
          const key = JSON.parse(token(STRING_RE));
          skip();
          if (text[pos++] !== ":") throw new SyntaxError("expected :");
          entries.push([key, value(depth + 1)]);
          skip();
          const next = text[pos++];
          if (next === "}") return new Obj(entries);
          if (next !== ",") throw new SyntaxError("expected , or }");
        }
      }
      if (c === "[") {
        pos++;
        const items = [];
        skip();
        if (text[pos] === "]") {
          pos++;
          return items;
        }
        for (;;) {
          items.push(value(depth + 1));
          skip();
          const next = text[pos++];
          if (next === "]") return items;
          if (next !== ",") throw new SyntaxError("expected , or ]");
        }
      }
      if (c === '"') return JSON.parse(token(STRING_RE));
      for (const [word, v] of [["true", true], ["false", false], ["null", null]]) {
        if (text.startsWith(word, pos)) {
          pos += word.length;
          return v;
        }
      }
      return new Num(token(NUMBER_RE));
    };
    const result = value(0);
    skip();
    if (pos !== text.length) throw new SyntaxError("trailing text");
    return result;
  }

  // The frame's "data", as sent; falls back to the JSON.parse value.
  function faithfulData(item) {
    try {
      const frame = parseFaithful(item.frame);
      for (const [key, v] of frame.entries) if (key === "data") return v;
    } catch {
      // fall through
    }
    return item.data;
  }

  function onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      setDetail("The server sent a frame that is not JSON.", "error");
      return;
    }
    if (frame === null || typeof frame !== "object" || Array.isArray(frame)) return;
    if (frame.type === "welcome") {
      ui.connectionId.textContent = String(frame.connection_id ?? "—");
      if (frame.nats) setNats(frame.nats);
      showPublish(frame.publish === true);
    } else if (frame.type === "status") {
      if (frame.nats) setNats(frame.nats, frame.message);
      setDetail(frame.message ? String(frame.message) : "", frame.success === false ? "error" : "");
    } else if (frame.type === "reply") {
      onReply(frame);
    } else if (frame.type === "dropped") {
      // The server had to drop messages for this page: mark the gap where it happened.
      onGap(frame);
    } else if (typeof frame.subject === "string") {
      onMessage(frame, text);
    }
  }

  // ---------------------------------------------------------------------------
  // Requests and their replies
  // ---------------------------------------------------------------------------

  // subject -> {state: "pending" | "subscribed" | "removing" | "failed", error?: string}
  const subs = new Map();
  const pendingById = new Map(); // JSON of the id -> [request, ...]
  const pendingAnon = []; // requests sent without an id, answered in order
  let nextId = 1;

  function isPlainObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value);
  }

  // The server echoes only plain scalar ids; replies to anything else come without one.
  function echoable(id) {
    if (typeof id === "boolean") return true;
    if (typeof id === "string") return id.length <= 256;
    if (typeof id === "number") return Number.isFinite(id) && (!Number.isInteger(id) || Math.abs(id) < 2 ** 53);
    return false;
  }

  function validSubjects(body) {
    const s = body && body.subjects;
    return Array.isArray(s) && s.length > 0 && s.every((x) => typeof x === "string") ? s : null;
  }

  // Send a request; `origin` says where its replies are shown.
  function send(text, body, origin, extra = {}) {
    const req = {
      origin,
      text,
      action: body ? (body.action === undefined ? "subscribe" : body.action) : null,
      subjects: body ? validSubjects(body) : null,
      index: 0,
      added: [],
      ...extra,
    };
    if (body && echoable(body.id)) {
      const key = JSON.stringify(body.id);
      if (!pendingById.has(key)) pendingById.set(key, []);
      pendingById.get(key).push(req);
    } else {
      pendingAnon.push(req);
    }
    if (req.subjects && req.action === "subscribe") {
      for (const s of req.subjects) {
        const sub = subs.get(s);
        if (!sub) {
          subs.set(s, { state: "pending" });
          req.added.push(s);
        } else if (sub.state === "failed") {
          subs.set(s, { state: "pending" });
        }
      }
    } else if (req.subjects && req.action === "unsubscribe") {
      for (const s of req.subjects) {
        if (subs.has(s)) subs.get(s).state = "removing";
      }
    }
    renderChips();
    conn.ws.send(text);
    return req;
  }

  function sendBody(body, origin, extra) {
    body.id = `page-${nextId++}`;
    return send(JSON.stringify(body), body, origin, extra);
  }

  function onReply(frame) {
    if (frame.source === "http") {
      onBackendReply(frame);
      return;
    }
    let queue = pendingAnon;
    let key = null;
    if (frame.id !== undefined && frame.id !== null) {
      key = JSON.stringify(frame.id);
      queue = pendingById.get(key) || [];
    }
    const req = queue[0];
    if (!req) {
      logUnmatched(frame);
      return;
    }
    if (applyReply(req, frame)) {
      queue.shift();
      if (key !== null && queue.length === 0) pendingById.delete(key);
    }
    renderChips();
  }

  // Returns true when `req` expects no more replies.
  function applyReply(req, frame) {
    const ok = frame.success === true;
    const message = String(frame.message ?? "");
    if (req.action === "unsubscribe" && req.subjects) {
      // One reply per subject, in the order given, unless the whole request was refused.
      // Replies name their action and subject; older bridges only said it in `message`.
      const perSubject = frame.action !== undefined
        ? frame.action === "unsubscribe" && oneSubject(frame) !== null
        : ok || message.startsWith(NOT_SUBSCRIBED_PREFIX);
      if (perSubject) {
        const subject = oneSubject(frame) ?? req.subjects[req.index];
        req.index += 1;
        subs.delete(subject);
        report(req, ok, message, subject);
        return req.index >= req.subjects.length;
      }
      for (const s of req.subjects) {
        const sub = subs.get(s);
        if (sub && sub.state === "removing") sub.state = "subscribed";
      }
      report(req, ok, message);
      return true;
    }
    if (req.action === "subscribe" && req.subjects) {
      if (ok) {
        for (const s of req.subjects) {
          const sub = subs.get(s);
          if (!sub || sub.state !== "removing") subs.set(s, { state: "subscribed" });
        }
      } else {
        for (const s of req.subjects) {
          const sub = subs.get(s);
          if (!sub || sub.state === "removing") continue;
          if (req.added.includes(s) && req.origin !== "resubscribe") subs.delete(s);
          else subs.set(s, { state: "failed", error: message });
        }
      }
    }
    report(req, ok, message);
    return true;
  }

  function oneSubject(frame) {
    const s = frame.subjects;
    return Array.isArray(s) && s.length === 1 && typeof s[0] === "string" ? s[0] : null;
  }

  // The socket closed: nothing pending will be answered.
  function dropPending(code) {
    const all = [...pendingAnon];
    for (const queue of pendingById.values()) all.push(...queue);
    pendingAnon.length = 0;
    pendingById.clear();
    // 1009: one of these requests was too large for the bridge.  Sending its subjects
    // again on reconnect would only be cut off again, for ever.
    const tooLarge = code === 1009;
    for (const req of all) {
      if (req.action === "unsubscribe" && req.subjects) {
        // Not renewed on reconnect, which is what was asked.
        for (const s of req.subjects) if (subs.get(s)?.state === "removing") subs.delete(s);
      }
      const subscribe = req.action === "subscribe" && req.subjects;
      if (subscribe && tooLarge) {
        for (const s of req.added) if (subs.get(s)?.state === "pending") subs.delete(s);
      }
      if (req.origin === "raw" || req.origin === "form" || req.origin === "publish") {
        let why = "No reply: the connection closed";
        if (tooLarge) why += " (a request was too large); not sent again";
        else if (subscribe) why += "; it is sent again on reconnect";
        report(req, false, why);
      }
    }
    for (const sub of subs.values()) if (sub.state === "subscribed") sub.state = "pending";
    renderChips();
  }

  // After every (re)connect, ask again for everything this page was subscribed to.
  function resubscribe() {
    const subjects = [...subs.keys()];
    for (const s of subjects) subs.set(s, { state: "pending" });
    for (let i = 0; i < subjects.length; i += RESUBSCRIBE_CHUNK) {
      sendBody({ subjects: subjects.slice(i, i + RESUBSCRIBE_CHUNK), action: "subscribe" }, "resubscribe");
    }
  }

  // A backend acted for this page with POST /clients/{id}: keep the chips true.
  function onBackendReply(frame) {
    const ok = frame.success === true;
    const message = String(frame.message ?? "");
    let action = frame.action;
    let subjects = Array.isArray(frame.subjects) ? frame.subjects.filter((s) => typeof s === "string") : null;
    if (action === undefined && ok) {
      // An older bridge: the subjects are only in the message.
      if (message.startsWith(SUBSCRIBED_PREFIX)) {
        action = "subscribe";
        subjects = parsePythonList(message.slice(SUBSCRIBED_PREFIX.length));
      } else if (message.startsWith(UNSUBSCRIBED_PREFIX)) {
        action = "unsubscribe";
        subjects = [message.slice(UNSUBSCRIBED_PREFIX.length).trim()];
      }
    }
    if (ok && subjects && action === "subscribe") {
      for (const s of subjects) subs.set(s, { state: "subscribed" });
    } else if (ok && subjects && action === "unsubscribe") {
      for (const s of subjects) subs.delete(s);
    }
    renderChips();
    const where = action === "publish" && !ui.publishPanel.hidden ? ui.publishStatus : ui.subjectStatus;
    setStatus(where, ok, "A backend asked: " + message);
  }

  // "'a', 'b'" (Python's list formatting) -> ["a", "b"]
  function parsePythonList(text) {
    const out = [];
    const re = /'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"/g;
    let m;
    while ((m = re.exec(text)) !== null) out.push((m[1] ?? m[2]).replace(/\\(.)/g, "$1"));
    return out;
  }

  // ---------------------------------------------------------------------------
  // Showing outcomes next to what caused them
  // ---------------------------------------------------------------------------

  function setStatus(node, ok, text) {
    node.textContent = text;
    node.dataset.tone = ok ? "ok" : "error";
  }

  function report(req, ok, message, subject) {
    if (req.origin === "raw") {
      addRawReply(req, ok, message);
    } else if (req.origin === "publish") {
      setStatus(ui.publishStatus, ok, message);
    } else if (req.origin === "resubscribe") {
      if (ok) setStatus(ui.subjectStatus, true, "Subscriptions renewed after reconnecting.");
      else setStatus(ui.subjectStatus, false, "Could not renew subscriptions: " + message);
    } else if (ok) {
      setStatus(ui.subjectStatus, true, message);
    } else {
      const about = subject && !message.includes(subject) ? `${subject}: ` : "";
      setStatus(ui.subjectStatus, false, about + message);
    }
  }

  function addRawEntry(text) {
    const item = el("li", "raw-entry");
    item.append(el("code", "raw-request", clip(text, 300)));
    const replies = el("ul", "raw-replies");
    item.append(replies);
    ui.rawLog.prepend(item);
    while (ui.rawLog.children.length > RAW_LOG_ROWS) ui.rawLog.lastElementChild.remove();
    return replies;
  }

  function addRawReply(req, ok, message) {
    const line = el("li", ok ? "reply ok" : "reply error");
    line.append(el("span", "mark", ok ? "✓" : "✗"), el("span", "reply-text", message));
    req.replies.append(line);
  }

  function logUnmatched(frame) {
    const replies = addRawEntry("(a reply to no request of this page)");
    addRawReply({ replies }, frame.success === true, String(frame.message ?? ""));
  }

  // ---------------------------------------------------------------------------
  // Subscription controls
  // ---------------------------------------------------------------------------

  function subjectsFromField() {
    return [...new Set(ui.subject.value.split(/[\s,]+/).filter(Boolean))];
  }

  function subscribeFromField() {
    const subjects = subjectsFromField();
    if (subjects.length === 0) {
      setStatus(ui.subjectStatus, false, "Type a subject first.");
      ui.subject.focus();
      return;
    }
    if (!isOpen()) {
      // Kept as wanted; the next connection subscribes it.
      for (const s of subjects) if (!subs.has(s)) subs.set(s, { state: "pending" });
      renderChips();
      setStatus(ui.subjectStatus, true, "Not connected: will subscribe once the connection is back.");
      ui.subject.value = "";
      return;
    }
    const fresh = subjects.filter((s) => subs.get(s)?.state !== "subscribed");
    if (fresh.length === 0) {
      setStatus(ui.subjectStatus, true, "Already subscribed.");
      return;
    }
    setStatus(ui.subjectStatus, true, "Subscribing…");
    sendBody({ subjects: fresh, action: "subscribe" }, "form");
    ui.subject.value = "";
  }

  function unsubscribe(subjects, origin) {
    if (!isOpen()) {
      for (const s of subjects) subs.delete(s);
      renderChips();
      setStatus(ui.subjectStatus, true, "Removed; nothing to tell the server while disconnected.");
      return;
    }
    sendBody({ subjects, action: "unsubscribe" }, origin);
  }

  ui.subjectForm.addEventListener("submit", (event) => {
    event.preventDefault();
    subscribeFromField();
  });

  ui.unsubscribe.addEventListener("click", () => {
    const subjects = subjectsFromField();
    if (subjects.length === 0) {
      setStatus(ui.subjectStatus, false, "Type the subject to unsubscribe from.");
      ui.subject.focus();
      return;
    }
    unsubscribe(subjects, "form");
    ui.subject.value = "";
  });

  const CHIP_STATE_TEXT = {
    pending: "subscribing",
    removing: "unsubscribing",
    failed: "not subscribed",
  };

  function renderChips() {
    const focusedSubject = document.activeElement?.closest?.(".chip")?.dataset.subject;
    const frag = document.createDocumentFragment();
    for (const [subject, sub] of [...subs.entries()].sort((a, b) => a[0].localeCompare(b[0]))) {
      const chip = el("li", "chip");
      chip.dataset.subject = subject;
      chip.dataset.state = sub.state;
      chip.append(el("span", "chip-subject", subject));
      if (CHIP_STATE_TEXT[sub.state]) chip.append(el("span", "chip-state", CHIP_STATE_TEXT[sub.state]));
      if (sub.error) chip.title = sub.error;
      const remove = el("button", "chip-remove", "×");
      remove.type = "button";
      remove.setAttribute("aria-label", `Unsubscribe from ${subject}`);
      remove.title = `Unsubscribe from ${subject}`;
      remove.disabled = sub.state === "removing";
      remove.addEventListener("click", () => {
        unsubscribe([subject], "chip");
        // Keep the keyboard user in the chip list.
        (ui.chips.querySelector(".chip-remove:not(:disabled)") || ui.subject).focus();
      });
      chip.append(remove);
      frag.append(chip);
    }
    ui.chips.replaceChildren(frag);
    ui.noSubs.hidden = subs.size > 0;
    if (focusedSubject) {
      const again = [...ui.chips.children].find((c) => c.dataset.subject === focusedSubject);
      again?.querySelector("button:not(:disabled)")?.focus();
    }
  }

  // ---------------------------------------------------------------------------
  // Publish box (only when the welcome frame says the bridge allows publishing)
  // ---------------------------------------------------------------------------

  function showPublish(allowed) {
    ui.publishPanel.hidden = !allowed;
  }

  // Data that parses as JSON goes as that JSON value, verbatim (big numbers and key order
  // survive); anything else as a string.
  function publishData() {
    const raw = ui.publishData.value;
    const trimmed = raw.trim();
    if (trimmed) {
      try {
        const value = JSON.parse(trimmed);
        const kind = Array.isArray(value) ? "array" : value === null ? "null" : typeof value;
        return { json: trimmed, kind: `JSON ${kind}` };
      } catch {
        // not JSON: text
      }
    }
    return { json: JSON.stringify(raw), kind: raw ? "text" : "empty text" };
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

  function publishFromForm() {
    const subject = ui.publishSubject.value.trim();
    if (!subject) {
      setStatus(ui.publishStatus, false, "Type the subject to publish to.");
      ui.publishSubject.focus();
      return;
    }
    if (!isOpen()) {
      setStatus(ui.publishStatus, false, "Not sent: not connected.");
      return;
    }
    const id = `page-${nextId++}`;
    const text = `{"action":"publish","subject":${JSON.stringify(subject)},"data":${publishData().json},` +
      `"id":${JSON.stringify(id)}}`;
    setStatus(ui.publishStatus, true, `Publishing to ${subject}…`);
    send(text, { action: "publish", subject, id }, "publish");
  }

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
  // Raw JSON box
  // ---------------------------------------------------------------------------

  let lastRaw = "";

  ui.rawForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.raw.value.trim();
    if (!text) return;
    lastRaw = text;
    const replies = addRawEntry(text);
    if (!isOpen()) {
      addRawReply({ replies }, false, "Not sent: not connected.");
      return;
    }
    let body = null;
    let out = text;
    try {
      const parsed = JSON.parse(text);
      if (isPlainObject(parsed)) {
        body = parsed;
        if (!("id" in body)) {
          body.id = `page-${nextId++}`;
          out = JSON.stringify(body);
        }
      }
    } catch {
      // Sent as typed: the server's reply says what is wrong with it.
    }
    send(out, body, "raw", { replies });
    ui.raw.value = "";
  });

  ui.raw.addEventListener("keydown", (event) => {
    if (event.key === "ArrowUp" && ui.raw.value === "" && lastRaw) {
      event.preventDefault();
      ui.raw.value = lastRaw;
    }
  });

  // ---------------------------------------------------------------------------
  // Messages
  // ---------------------------------------------------------------------------

  const view = {
    paused: false,
    held: [], // arrived while paused
    dropped: 0, // pushed out of `held` by the cap
    queue: [], // waiting for the next frame to be drawn
    frameRequested: false,
    received: 0,
    perSecond: [0], // arrivals per second; the last entry is the current second
    match: null,
  };

  function onMessage(frame, text) {
    const item = {
      frame: text,
      subject: frame.subject,
      data: frame.data,
      encoding: frame.encoding,
      headers: frame.headers,
      reply: frame.reply,
      at: new Date(),
    };
    view.received += 1;
    view.perSecond[view.perSecond.length - 1] += 1;
    if (view.paused) {
      view.held.push(item);
      if (view.held.length > PAUSE_CAP * 1.2) {
        const extra = view.held.length - PAUSE_CAP;
        view.held.splice(0, extra);
        view.dropped += extra;
      }
      showPaused();
      return;
    }
    enqueue([item]);
  }

  function onGap(frame) {
    const n = Number(frame.dropped) || 0;
    const item = { gap: true, text: String(frame.message ?? `${n} messages dropped`), at: new Date() };
    if (view.paused) {
      view.held.push(item);
      showPaused();
    } else {
      enqueue([item]);
    }
  }

  function enqueue(items) {
    view.queue.push(...items);
    if (view.queue.length > MAX_ROWS * 2) view.queue.splice(0, view.queue.length - MAX_ROWS);
    if (!view.frameRequested) {
      view.frameRequested = true;
      requestAnimationFrame(flush);
    }
  }

  function flush() {
    view.frameRequested = false;
    const items = view.queue.slice(-MAX_ROWS);
    view.queue.length = 0;
    const frag = document.createDocumentFragment();
    for (let i = items.length - 1; i >= 0; i--) frag.append(renderRow(items[i]));
    ui.list.insertBefore(frag, ui.list.firstChild);
    while (ui.list.children.length > MAX_ROWS) ui.list.lastElementChild.remove();
    updateCounts();
  }

  function two(n, width = 2) {
    return String(n).padStart(width, "0");
  }

  function clock(date) {
    return `${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}.${two(date.getMilliseconds(), 3)}`;
  }

  function renderGap(item) {
    const row = el("li", "gap");
    const time = el("time", "msg-time", clock(item.at));
    time.dateTime = item.at.toISOString();
    row.append(el("span", "gap-text", item.text), time);
    return row;
  }

  function renderRow(item) {
    if (item.gap) return renderGap(item);
    const row = el("li", "msg");
    row.dataset.subject = item.subject;
    const head = el("div", "msg-head");
    head.append(el("span", "subject", item.subject));
    const time = el("time", "msg-time", clock(item.at));
    time.dateTime = item.at.toISOString();
    head.append(time);

    let text;
    let kind;
    let value;
    if (item.encoding === "base64") {
      text = String(item.data);
      kind = "base64";
      const bytes = Math.floor((text.length * 3) / 4) - (text.endsWith("==") ? 2 : text.endsWith("=") ? 1 : 0);
      head.append(el("span", "badge base64", `base64 · ${bytes} bytes`));
    } else if (typeof item.data === "string") {
      text = item.data;
      kind = "text";
      head.append(el("span", "badge text", "text"));
    } else {
      value = faithfulData(item);
      text = prettyJson(value);
      kind = "json";
    }
    if (item.reply) head.append(el("span", "badge reply", `reply → ${item.reply}`));
    row.append(head);

    if (isPlainObject(item.headers) && Object.keys(item.headers).length) {
      const headers = el("dl", "headers");
      for (const [k, v] of Object.entries(item.headers)) {
        headers.append(el("dt", null, k), el("dd", null, Array.isArray(v) ? v.join(", ") : String(v)));
      }
      row.append(headers);
    }

    const pre = el("pre", `payload ${kind}`);
    if (kind === "json" && text.length <= HIGHLIGHT_MAX_CHARS) highlight(pre, text);
    else pre.textContent = text;

    const lines = text.split("\n").length;
    if (text.length > COLLAPSE_CHARS || lines > COLLAPSE_LINES) {
      const details = el("details", "payload-details");
      const summary = el("summary");
      const preview = kind === "json" ? compactJson(value) : text.replace(/\s+/g, " ");
      summary.append(
        el("span", "preview", clip(preview, 140)),
        el("span", "size", kind === "json" ? ` ${lines} lines` : ` ${text.length} chars`),
      );
      details.append(summary, pre);
      row.append(details);
    } else {
      row.append(pre);
    }
    if (view.match && !view.match(item.subject)) row.hidden = true;
    return row;
  }

  // JSON laid out for reading: a value that fits on one line stays on one line.
  function prettyJson(value) {
    try {
      return pretty(value, "", 0, 0);
    } catch {
      return compactJson(value);
    }
  }

  function compactJson(value) {
    return inline(value, Infinity) ?? "";
  }

  function isObject(value) {
    return value instanceof Obj || (isPlainObject(value) && !(value instanceof Num));
  }

  function entriesOf(value) {
    return value instanceof Obj ? value.entries : Object.entries(value);
  }

  function scalarJson(value) {
    if (value instanceof Num) return value.raw;
    return JSON.stringify(value) ?? "null";
  }

  function pretty(value, indent, prefix, depth) {
    const one = inline(value, PRETTY_WIDTH - indent.length - prefix);
    if (one !== null || depth > 60) return one ?? compactJson(value);
    const inner = indent + "  ";
    if (Array.isArray(value)) {
      const items = value.map((v) => inner + pretty(v, inner, 0, depth + 1));
      return `[\n${items.join(",\n")}\n${indent}]`;
    }
    const items = entriesOf(value).map(([k, v]) => {
      const key = JSON.stringify(k) + ": ";
      return inner + key + pretty(v, inner, key.length, depth + 1);
    });
    return `{\n${items.join(",\n")}\n${indent}}`;
  }

  // One-line JSON with a space after , and :, or null when longer than `budget`.
  function inline(value, budget) {
    if (budget <= 0) return null;
    if (!Array.isArray(value) && !isObject(value)) {
      const text = scalarJson(value);
      return text.length <= budget ? text : null;
    }
    const isArray = Array.isArray(value);
    let out = isArray ? "[" : "{";
    const entries = isArray ? value : entriesOf(value);
    for (let i = 0; i < entries.length; i++) {
      if (i > 0) out += ", ";
      let part;
      if (isArray) {
        part = inline(entries[i], budget - out.length - 1);
      } else {
        const key = JSON.stringify(entries[i][0]) + ": ";
        const rest = inline(entries[i][1], budget - out.length - key.length - 1);
        part = rest === null ? null : key + rest;
      }
      if (part === null) return null;
      out += part;
    }
    out += isArray ? "]" : "}";
    return out.length <= budget ? out : null;
  }

  // Colour a pretty-printed JSON string with spans; every piece goes in as text.
  function highlight(pre, text) {
    const re = /("(?:[^"\\]|\\.)*")(\s*:)?|\b(true|false|null)\b|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;
    let last = 0;
    let m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) pre.append(document.createTextNode(text.slice(last, m.index)));
      let cls = "j-num";
      if (m[1] !== undefined) cls = m[2] ? "j-key" : "j-str";
      else if (m[3] !== undefined) cls = "j-lit";
      pre.append(el("span", cls, m[1] !== undefined ? m[1] : m[0]));
      if (m[2]) pre.append(document.createTextNode(m[2]));
      last = re.lastIndex;
    }
    if (last < text.length) pre.append(document.createTextNode(text.slice(last)));
  }

  // A filter with * or > is a NATS pattern; anything else matches as plain text.
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
    const needle = f.toLowerCase();
    return (subject) => subject.toLowerCase().includes(needle);
  }

  function applyFilter() {
    view.match = makeMatcher(ui.filter.value);
    for (const row of ui.list.querySelectorAll(":scope > .msg")) {
      row.hidden = view.match ? !view.match(row.dataset.subject) : false;
    }
    updateCounts();
  }

  function updateCounts() {
    const messages = ui.list.querySelectorAll(":scope > .msg");
    const rows = messages.length;
    let shown = rows;
    if (view.match) {
      shown = 0;
      for (const row of messages) if (!row.hidden) shown += 1;
    }
    const parts = [];
    if (view.match) parts.push(`${shown} of ${rows} shown`);
    else parts.push(`${rows} shown`);
    parts.push(`${view.received} received`);
    if (ui.list.children.length >= MAX_ROWS) parts.push(`the newest ${MAX_ROWS} are kept`);
    ui.counts.textContent = parts.join(" · ");
    if (rows === 0) {
      ui.empty.textContent = "No messages yet. Subscribe to a subject to watch it here.";
    } else {
      ui.empty.textContent = `No message matches “${ui.filter.value.trim()}”.`;
    }
    ui.empty.hidden = shown > 0;
  }

  function showPaused() {
    const parts = [`Paused: ${view.held.length} new message${view.held.length === 1 ? "" : "s"} waiting`];
    if (view.dropped) parts.push(`${view.dropped} older dropped (the newest ${PAUSE_CAP} are kept)`);
    ui.pausedNote.textContent = parts.join("; ") + ".";
    ui.pause.textContent = view.held.length ? `Resume (${view.held.length})` : "Resume";
  }

  function setPaused(paused) {
    view.paused = paused;
    ui.pause.classList.toggle("active", paused);
    ui.pausedNote.hidden = !paused;
    if (paused) {
      showPaused();
    } else {
      ui.pause.textContent = "Pause";
      const held = view.held;
      view.held = [];
      view.dropped = 0;
      if (held.length) enqueue(held);
    }
  }

  ui.pause.addEventListener("click", () => setPaused(!view.paused));
  ui.clear.addEventListener("click", () => {
    view.queue.length = 0;
    view.held = [];
    view.dropped = 0;
    view.received = 0;
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
    ui.rate.textContent = `${rate === 0 ? "0" : rate < 10 ? rate.toFixed(1) : Math.round(rate)} msg/s`;
  }, 1000);

  // ---------------------------------------------------------------------------
  // Start
  // ---------------------------------------------------------------------------

  renderChips();
  updateCounts();
  showPublishKind();
  connect();
})();
