// A client for the NATS ⇄ WebSocket bridge (protocol 1, docs/protocol.md).  No dependencies;
// an ES module for browsers (anything with a WebSocket works).  Types: bridge-client.d.ts.
//
//   const client = new BridgeClient("wss://host/stream", {token});
//   const sub = client.subscribe("orders.*");
//   sub.on("message", (m) => console.log(m.subject, m.data));
//   await sub.ready;
//
// The client keeps the set of subjects it wants and renews all of them after every
// reconnect; requests carry ids and replies settle them; requests are paced under the
// bridge's CONTROL_RATE so that renewing many subscriptions never trips it.

const DEFAULTS = {
  minDelay: 500, // ms: the first reconnect waits up to this long...
  maxDelay: 20000, // ...doubling each attempt up to this (full jitter: a random share of it)
  laterDelay: 2000, // ms at least after 1008 (flooding) and 1013 (slow consumer): "come back later"
  stableAfter: 5000, // ms a connection must live before the backoff starts over
  // The bridge allows CONTROL_RATE (default 20) requests a second with a burst of as many;
  // staying below it leaves room for timing differences between the two ends.
  requestsPerSecond: 15,
  requestBurst: 15,
  maxSubjectsPerRequest: 50, // the bridge's MAX_SUBJECTS_PER_REQUEST default
};
const COME_BACK_LATER = new Set([1008, 1013]);
const TOKEN_EXPIRED = 4001; // reserved for token auth: fetch a fresh token before reconnecting
const LOST = "No reply: the connection closed";

// Listener errors must not break the client (or the other listeners): rethrown on their
// own, like errors in DOM event listeners, so they still show in the console.
function report(err) {
  setTimeout(() => {
    throw err;
  });
}

class Emitter {
  constructor() {
    this._handlers = Object.create(null);
  }

  /** Adds a listener; returns a function that removes it. */
  on(event, fn) {
    // Copy on write: emitting iterates the array without copying it per event.
    this._handlers[event] = [...(this._handlers[event] || []), fn];
    return () => this.off(event, fn);
  }

  off(event, fn) {
    const list = this._handlers[event];
    if (list) this._handlers[event] = list.filter((f) => f !== fn);
  }

  _emit(event, a, b) {
    const list = this._handlers[event];
    if (!list) return;
    for (let i = 0; i < list.length; i++) {
      try {
        list[i](a, b);
      } catch (err) {
        report(err);
      }
    }
  }
}

/** NATS wildcard matching: `*` is one token, `>` one or more at the end. */
export function subjectMatches(pattern, subject) {
  if (pattern === subject) return true;
  const p = pattern.split(".");
  const s = subject.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return s.length > i;
    if (i >= s.length || (p[i] !== "*" && p[i] !== s[i])) return false;
  }
  return p.length === s.length;
}

// --- The exact text of one member of a JSON object, without parsing it a second time ---

// Index just past the JSON string that starts at i, or -1.
function skipString(t, i) {
  for (let j = i + 1; ; ) {
    const q = t.indexOf('"', j);
    if (q < 0) return -1;
    let b = q - 1;
    while (t.charCodeAt(b) === 92) b--;
    if ((q - 1 - b) % 2 === 0) return q + 1; // an even run of backslashes escapes nothing
    j = q + 1;
  }
}

function skipSpace(t, i) {
  for (let c = t.charCodeAt(i); c === 32 || c === 10 || c === 13 || c === 9; c = t.charCodeAt(++i));
  return i;
}

// Index just past the JSON value that starts at i, or -1.
function skipValue(t, i) {
  let c = t.charCodeAt(i);
  if (c === 34) return skipString(t, i);
  if (c !== 123 && c !== 91) {
    while (i < t.length && (c = t.charCodeAt(i)) !== 44 && c !== 125 && c !== 93 && c > 32) i++;
    return i;
  }
  for (let depth = 0; i < t.length; i++) {
    c = t.charCodeAt(i);
    if (c === 34) {
      i = skipString(t, i) - 1;
      if (i < 0) return -1;
    } else if (c === 123 || c === 91) {
      depth++;
    } else if ((c === 125 || c === 93) && --depth === 0) {
      return i + 1;
    }
  }
  return -1;
}

/** The verbatim text of member `name` of the JSON object `text`, or undefined. */
export function memberText(text, name) {
  let i = skipSpace(text, 0);
  if (text[i] !== "{") return undefined;
  const quoted = JSON.stringify(name);
  for (i = skipSpace(text, i + 1); text.charCodeAt(i) === 34; ) {
    const keyEnd = skipString(text, i);
    if (keyEnd < 0) return undefined;
    const key = text.slice(i, keyEnd);
    i = skipSpace(text, keyEnd);
    if (text[i] !== ":") return undefined;
    i = skipSpace(text, i + 1);
    const end = skipValue(text, i);
    if (end < 0) return undefined;
    if (key === quoted || (key.includes("\\") && JSON.parse(key) === name)) return text.slice(i, end);
    i = skipSpace(text, end);
    if (text[i] !== ",") return undefined;
    i = skipSpace(text, i + 1);
  }
  return undefined;
}

/** One NATS message as the bridge forwarded it. */
export class BridgeMessage {
  constructor(frame, text, matches) {
    this.subject = frame.subject;
    /** The payload: JSON.parse's value for JSON payloads, else a string (see `encoding`). */
    this.data = frame.data;
    /** "text" (UTF-8, not JSON), "base64" (raw bytes), or undefined: the payload is JSON. */
    this.encoding = frame.encoding;
    this.headers = frame.headers;
    this.reply = frame.reply;
    /** This client's subscriptions (patterns) that match the subject, when it arrived. */
    this.matches = matches;
    /** The frame's text as received. */
    this.frame = text;
    this.receivedAt = Date.now();
    this._dataJson = undefined;
  }

  /** The payload's JSON text exactly as sent: big integers keep their digits, keys their order. */
  get dataJson() {
    if (this._dataJson === undefined) {
      this._dataJson = memberText(this.frame, "data") ?? JSON.stringify(this.data) ?? "null";
    }
    return this._dataJson;
  }
}

function isPlainObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

// The bridge echoes only these ids; replies to anything else come back without one.
function echoable(id) {
  if (typeof id === "boolean") return true;
  if (typeof id === "string") return id.length <= 256;
  if (typeof id === "number") return Number.isFinite(id) && (!Number.isInteger(id) || Math.abs(id) < 2 ** 53);
  return false;
}

function validSubjects(s) {
  return Array.isArray(s) && s.length > 0 && s.every((x) => typeof x === "string") ? s : null;
}

function replyError(frame) {
  const err = new Error(String(frame.message ?? "The bridge refused the request"));
  err.reply = frame;
  return err;
}

function lostError(tooLarge) {
  return new Error(tooLarge ? `${LOST} (a request was too large); not sent again` : LOST);
}

function chunks(list, size) {
  const out = [];
  for (let i = 0; i < list.length; i += size) out.push(list.slice(i, i + size));
  return out;
}

function base64(bytes) {
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

// --- The socket off the main thread (option socketWorker) ----------------------------------
// Under a burst Chromium hands a page its socket's backlog in one task: thousands of message
// events, 50 ms and more of a blocked main thread even when each handler does nothing.  With
// the socket in a worker (bridge-socket-worker.js) that happens on the worker's thread, and the
// page gets the messages in batches small enough to handle in a few milliseconds.

const hosts = new Map(); // worker script URL -> {worker, sockets, broken}
let socketIds = 0;

function socketHost(script) {
  let host = hosts.get(script);
  if (!host) {
    const worker = new Worker(script);
    host = { worker, sockets: new Map(), broken: false };
    worker.onmessage = (event) => host.sockets.get(event.data.id)?._event(event.data);
    // The script could not load (or failed): its sockets are lost; later ones go direct.
    worker.onerror = () => {
      host.broken = true;
      for (const socket of host.sockets.values()) socket._event({ ev: "close", code: 1006, reason: "" });
    };
    hosts.set(script, host);
  }
  return host;
}

/** The part of WebSocket the client uses, with the socket itself in a worker. */
class WorkerSocket {
  constructor(url, host) {
    this.url = url;
    this.readyState = 0;
    this._host = host;
    this._id = ++socketIds;
    host.sockets.set(this._id, this);
    host.worker.postMessage({ op: "open", id: this._id, url });
  }

  send(text) {
    this._host.worker.postMessage({ op: "send", id: this._id, text });
  }

  close(code, reason) {
    this._host.worker.postMessage({ op: "close", id: this._id, code, reason });
  }

  _event(d) {
    if (d.ev === "messages") {
      for (let i = 0; i < d.data.length; i++) this.onmessage?.({ data: d.data[i] });
    } else if (d.ev === "open") {
      this.readyState = 1;
      this.onopen?.();
    } else if (this.readyState !== 3) {
      this.readyState = 3;
      this._host.sockets.delete(this._id);
      this.onclose?.({ code: d.code, reason: d.reason });
    }
  }
}

/** What a subscribe() call asked for; settles once, then follows its subjects' state. */
export class Subscription extends Emitter {
  constructor(client, subjects, options) {
    super();
    this.client = client;
    this.subjects = subjects;
    this.options = options;
    /** "pending" | "subscribed" | "failed" | "closed" */
    this.state = "pending";
    this.error = null;
    this.ready = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    // A refusal nobody awaits is not an "unhandled rejection"; whoever awaits still sees it.
    this.ready.catch(() => {});
    this._settled = false;
    this._waiting = 0; // requests in flight for this subscription's first answer
    this._failure = null;
  }

  unsubscribe() {
    return this.client._unsubscribe(this);
  }

  _setState(state, error = null) {
    if (state === this.state && error === this.error) return;
    this.state = state;
    this.error = error;
    this._emit("state", state, error);
  }
}

export class BridgeClient extends Emitter {
  /**
   * @param url the bridge's /stream WebSocket URL (relative URLs resolve against the page)
   * @param options {token, getToken, connect, ...DEFAULTS}
   */
  constructor(url, options = {}) {
    super();
    const { token = null, getToken = null, connect = true, WebSocket: WS, socketWorker = false, ...tuning } = options;
    this.url = String(url);
    this.options = { ...DEFAULTS, ...tuning };
    this._WS = WS || globalThis.WebSocket;
    // true: bridge-socket-worker.js beside this module; or that script's URL.
    this._socketWorker = socketWorker === true ? new URL("./bridge-socket-worker.js", import.meta.url).href
      : socketWorker ? String(socketWorker) : null;
    this._token = token;
    this._getToken = getToken;
    this._needToken = false;
    /** "connecting" | "connected" | "disconnected" */
    this.state = "disconnected";
    this.connectionId = null;
    this.nats = null; // the bridge's NATS link: "connected" | "disconnected"
    this.canPublish = false;
    this._ws = null;
    this._welcomed = false;
    this._openedAt = 0;
    this._attempt = 0;
    this._retryTimer = null;
    this._closed = !connect;
    this._offline = false;
    this._generation = 0;
    this._entries = new Map(); // subject -> {subject, state, error, confirmed, holders, options, removals}
    this._subs = new Set(); // live Subscriptions
    this._backend = null; // holds what a backend subscribed for us (POST /clients/{id})
    this._matchCache = new Map();
    this._outbox = [];
    this._byId = new Map(); // JSON of an id -> requests awaiting replies with that id
    this._anon = []; // requests whose replies come without an id, in order
    this._nextId = 1;
    this._tokens = this.options.requestBurst;
    this._tokensAt = 0;
    this._pumpTimer = null;
    this._renewal = null;
    this._changeQueued = false;
    if (typeof globalThis.addEventListener === "function") {
      globalThis.addEventListener("online", () => this._online());
      globalThis.addEventListener("offline", () => this._goneOffline());
    }
    // On the next microtask, so listeners added right after `new` see "connecting".
    if (connect) queueMicrotask(() => this._closed || this._ws || this._retryTimer || this._open());
  }

  // --- Public API ---------------------------------------------------------------------

  /** Connect (again, after close()); a no-op while connected or connecting. */
  connect() {
    this._closed = false;
    if (this._ws || this.state === "connecting") return;
    this._attempt = 0;
    this.reconnect();
  }

  /** Try now instead of waiting for the next attempt. */
  reconnect() {
    if (this._closed || this._ws) return;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._open();
  }

  /** Close the connection and stop reconnecting.  Subscriptions are kept: connect() renews them. */
  close() {
    this._closed = true;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    if (this._ws) this._drop(1000, "closed by the client");
    else this._setState("disconnected", { closed: true });
  }

  /** Subscribe to one subject or several (NATS wildcards allowed).  `options` members go
   * into the request frame as they are (an `id` is used as the request's id). */
  subscribe(subjects, options = {}) {
    const list = typeof subjects === "string" ? [subjects] : validSubjects(subjects && [...subjects]);
    if (!list) throw new TypeError("subscribe() needs a subject or a non-empty array of subjects");
    const { id, ...frameOptions } = options || {};
    const sub = new Subscription(this, [...new Set(list)], frameOptions);
    this._subs.add(sub);
    for (const s of sub.subjects) this._hold(s, sub, frameOptions);
    if (this._welcomed) this._requestSubscribe([sub], false, id);
    this._changed();
    return sub;
  }

  /** Unsubscribe these subjects, whichever subscriptions hold them; resolves with the
   * bridge's replies (one per subject; none while disconnected). */
  unsubscribe(subjects) {
    const list = typeof subjects === "string" ? [subjects] : validSubjects(subjects && [...subjects]);
    if (!list) throw new TypeError("unsubscribe() needs a subject or a non-empty array of subjects");
    const drop = new Set(list);
    for (const sub of [...this._subs]) {
      const keep = sub.subjects.filter((s) => !drop.has(s));
      if (keep.length === sub.subjects.length) continue;
      sub.subjects = keep;
      if (keep.length) continue;
      this._subs.delete(sub);
      if (!sub._settled) {
        sub._settled = true;
        sub._reject(new Error("Unsubscribed before the bridge answered"));
      }
      sub._setState("closed");
    }
    for (const s of drop) {
      const e = this._entries.get(s);
      if (!e) continue;
      e.holders.clear();
      if (!this._welcomed) this._entries.delete(s);
    }
    this._changed();
    // Sent even for subjects this client does not hold: the bridge's answer says so.
    return this._welcomed ? this._requestUnsubscribe([...drop]) : Promise.resolve([]);
  }

  /** Publish.  `data`: a string goes as text, bytes as base64, anything else as JSON;
   * with {json: true}, `data` is JSON text sent verbatim (big numbers keep their digits). */
  publish(subject, data, options = {}) {
    if (!this._welcomed) return Promise.reject(new Error("Not connected to the bridge"));
    const id = this._newId();
    let text;
    if (options.json) {
      const json = String(data).trim();
      try {
        JSON.parse(json);
      } catch (err) {
        return Promise.reject(err);
      }
      text = `{"action":"publish","subject":${JSON.stringify(subject)},"data":${json},"id":"${id}"}`;
    } else {
      const body = { action: "publish", subject, data, id };
      if (data instanceof ArrayBuffer) data = new Uint8Array(data);
      if (data instanceof Uint8Array) {
        body.data = base64(data);
        body.encoding = "base64";
      } else if (options.encoding) {
        body.encoding = options.encoding;
      }
      text = JSON.stringify(body);
    }
    return new Promise((resolve, reject) => {
      this._enqueue({ kind: "publish", text, id, resolve, reject });
    });
  }

  /** Send any request (an object, or text sent as typed) and resolve with all its replies.
   * Subscribe and unsubscribe requests also update the subjects this client holds. */
  send(request) {
    if (!this._welcomed) return Promise.reject(new Error("Not sent: not connected"));
    let body = request;
    let text = typeof request === "string" ? request : null;
    if (text !== null) {
      try {
        body = JSON.parse(text);
      } catch {
        body = undefined; // sent as typed: the bridge's reply says what is wrong
      }
    }
    let expected = 1;
    let perSubject = false;
    let id = null;
    if (isPlainObject(body)) {
      const action = body.action === undefined ? "subscribe" : body.action;
      const subjects = validSubjects(body.subjects);
      if (action === "subscribe" && subjects && subjects.length <= this.options.maxSubjectsPerRequest) {
        const { action: _a, subjects: _s, ...options } = body;
        const sub = this.subscribe(subjects, options);
        return sub.ready.then(
          (reply) => [reply],
          (err) => [err.reply || { success: false, message: err.message, type: "reply" }],
        );
      }
      if (action === "unsubscribe" && subjects) {
        expected = new Set(subjects).size;
        perSubject = true;
      }
      if (!("id" in body)) {
        body = { ...body, id: this._newId() };
        text = null;
      }
      id = echoable(body.id) ? body.id : null;
    }
    if (text === null) text = JSON.stringify(body);
    return new Promise((resolve, reject) => {
      this._enqueue({ kind: "raw", text, id, expected, perSubject, resolve, reject });
    });
  }

  /** Every subject this client holds or wants, with its state
   * ("pending" | "subscribed" | "removing" | "failed") and the bridge's error if it failed. */
  subjects() {
    return [...this._entries.values()].map((e) => ({ subject: e.subject, state: e.state, error: e.error }));
  }

  // --- Connection ---------------------------------------------------------------------

  _setState(state, detail = {}) {
    this.state = state;
    this._emit("state", state, detail);
  }

  async _open() {
    const generation = ++this._generation;
    this._setState("connecting", { attempt: this._attempt });
    if (this._getToken && (this._needToken || this._token == null)) {
      try {
        this._token = await this._getToken();
        this._needToken = false;
      } catch (err) {
        this._emit("error", err);
        if (generation === this._generation && !this._closed) this._retry({ code: 0, reason: String(err) });
        return;
      }
      if (generation !== this._generation || this._closed || this._ws) return;
    }
    let ws;
    try {
      ws = this._socket(this._socketUrl());
    } catch (err) {
      this._emit("error", err);
      this._retry({ code: 0, reason: String(err.message || err) });
      return;
    }
    this._ws = ws;
    this._openedAt = 0;
    ws.onopen = () => {
      if (this._ws === ws) this._openedAt = Date.now();
    };
    ws.onmessage = (event) => {
      if (this._ws === ws) this._onText(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws === ws) this._onClose(event.code, event.reason);
    };
  }

  _socket(url) {
    if (this._socketWorker && typeof Worker === "function") {
      try {
        const host = socketHost(this._socketWorker);
        if (!host.broken) return new WorkerSocket(url, host);
      } catch {
        // No worker here (a policy forbids it, say): the socket on this thread does the same.
      }
    }
    return new this._WS(url);
  }

  _socketUrl() {
    const base = globalThis.location ? globalThis.location.href : undefined;
    const url = new URL(this.url, base);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    // Browsers cannot put headers on a WebSocket: the bridge takes ?token= instead.
    if (this._token) url.searchParams.set("token", this._token);
    return url.href;
  }

  // Forget the socket now (its close event may come much later, or never when offline).
  _drop(code, reason) {
    const ws = this._ws;
    ws.onopen = ws.onmessage = ws.onclose = null;
    try {
      ws.close(1000, reason);
    } catch {
      // already closing
    }
    this._onClose(code, reason);
  }

  _onClose(code, reason) {
    const opened = this._openedAt > 0;
    const lived = opened ? Date.now() - this._openedAt : 0;
    const wasConnected = this._welcomed;
    this._ws = null;
    this._welcomed = false;
    this.connectionId = null;
    this.nats = null;
    clearTimeout(this._pumpTimer);
    this._pumpTimer = null;
    const tooLarge = code === 1009;
    const inflight = [...this._outbox, ...this._anon];
    for (const list of this._byId.values()) inflight.push(...list);
    this._outbox = [];
    this._anon = [];
    this._byId.clear();
    this._renewal = null;
    for (const req of inflight) this._abandon(req, tooLarge);
    for (const e of this._entries.values()) {
      e.removals = 0;
      if (e.state === "removing" && e.holders.size === 0) this._entries.delete(e.subject);
      else if (e.state === "subscribed" || e.state === "removing") e.state = "pending";
    }
    this._changed();
    const detail = { code, reason, wasConnected };
    if (this._closed) {
      this._setState("disconnected", { ...detail, closed: true });
      return;
    }
    // A refused handshake looks like this (the browser hides the 401): try a fresh token.
    if (!opened || code === TOKEN_EXPIRED) this._needToken = true;
    if (lived >= this.options.stableAfter) this._attempt = 0;
    this._retry(detail);
  }

  _retry(detail) {
    const o = this.options;
    const ceiling = this._offline ? o.maxDelay : Math.min(o.maxDelay, o.minDelay * 2 ** this._attempt);
    let delay = Math.random() * ceiling; // full jitter: clients that dropped together spread out
    if (COME_BACK_LATER.has(detail.code)) delay = Math.max(delay, o.laterDelay);
    this._attempt += 1;
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      this._open();
    }, delay);
    this._setState("disconnected", {
      ...detail, offline: this._offline, attempt: this._attempt, retryIn: delay, retryAt: Date.now() + delay,
    });
  }

  _online() {
    this._offline = false;
    if (this._closed || this._ws) return;
    this._attempt = 0;
    this.reconnect();
  }

  _goneOffline() {
    this._offline = true;
    if (this._closed) return;
    if (this._ws) this._drop(1006, "the browser went offline");
    else if (this._retryTimer) this._retry({ code: 1006, reason: "the browser went offline" });
  }

  // --- Frames from the bridge -----------------------------------------------------------

  _onText(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      this._emit("error", new Error("The bridge sent a frame that is not JSON"));
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    switch (frame.type) {
      case undefined:
        if (typeof frame.subject === "string") this._onNatsMessage(frame, text);
        break;
      case "reply":
        this._onReply(frame);
        break;
      case "welcome":
        this._onWelcome(frame);
        break;
      case "status":
        this.nats = frame.nats;
        this._emit("status", frame);
        break;
      case "dropped":
        this._emit("dropped", frame);
        break;
      default:
      // A newer bridge's frame (token refresh, history gaps, ...): ignored until this
      // library knows it.  Handling for new types goes here.
    }
  }

  _onNatsMessage(frame, text) {
    const subject = frame.subject;
    let matches = this._matchCache.get(subject);
    if (matches === undefined) {
      matches = [];
      for (const pattern of this._entries.keys()) if (subjectMatches(pattern, subject)) matches.push(pattern);
      if (this._matchCache.size > 10000) this._matchCache.clear();
      this._matchCache.set(subject, matches);
    }
    const message = new BridgeMessage(frame, text, matches);
    this._emit("message", message);
    for (const sub of this._subs) {
      if (sub._handlers.message && sub.subjects.some((s) => matches.includes(s))) sub._emit("message", message);
    }
  }

  _onWelcome(frame) {
    this.connectionId = frame.connection_id;
    this.nats = frame.nats;
    this.canPublish = frame.publish === true;
    this._welcomed = true;
    this._tokens = this.options.requestBurst;
    this._tokensAt = Date.now();
    this._emit("welcome", frame);
    this._setState("connected", { connectionId: this.connectionId });
    this._renew();
  }

  _onReply(frame) {
    if (frame.source === "http") {
      this._adopt(frame);
      this._emit("reply", frame, false);
      return;
    }
    let key = null;
    let queue = this._anon;
    if (frame.id !== undefined && frame.id !== null) {
      key = JSON.stringify(frame.id);
      queue = this._byId.get(key);
    }
    const req = queue && queue[0];
    if (req && this._apply(req, frame)) {
      queue.shift();
      if (key !== null && queue.length === 0) this._byId.delete(key);
    }
    this._emit("reply", frame, Boolean(req));
  }

  // Returns true when `req` expects no more replies.
  _apply(req, frame) {
    req.replies.push(frame);
    if (req.kind === "subscribe") {
      this._onSubscribeReply(req, frame);
      return true;
    }
    if (req.kind === "publish") {
      if (frame.success === true) req.resolve(frame);
      else req.reject(replyError(frame));
      return true;
    }
    // An unsubscribe gets one reply per distinct subject, unless the whole request was refused.
    const one = frame.action === "unsubscribe" && Array.isArray(frame.subjects) && frame.subjects.length === 1
      ? frame.subjects[0] : null;
    if (req.perSubject && one !== null) {
      // Answered either way, the bridge no longer holds the subject for this connection.
      this._released(one, req.kind === "unsubscribe");
      if (req.replies.length < req.expected) return false;
    }
    req.resolve(req.replies);
    return true;
  }

  // --- Subscriptions --------------------------------------------------------------------

  _hold(subject, sub, options) {
    let e = this._entries.get(subject);
    if (!e) {
      e = { subject, state: "pending", error: null, confirmed: false, holders: new Set(), options, removals: 0 };
      this._entries.set(subject, e);
    } else if (e.state === "removing" || e.state === "failed") {
      e.state = "pending";
      e.error = null;
    }
    e.holders.add(sub);
  }

  // The one place where subscribe frames are built: first subscriptions, renewals, retries.
  _subscribeFrame(subjects, options, id) {
    return JSON.stringify({ ...options, action: "subscribe", subjects, id });
  }

  _optionsKey(options) {
    return JSON.stringify(options);
  }

  // Ask for subscriptions' first answers.  Merged into as few requests as the bridge takes;
  // a merged request that fails is retried one subscription at a time (all or nothing applies
  // per request, so one bad subject must not fail the others).
  _requestSubscribe(subs, merge = true, id = undefined) {
    const max = this.options.maxSubjectsPerRequest;
    const groups = [];
    for (const sub of subs) {
      const key = this._optionsKey(sub.options);
      if (sub.subjects.length > max) {
        // More than one request takes: split, never merged with others.
        for (const part of chunks(sub.subjects, max)) {
          groups.push({ key, split: true, options: sub.options, subjects: part, subs: [sub] });
          sub._waiting += 1;
        }
        continue;
      }
      let group = merge
        ? groups.find((g) => !g.split && g.key === key && g.subjects.length + sub.subjects.length <= max)
        : null;
      if (!group) {
        group = { key, split: false, options: sub.options, subjects: [], subs: [] };
        groups.push(group);
      }
      group.subjects.push(...sub.subjects.filter((s) => !group.subjects.includes(s)));
      group.subs.push(sub);
      sub._waiting += 1;
    }
    for (const g of groups) {
      const reqId = id !== undefined && groups.length === 1 ? id : this._newId();
      this._enqueue({
        kind: "subscribe", subjects: g.subjects, subs: g.subs, renewal: false,
        text: this._subscribeFrame(g.subjects, g.options, reqId), id: echoable(reqId) ? reqId : null,
      });
    }
  }

  // After every (re)connect: renew what the bridge had confirmed (in chunks, paced), then ask
  // again for subscriptions that never got their answer.
  _renew() {
    const groups = new Map();
    for (const e of this._entries.values()) {
      if (!e.confirmed) continue;
      const key = this._optionsKey(e.options);
      if (!groups.has(key)) groups.set(key, { options: e.options, subjects: [] });
      groups.get(key).subjects.push(e.subject);
    }
    const renewal = { left: 0, renewed: [], failed: [] };
    for (const g of groups.values()) {
      for (const part of chunks(g.subjects, this.options.maxSubjectsPerRequest)) {
        const id = this._newId();
        renewal.left += 1;
        this._enqueue({
          kind: "subscribe", subjects: part, subs: [], renewal, text: this._subscribeFrame(part, g.options, id), id,
        });
      }
    }
    this._renewal = renewal.left ? renewal : null;
    const waiting = [...this._subs].filter((sub) => !sub._settled && sub._waiting === 0);
    if (waiting.length) this._requestSubscribe(waiting);
  }

  _onSubscribeReply(req, frame) {
    const ok = frame.success === true;
    for (const s of req.subjects) {
      const e = this._entries.get(s);
      if (!e || e.state === "removing") continue;
      if (ok) {
        e.state = "subscribed";
        e.confirmed = true;
        e.error = null;
      } else if (req.renewal) {
        e.state = "failed";
        e.error = frame.message;
      }
    }
    if (req.renewal) {
      const r = req.renewal;
      if (ok) r.renewed.push(...req.subjects);
      else r.failed.push(...req.subjects.map((subject) => ({ subject, error: frame.message })));
      if (--r.left === 0 && this._renewal === r) {
        this._renewal = null;
        this._emit("resubscribed", { renewed: r.renewed, failed: r.failed });
      }
    } else if (!ok && req.subs.length > 1) {
      for (const sub of req.subs) {
        sub._waiting -= 1;
        if (sub.state !== "closed") this._requestSubscribe([sub], false);
      }
    } else {
      for (const sub of req.subs) this._settle(sub, frame, ok ? null : replyError(frame));
    }
    this._changed();
  }

  _settle(sub, frame, error) {
    sub._waiting -= 1;
    if (error) sub._failure = error;
    if (sub._waiting > 0 || sub._settled) return;
    sub._settled = true;
    if (sub._failure) {
      this._discard(sub, sub._failure);
    } else {
      sub._setState("subscribed");
      sub._resolve(frame);
    }
  }

  // A subscription the bridge refused: gone, with whatever only it wanted.
  _discard(sub, error) {
    sub._settled = true;
    this._subs.delete(sub);
    const orphans = [];
    for (const s of sub.subjects) {
      const e = this._entries.get(s);
      if (!e) continue;
      e.holders.delete(sub);
      if (e.holders.size > 0) continue;
      if (e.confirmed && this._welcomed) orphans.push(s); // part of a split request that did succeed
      else this._entries.delete(s);
    }
    if (orphans.length) this._requestUnsubscribe(orphans);
    sub._setState("failed", error.message);
    sub._reject(error);
    this._changed();
  }

  _unsubscribe(sub) {
    if (sub.state === "closed" || !this._subs.has(sub)) return Promise.resolve([]);
    this._subs.delete(sub);
    if (!sub._settled) {
      sub._settled = true;
      sub._reject(new Error("Unsubscribed before the bridge answered"));
    }
    sub._setState("closed");
    const gone = [];
    for (const s of sub.subjects) {
      const e = this._entries.get(s);
      if (!e) continue;
      e.holders.delete(sub);
      if (e.holders.size > 0) continue;
      // Connected, every subject has been asked for: tell the bridge.  Otherwise the next
      // connection simply never asks for it.
      if (this._welcomed) gone.push(s);
      else this._entries.delete(s);
    }
    this._changed();
    return this._requestUnsubscribe(gone);
  }

  _requestUnsubscribe(subjects) {
    const requests = chunks(subjects, this.options.maxSubjectsPerRequest).map((part) => {
      for (const s of part) {
        const e = this._entries.get(s);
        if (!e) continue;
        e.state = "removing";
        e.removals += 1;
      }
      const id = this._newId();
      return new Promise((resolve) => {
        this._enqueue({
          kind: "unsubscribe", text: JSON.stringify({ action: "unsubscribe", subjects: part, id }), id,
          expected: part.length, perSubject: true, subjects: part, resolve, reject: resolve,
        });
      });
    });
    return Promise.all(requests).then((lists) => lists.flat());
  }

  // The bridge no longer holds `subject` for this connection.  `own`: our unsubscribe.
  _released(subject, own) {
    const e = this._entries.get(subject);
    if (!e) return;
    if (own && e.removals > 0) {
      e.removals -= 1;
      if (e.holders.size > 0) e.confirmed = false; // subscribed again meanwhile: that request follows
      else if (e.removals === 0) this._entries.delete(subject);
    } else {
      // Someone else unsubscribed it (a raw request, a backend): drop it from every holder.
      this._entries.delete(subject);
      for (const sub of e.holders) {
        sub.subjects = sub.subjects.filter((s) => s !== subject);
        if (sub.subjects.length === 0 && this._subs.delete(sub)) sub._setState("closed");
      }
    }
    this._changed();
  }

  // A backend subscribed or unsubscribed this connection (POST /clients/{id}).
  _adopt(frame) {
    const subjects = validSubjects(frame.subjects);
    if (frame.success !== true || !subjects) return;
    if (frame.action === "unsubscribe") {
      for (const s of subjects) this._released(s, false);
    } else if (frame.action === "subscribe") {
      if (!this._backend || !this._subs.has(this._backend)) {
        this._backend = new Subscription(this, [], {});
        this._backend.origin = "http";
        this._backend._settled = true;
        this._backend._setState("subscribed");
        this._subs.add(this._backend);
      }
      for (const s of subjects) {
        if (!this._entries.has(s)) {
          this._backend.subjects.push(s);
          this._hold(s, this._backend, {});
        }
        const e = this._entries.get(s);
        e.state = "subscribed";
        e.confirmed = true;
      }
      this._changed();
    }
  }

  // Whatever was in flight when the connection closed.
  _abandon(req, tooLarge) {
    if (req.kind === "subscribe") {
      for (const sub of req.subs || []) {
        sub._waiting = 0;
        sub._failure = null;
        // The request that was too large would only be cut off again: not renewed.
        if (tooLarge && !sub._settled && this._subs.has(sub)) this._discard(sub, lostError(true));
      }
    } else if (req.kind === "unsubscribe") {
      req.resolve(req.replies || []); // the next connection does not hold it either
    } else {
      req.reject(lostError(tooLarge));
    }
  }

  // Coalesced: listeners hear once per turn however many subjects changed.
  _changed() {
    this._matchCache.clear();
    if (this._changeQueued) return;
    this._changeQueued = true;
    queueMicrotask(() => {
      this._changeQueued = false;
      for (const sub of this._subs) {
        if (!sub._settled) continue;
        let state = "subscribed";
        let error = null;
        for (const s of sub.subjects) {
          const e = this._entries.get(s);
          if (e && e.state === "failed") {
            state = "failed";
            error = e.error;
            break;
          }
          if (e && e.state === "pending") state = "pending";
        }
        sub._setState(state, error);
      }
      this._emit("subjects", this.subjects());
    });
  }

  // --- Sending, paced -------------------------------------------------------------------

  _newId() {
    return `bc-${this._nextId++}`;
  }

  _enqueue(req) {
    req.replies = [];
    this._outbox.push(req);
    this._pump();
  }

  _pump() {
    const o = this.options;
    while (this._outbox.length && this._welcomed) {
      const now = Date.now();
      this._tokens = Math.min(o.requestBurst, this._tokens + ((now - this._tokensAt) * o.requestsPerSecond) / 1000);
      this._tokensAt = now;
      if (this._tokens < 1) {
        if (!this._pumpTimer) {
          const wait = Math.ceil(((1 - this._tokens) * 1000) / o.requestsPerSecond);
          this._pumpTimer = setTimeout(() => {
            this._pumpTimer = null;
            this._pump();
          }, wait);
        }
        return;
      }
      this._tokens -= 1;
      const req = this._outbox.shift();
      if (req.id !== null && req.id !== undefined && echoable(req.id)) {
        const key = JSON.stringify(req.id);
        if (!this._byId.has(key)) this._byId.set(key, []);
        this._byId.get(key).push(req);
      } else {
        this._anon.push(req);
      }
      this._ws.send(req.text);
    }
  }
}
