// A client for the NATS ⇄ WebSocket bridge (docs/protocol.md); no dependencies.  API and
// types: bridge-client.d.ts.  It renews every subscription after a reconnect, and paces its
// requests under the bridge's CONTROL_RATE so that renewing many never trips it.

const DEFAULTS = {
  minDelay: 500, // ms: reconnect ceiling, doubling per attempt...
  maxDelay: 20000, // ...up to this; the wait is a random share of it (full jitter)
  laterDelay: 2000, // ms at least after 1008 (flooding) and 1013 (slow consumer)
  stableAfter: 5000, // ms a connection must live before the backoff starts over
  // The bridge allows CONTROL_RATE (default 20/s, burst 20): keep below, clocks differ.
  requestsPerSecond: 15,
  requestBurst: 15,
  maxSubjectsPerRequest: 50, // the bridge's MAX_SUBJECTS_PER_REQUEST default
};
const LATER = new Set([1008, 1013]);
const TOKEN_EXPIRED = 4001; // the token ran out: a fresh one from getToken, then reconnect
const KICKED = 4003; // a backend closed this connection: no reconnecting until connect()
const LOST = "No reply: the connection closed";
// A request is not idempotent: once sent, the service may have acted, so it is never re-sent.
const UNANSWERED = "No answer: the connection closed before it came; not sent again (the service may have acted)";
const NEEDS_SUBJECTS = "a subject or a non-empty array of subjects is needed";
const EXPIRED = "the token expired and there is no getToken to get another: setToken, then connect()";
// What a bridge answers, before the upgrade, to a handshake it refuses (docs/protocol.md).
const REFUSALS = new Set([401, 403, 429, 503]);

// A listener's error must not break the client or the other listeners: rethrown on its
// own, as the DOM does, so it still shows.
const report = (err) => setTimeout(() => { throw err; });

class Emitter {
  constructor() {
    this._handlers = Object.create(null);
  }

  on(event, fn) {
    // Copied on write, so emitting (per message) iterates without copying.
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

// A member's exact text, without parsing the frame a second time
// `data` is the payload's JSON spliced in verbatim; JSON.parse would round its big numbers.

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
      if ((i = skipString(t, i) - 1) < 0) return -1;
    } else if (c === 123 || c === 91) depth++;
    else if ((c === 125 || c === 93) && --depth === 0) return i + 1;
  }
  return -1;
}

export function memberText(text, name) {
  let i = skipSpace(text, 0);
  if (text[i] !== "{") return undefined;
  const quoted = JSON.stringify(name);
  for (i = skipSpace(text, i + 1); text[i] === '"'; i = skipSpace(text, i + 1)) {
    const keyEnd = skipString(text, i);
    const key = text.slice(i, keyEnd);
    i = skipSpace(text, keyEnd);
    if (keyEnd < 0 || text[i] !== ":") return undefined;
    i = skipSpace(text, i + 1);
    const end = skipValue(text, i);
    if (end < 0) return undefined;
    if (key === quoted || (key.includes("\\") && JSON.parse(key) === name)) return text.slice(i, end);
    if (text[(i = skipSpace(text, end))] !== ",") return undefined;
  }
  return undefined;
}

export class BridgeMessage {
  constructor(frame, text, matches) {
    this.subject = frame.subject;
    this.data = frame.data;
    this.encoding = frame.encoding;
    this.headers = frame.headers;
    this.reply = frame.reply;
    this.seq = frame.seq; // its stream sequence, when a JetStream stream stores it
    // With seq: when JetStream stored it (RFC 3339, UTC, nanoseconds), kept as the text it
    // came as: a history message is shown with when it was published, not when it arrived.
    this.time = typeof frame.time === "string" ? frame.time : undefined;
    this.history = frame.history === true; // sent as history (stored, asked for), not live
    this.matches = matches;
    this.frame = text;
    this.receivedAt = Date.now();
  }

  get dataJson() {
    return (this._json ??= memberText(this.frame, "data") ?? JSON.stringify(this.data) ?? "null");
  }
}

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
// The bridge echoes only these ids; replies to other requests come without one.
const echoable = (id) => typeof id === "boolean" || (typeof id === "string" && id.length <= 256)
  || (Number.isFinite(id) && (!Number.isInteger(id) || Math.abs(id) < 2 ** 53));
const subjectList = (s) => (typeof s === "string" ? [s]
  : Array.isArray(s) && s.length && s.every((x) => typeof x === "string") ? s : null);
const chunks = (list, n) => Array.from({ length: Math.ceil(list.length / n) }, (_, i) => list.slice(i * n, i * n + n));

function replyError(frame) {
  const err = new Error(String(frame.message ?? "The bridge refused the request"));
  err.reply = frame;
  return err;
}

const lostError = (tooLarge) => new Error(tooLarge ? `${LOST} (a request was too large); not sent again` : LOST);

// A NATS request's failure: `code` is the reply's `error` (or "disconnected": no answer came).
function requestError(message, code, reply = undefined) {
  const err = new Error(message);
  err.code = code;
  if (reply) err.reply = reply;
  return err;
}

// A NATS request's answer: the payload as a message carries it, dataJson its exact JSON text.
function answerOf(frame, text) {
  let json;
  return {
    data: frame.data, encoding: frame.encoding, headers: frame.headers, reply: frame,
    get dataJson() {
      return (json ??= memberText(text, "data") ?? JSON.stringify(frame.data) ?? "null");
    },
  };
}

export class Subscription extends Emitter {
  constructor(client, subjects, options) {
    super();
    this.client = client;
    this.subjects = subjects;
    this.options = options;
    this.state = "pending";
    this.error = null;
    this.ready = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.ready.catch(() => {}); // a refusal nobody awaits is not an unhandled rejection
    this._settled = false;
    this._waiting = 0; // requests in flight for its first answer
    this._failure = null;
  }

  unsubscribe() {
    return this.client._unsubscribe(this);
  }

  // Who is on one of its subjects (the first by default), over every bridge process.
  presence(subject = this.subjects[0]) {
    return this.client.presence(subject);
  }

  _setState(state, error = null) {
    if (state === this.state && error === this.error) return;
    this.state = state;
    this.error = error;
    this._emit("state", state, error);
  }

  _settle(error, reply) {
    if (this._settled) return;
    this._settled = true;
    if (error) this._reject(error);
    else this._resolve(reply);
  }
}

export class BridgeClient extends Emitter {
  constructor(url, options = {}) {
    super();
    const { token = null, getToken = null, connect = true, WebSocket: WS, ...tuning } = options;
    Object.assign(this, { url: String(url), options: { ...DEFAULTS, ...tuning }, state: "disconnected",
      connectionId: null, nats: null, canPublish: false, user: null, expiresAt: null });
    this._WS = WS || globalThis.WebSocket; // or WorkerWebSocket (worker-socket.js)
    this._token = token;
    this._getToken = getToken;
    this._closed = !connect;
    this._attempt = this._generation = 0;
    this._nextId = 1;
    this._entries = new Map(); // subject -> {subject, state, error, confirmed, holders, options, removals}
    this._subs = new Set(); // live Subscriptions; _backend holds what a backend subscribed for us
    this._routes = new Map(); // subject -> {matches, subs}: who a message on it reaches, until _changed
    this._outbox = [];
    this._byId = new Map(); // JSON of an id -> requests awaiting replies with it
    this._anon = []; // requests whose replies come without an id, in order
    globalThis.addEventListener?.("online", () => this._online());
    globalThis.addEventListener?.("offline", () => this._goneOffline());
    // On the next microtask: listeners added right after `new` hear "connecting".
    if (connect) queueMicrotask(() => this._closed || this._ws || this._timer || this._open());
  }

  // Public API (bridge-client.d.ts)

  connect() {
    if (this._expired) {
      // Opening again with the token that ran out would only be refused, for ever.
      this._setState("disconnected", { code: TOKEN_EXPIRED, reason: EXPIRED, closed: true, expired: true });
      return;
    }
    this._closed = false;
    if (this._ws || this.state === "connecting") return;
    this._attempt = 0;
    this.reconnect();
  }

  reconnect() {
    if (this._closed || this._ws) return;
    clearTimeout(this._timer);
    this._timer = null;
    this._open();
  }

  close() {
    this._closed = true;
    clearTimeout(this._timer);
    this._timer = null;
    if (this._ws) this._drop(1000, "closed by the client");
    else this._setState("disconnected", { closed: true });
  }

  // The token for the next connections (the open one, if any, keeps its own until it ends).
  setToken(token) {
    this._token = token == null ? null : String(token);
    this._expired = false;
  }

  subscribe(subjects, options = {}) {
    const list = subjectList(subjects);
    if (!list) throw new TypeError(NEEDS_SUBJECTS);
    const { id, ...frameOptions } = options || {};
    const sub = new Subscription(this, [...new Set(list)], frameOptions);
    this._subs.add(sub);
    for (const s of sub.subjects) this._hold(s, sub, frameOptions);
    if (this._welcomed) this._request(sub, id);
    this._changed();
    return sub;
  }

  unsubscribe(subjects) {
    const list = subjectList(subjects);
    if (!list) throw new TypeError(NEEDS_SUBJECTS);
    const drop = new Set(list);
    for (const sub of [...this._subs]) {
      sub.subjects = sub.subjects.filter((s) => !drop.has(s));
      if (!sub.subjects.length) this._close(sub);
    }
    for (const s of drop) {
      this._entries.get(s)?.holders.clear();
      if (!this._welcomed) this._entries.delete(s);
    }
    this._changed();
    // Sent even for subjects not held: the bridge's answer says so.
    return this._welcomed ? this._requestUnsubscribe([...drop]) : Promise.resolve([]);
  }

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
      if (options.encoding) body.encoding = options.encoding; // "base64": data is base64 of bytes
      text = JSON.stringify(body);
    }
    return new Promise((resolve, reject) => this._enqueue({ kind: "publish", text, id, resolve, reject }));
  }

  // Who is on `subject` (exact, within the bridge's PRESENCE_SUBJECTS): the bridge's answer,
  // {presence, count, users}; rejects with the bridge's reason.  Never sent again after a drop.
  presence(subject) {
    if (!this._welcomed) return Promise.reject(new Error("Not connected to the bridge"));
    if (typeof subject !== "string") return Promise.reject(new TypeError("a subject (a string) is needed"));
    const id = this._newId();
    const text = JSON.stringify({ action: "presence", subject, id });
    return new Promise((resolve, reject) => this._enqueue({ kind: "presence", text, id, resolve, reject }));
  }

  // A NATS request: resolves with the service's answer, rejects with an Error whose `code` is
  // the bridge's `error`, or "disconnected" if no answer can come (never sent again).
  request(subject, data = "", options = {}) {
    if (!this._welcomed) return Promise.reject(requestError("Not sent: not connected to the bridge", "disconnected"));
    const id = this._newId();
    const body = { action: "request", subject, id };
    for (const name of ["encoding", "headers", "timeout"]) if (options[name] !== undefined) body[name] = options[name];
    let text;
    try {
      if (options.json) {
        const json = String(data).trim();
        JSON.parse(json); // sent verbatim, so it must be JSON
        text = `${JSON.stringify(body).slice(0, -1)},"data":${json}}`;
      } else {
        text = JSON.stringify({ ...body, data });
      }
    } catch (err) {
      return Promise.reject(requestError(err.message, "invalid"));
    }
    return new Promise((resolve, reject) => this._enqueue({ kind: "request", text, id, resolve, reject }));
  }

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
    let id = null;
    if (isObject(body)) {
      const { action = "subscribe", subjects, ...options } = body;
      const list = Array.isArray(subjects) ? subjectList(subjects) : null;
      if (action === "subscribe" && list && list.length <= this.options.maxSubjectsPerRequest) {
        // Held, and renewed after a reconnect, like any subscription.
        return this.subscribe(list, options).ready.then((r) => [r], (err) => [err.reply || { success: false, message: err.message }]);
      }
      if (action === "unsubscribe" && list) expected = new Set(list).size;
      if (!("id" in body)) {
        body = { ...body, id: this._newId() };
        text = null;
      }
      id = body.id;
    }
    text ??= JSON.stringify(body);
    return new Promise((resolve, reject) => this._enqueue({ kind: "raw", text, id, expected, resolve, reject }));
  }

  subjects() {
    return [...this._entries.values()].map(({ subject, state, error }) => ({ subject, state, error }));
  }

  // Connection

  _setState(state, detail = {}) {
    this.state = state;
    this._emit("state", state, detail);
  }

  async _open() {
    const generation = ++this._generation;
    this._setState("connecting", { attempt: this._attempt });
    try {
      if (this._getToken && (this._needToken || this._token == null)) {
        this._token = await this._getToken();
        this._needToken = false;
        if (generation !== this._generation || this._closed || this._ws) return;
      }
      const url = new URL(this.url, globalThis.location?.href);
      url.protocol = url.protocol.replace(/^http/, "ws");
      // Browsers cannot put headers on a WebSocket: the bridge takes ?token= instead.
      if (this._token) url.searchParams.set("token", this._token);
      this._address = url;
      this._ws = new this._WS(url.href);
    } catch (err) {
      this._emit("error", err);
      if (generation === this._generation && !this._closed) this._retry({ code: 0, reason: String(err.message || err) });
      return;
    }
    const ws = this._ws;
    this._openedAt = 0;
    ws.onopen = () => this._ws === ws && (this._openedAt = Date.now());
    ws.onmessage = (e) => this._ws === ws && this._onText(e.data);
    ws.onclose = (e) => this._ws === ws && this._onClose(e.code, e.reason);
  }

  // Forget the socket now: its close event may come much later (or never, offline).
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
    const lived = this._openedAt ? Date.now() - this._openedAt : -1;
    const wasConnected = this._welcomed;
    this._ws = null;
    this._welcomed = false;
    this.connectionId = this.nats = null;
    clearTimeout(this._pumpTimer);
    this._pumpTimer = this._renewal = null;
    const inflight = [...this._outbox, ...this._anon, ...[...this._byId.values()].flat()];
    this._outbox = [];
    this._anon = [];
    this._byId.clear();
    for (const req of inflight) this._abandon(req, code === 1009);
    for (const e of this._entries.values()) {
      e.removals = 0;
      if (e.state === "removing" && !e.holders.size) this._entries.delete(e.subject);
      else if (e.state !== "failed") e.state = "pending";
    }
    this._changed();
    const detail = { code, reason, wasConnected };
    // Without getToken an expired token stays expired: trying again would only be refused.
    if (code === TOKEN_EXPIRED && !this._getToken) this._expired = true;
    if (code === KICKED || this._expired) this._closed = true;
    if (this._closed) return this._setState("disconnected", { ...detail, closed: true, expired: this._expired });
    // A refused handshake looks like this (the browser hides a 401): ask for a fresh token.
    if (lived < 0 || code === TOKEN_EXPIRED) this._needToken = true;
    if (lived < 0 && !this._offline) this._probe(this._token);
    if (lived >= this.options.stableAfter) this._attempt = 0;
    this._retry(detail);
  }

  // A refused handshake (401 token, 403 origin, 429 or 503 full) looks to a browser exactly
  // like a bridge that is down: the socket fails with 1006, the status hidden.  So the same
  // address is asked once over HTTP, with the same credentials: the bridge refuses a plain
  // GET as it refused the upgrade, and says why.  Reported as "refused" {status, message};
  // status 0: no answer at all (down, restarting, unreachable, or another origin's CORS).
  async _probe(token) {
    if (typeof fetch !== "function" || !this._address) return;
    const address = new URL(this._address);
    address.protocol = address.protocol.replace(/^ws/, "http");
    address.searchParams.delete("token"); // in a header rather than in one more logged URL
    let status = 0;
    let message = "";
    try {
      const response = await fetch(address, {
        headers: token ? { Authorization: `Bearer ${token}` } : {}, cache: "no-store", redirect: "manual",
      });
      status = response.status;
      if (REFUSALS.has(status) && /json/.test(response.headers.get("content-type") || "")) {
        const body = await response.json();
        if (typeof body?.message === "string") message = body.message;
      }
    } catch {
      // no answer, or an answer this page may not read
    }
    if (!this._welcomed && !this._closed) this._emit("refused", { status, message });
  }

  _retry(detail) {
    const o = this.options;
    let delay = Math.random() * (this._offline ? o.maxDelay : Math.min(o.maxDelay, o.minDelay * 2 ** this._attempt));
    if (LATER.has(detail.code)) delay = Math.max(delay, o.laterDelay);
    this._attempt += 1;
    clearTimeout(this._timer);
    this._timer = setTimeout(() => {
      this._timer = null;
      this._open();
    }, delay);
    this._setState("disconnected", {
      ...detail, offline: this._offline, attempt: this._attempt, retryIn: delay, retryAt: Date.now() + delay,
    });
  }

  _online() {
    this._offline = false;
    this._attempt = 0;
    this.reconnect();
  }

  _goneOffline() {
    this._offline = true;
    if (this._closed) return;
    const reason = "the browser went offline";
    if (this._ws) this._drop(1006, reason);
    else if (this._timer) this._retry({ code: 1006, reason });
  }

  // Frames from the bridge

  _onText(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return this._emit("error", new Error("The bridge sent a frame that is not JSON"));
    }
    if (!isObject(frame)) return;
    const type = frame.type;
    if (type === undefined) {
      if (typeof frame.subject === "string") this._onMessage(frame, text);
    } else if (type === "reply") {
      this._onReply(frame, text);
    } else if (type === "welcome") {
      this.connectionId = frame.connection_id;
      this.nats = frame.nats;
      this.canPublish = frame.publish === true;
      this.user = frame.user ?? null;
      this.expiresAt = frame.expires_at ?? null;
      this._welcomed = true;
      this._tokens = this.options.requestBurst;
      this._tokensAt = Date.now();
      this._emit("welcome", frame);
      this._setState("connected", { connectionId: this.connectionId });
      this._renew();
    } else if (type === "status") {
      this.nats = frame.nats;
      this._emit("status", frame);
    } else if (type === "dropped") {
      this._emit("dropped", frame);
    } else if (type === "token_expiring") {
      this._emit("expiring", frame);
      this._refresh();
    } else if (type === "join" || type === "leave") {
      this._onPresence(type, frame);
    }
    // Other types are a newer bridge's: ignored.
  }

  // Before the token runs out: a fresh one from getToken, on this very socket.
  async _refresh() {
    if (!this._getToken) return;
    const generation = this._generation;
    try {
      const token = await this._getToken();
      if (generation !== this._generation || !this._welcomed) return;
      const id = this._newId();
      const reply = await new Promise((resolve, reject) => this._enqueue({
        kind: "refresh", text: JSON.stringify({ action: "refresh", token, id }), id, resolve, reject }));
      this._token = token;
      this.expiresAt = reply.expires_at ?? null;
      this._emit("refreshed", reply);
    } catch (err) {
      this._emit("error", err); // at exp the bridge closes with 4001: a new token, then reconnect
    }
  }

  _onMessage(frame, text) {
    const subject = frame.subject;
    let route = this._routes.get(subject);
    if (!route) {
      const matches = [...this._entries.keys()].filter((p) => subjectMatches(p, subject));
      const subs = [...this._subs].filter((sub) => sub.subjects.some((s) => matches.includes(s)));
      if (this._routes.size > 10000) this._routes.clear();
      this._routes.set(subject, (route = { matches, subs }));
    }
    const matches = route.matches;
    const message = new BridgeMessage(frame, text, matches);
    if (typeof frame.seq === "number") {
      // Where each matching subscription stands in its stream: what a resume starts after.
      for (const p of matches) {
        const e = this._entries.get(p);
        if (e && !(e.seq >= frame.seq)) e.seq = frame.seq;
      }
    }
    this._emit("message", message);
    // _subs is checked again: a listener before it may have closed a subscription.
    for (const sub of route.subs) if (sub._handlers.message && this._subs.has(sub)) sub._emit("message", message);
  }

  // Someone came or went on a subject a subscription watches ({presence: true}).  `order`
  // numbers presence frames as they came; an answer gets the number of the last one before it,
  // so a count taken from it moves with exactly the events after it (a batch of frames is
  // dispatched before an await on presence() resumes).
  _onPresence(type, frame) {
    frame.order = this._presenceOrder = (this._presenceOrder || 0) + 1;
    this._emit(type, frame);
    for (const sub of [...this._subs]) {
      if (sub.options.presence === true && sub.subjects.includes(frame.subject)) sub._emit(type, frame);
    }
  }

  _onReply(frame, text) {
    let key = null;
    let queue = this._anon;
    if (frame.source === "http") queue = null;
    else if (frame.id != null) queue = this._byId.get((key = JSON.stringify(frame.id)));
    const req = queue?.[0];
    if (req && this._apply(req, frame, text)) {
      queue.shift();
      if (key !== null && !queue.length) this._byId.delete(key);
    }
    if (frame.source === "http") this._adopt(frame);
    this._emit("reply", frame, Boolean(req));
  }

  // True when `req` expects no more replies.
  _apply(req, frame, text) {
    req.replies.push(frame);
    if (req.kind === "subscribe") {
      this._onSubscribed(req, frame);
    } else if (req.kind === "request") {
      if (frame.success === true) req.resolve(answerOf(frame, text));
      else req.reject(requestError(String(frame.message ?? "The bridge refused the request"), frame.error ?? "invalid", frame));
    } else if (req.kind === "publish" || req.kind === "refresh" || req.kind === "presence") {
      if (req.kind === "presence") frame.order = this._presenceOrder || 0;
      if (frame.success === true) req.resolve(frame);
      else req.reject(replyError(frame));
    } else {
      // An unsubscribe is answered once per distinct subject, unless refused as a whole.
      const one = frame.action === "unsubscribe" && frame.subjects?.length === 1 ? frame.subjects[0] : null;
      if (one !== null) {
        this._released(one, req.kind === "unsubscribe"); // either way the bridge no longer holds it
        if (req.replies.length < req.expected) return false;
      }
      req.resolve(req.replies);
    }
    return true;
  }

  // Subscriptions

  _hold(subject, sub, options) {
    let e = this._entries.get(subject);
    if (!e) {
      e = { subject, state: "pending", error: null, confirmed: false, holders: new Set(), options, removals: 0 };
      this._entries.set(subject, e);
    } else if (e.state === "removing" || e.state === "failed") {
      e.state = "pending";
      e.error = null;
    }
    // A later holder's watch is renewed after a reconnect too (renewals use the entry's options).
    if (options?.presence === true && e.options.presence !== true) e.options = { ...e.options, presence: true };
    e.holders.add(sub);
  }

  // The one place subscribe frames are built: first requests, renewals, retries.
  _subscribeFrame(subjects, options, id) {
    return JSON.stringify({ ...options, action: "subscribe", subjects, id });
  }

  // A subscription's first request (or requests, past maxSubjectsPerRequest).
  _request(sub, id = undefined) {
    const parts = chunks(sub.subjects, this.options.maxSubjectsPerRequest);
    sub._waiting += parts.length;
    for (const part of parts) {
      const reqId = id !== undefined && parts.length === 1 ? id : this._newId();
      this._enqueue({ kind: "subscribe", subjects: part, subs: [sub], text: this._subscribeFrame(part, sub.options, reqId), id: reqId });
    }
  }

  // After every (re)connect: renew what the bridge had confirmed, in chunks (paced by _pump);
  // then ask again for subscriptions still waiting for their first answer.
  _renew() {
    const groups = new Map();
    const renewal = { left: 0, renewed: [], failed: [] };
    const renew = (subjects, options, resume) => {
      const id = this._newId();
      renewal.left += 1;
      this._enqueue({ kind: "subscribe", subjects, subs: [], renewal, resume, text: this._subscribeFrame(subjects, options, id), id });
    };
    for (const e of this._entries.values()) {
      if (!e.confirmed) continue;
      // History was asked for once; a renewal asks only for what was missed meanwhile.
      const { history, ...options } = e.options;
      if (e.epoch && e.seq !== undefined) {
        renew([e.subject], { ...options, history: { after_seq: e.seq, epoch: e.epoch } }, true);
        continue;
      }
      const key = JSON.stringify(options);
      if (!groups.has(key)) groups.set(key, { options, subjects: [] });
      groups.get(key).subjects.push(e.subject);
    }
    for (const g of groups.values()) {
      for (const part of chunks(g.subjects, this.options.maxSubjectsPerRequest)) renew(part, g.options, false);
    }
    this._renewal = renewal.left ? renewal : null;
    for (const sub of this._subs) if (!sub._settled && !sub._waiting) this._request(sub);
  }

  _onSubscribed(req, frame) {
    const ok = frame.success === true;
    for (const s of req.subjects) {
      const e = this._entries.get(s);
      if (!e || e.state === "removing") continue;
      if (ok) Object.assign(e, { state: "subscribed", confirmed: true, error: null });
      else if (req.renewal) Object.assign(e, { state: "failed", error: frame.message });
      const info = ok && frame.streams?.[s];
      if (!info) continue;
      const resumed = req.resume && info.recovered !== undefined;
      if (resumed && !info.recovered) {
        // Messages were lost for good: say so, then carry on from where the stream is now.
        const gap = { subject: s, afterSeq: e.seq, epoch: info.epoch, firstSeq: info.first_seq, stream: info.stream };
        this._emit("gap", gap);
        for (const sub of e.holders) sub._emit("gap", gap);
        e.seq = undefined;
      } else if (resumed) {
        this._emit("recovered", { subject: s, afterSeq: e.seq, count: info.history ?? 0 });
      }
      if (e.epoch !== info.epoch) e.seq = undefined;
      Object.assign(e, { stream: info.stream, epoch: info.epoch });
      // With history to come, the messages themselves move the position (a drop half-way
      // then resumes where they stopped); without, it is where the bridge says.
      if (!(info.history > 0) && !(e.seq >= info.last_seq)) e.seq = info.last_seq;
    }
    const r = req.renewal;
    if (r) {
      if (ok) r.renewed.push(...req.subjects);
      else r.failed.push(...req.subjects.map((subject) => ({ subject, error: frame.message })));
      if (--r.left === 0 && this._renewal === r) {
        this._renewal = null;
        this._emit("resubscribed", { renewed: r.renewed, failed: r.failed });
      }
    } else {
      for (const sub of req.subs) {
        sub._waiting -= 1;
        if (!ok) sub._failure = replyError(frame);
        if (sub._waiting || sub._settled) continue;
        if (sub._failure) this._discard(sub, sub._failure);
        else {
          sub._setState("subscribed");
          sub._settle(null, frame);
        }
      }
    }
    this._changed();
  }

  // A subscription the bridge refused: gone, with whatever only it wanted.
  _discard(sub, error) {
    this._subs.delete(sub);
    const orphans = [];
    for (const s of sub.subjects) {
      const e = this._entries.get(s);
      if (!e || (e.holders.delete(sub) && e.holders.size)) continue;
      if (e.confirmed && this._welcomed) orphans.push(s); // a part of it that did succeed
      else this._entries.delete(s);
    }
    if (orphans.length) this._requestUnsubscribe(orphans);
    sub._setState("failed", error.message);
    sub._settle(error);
    this._changed();
  }

  _close(sub) {
    this._subs.delete(sub);
    sub._settle(new Error("Unsubscribed before the bridge answered"));
    sub._setState("closed");
  }

  _unsubscribe(sub) {
    if (!this._subs.has(sub)) return Promise.resolve([]);
    this._close(sub);
    const gone = [];
    for (const s of sub.subjects) {
      const e = this._entries.get(s);
      if (!e || (e.holders.delete(sub) && e.holders.size)) continue;
      // Connected, every subject has been asked for: tell the bridge.  Otherwise the next
      // connection just never asks for it.
      if (this._welcomed) gone.push(s);
      else this._entries.delete(s);
    }
    this._changed();
    return this._requestUnsubscribe(gone);
  }

  _requestUnsubscribe(subjects) {
    return Promise.all(chunks(subjects, this.options.maxSubjectsPerRequest).map((part) => {
      for (const s of part) {
        const e = this._entries.get(s);
        if (e) {
          e.state = "removing";
          e.removals += 1;
        }
      }
      const id = this._newId();
      return new Promise((resolve) => this._enqueue({
        kind: "unsubscribe", text: JSON.stringify({ action: "unsubscribe", subjects: part, id }), id,
        expected: part.length, resolve, reject: resolve,
      }));
    })).then((lists) => lists.flat());
  }

  // The bridge no longer holds `subject` for this connection; `own`: our unsubscribe did it.
  _released(subject, own) {
    const e = this._entries.get(subject);
    if (!e) return;
    if (own && e.removals > 0) {
      e.removals -= 1;
      if (e.holders.size) e.confirmed = false; // subscribed again meanwhile: that request follows
      else if (!e.removals) this._entries.delete(subject);
    } else {
      // A raw request or a backend unsubscribed it: gone from every holder.
      this._entries.delete(subject);
      for (const sub of e.holders) {
        sub.subjects = sub.subjects.filter((s) => s !== subject);
        if (!sub.subjects.length && this._subs.has(sub)) this._close(sub);
      }
    }
    this._changed();
  }

  // A backend subscribed or unsubscribed this connection (POST /clients/{id}).
  _adopt(frame) {
    const subjects = subjectList(frame.subjects);
    if (frame.success !== true || !subjects) return;
    if (frame.action === "unsubscribe") {
      for (const s of subjects) this._released(s, false);
    } else if (frame.action === "subscribe") {
      if (!this._subs.has(this._backend)) {
        this._backend = new Subscription(this, [], {});
        this._backend._settle(null, frame);
        this._backend._setState("subscribed");
        this._subs.add(this._backend);
      }
      for (const s of subjects) {
        if (!this._entries.has(s)) {
          this._backend.subjects.push(s);
          this._hold(s, this._backend, {});
        }
        Object.assign(this._entries.get(s), { state: "subscribed", confirmed: true });
      }
      this._changed();
    }
  }

  // In flight when the connection closed.
  _abandon(req, tooLarge) {
    if (req.kind === "request") return req.reject(requestError(UNANSWERED, "disconnected"));
    if (req.kind !== "subscribe") return req.kind === "unsubscribe" ? req.resolve(req.replies) : req.reject(lostError(tooLarge));
    for (const sub of req.subs) {
      sub._waiting = 0;
      sub._failure = null;
      // The request that was too large would only be cut off again: not renewed.
      if (tooLarge && !sub._settled && this._subs.has(sub)) this._discard(sub, lostError(true));
    }
  }

  // Coalesced: listeners hear once per turn however many subjects changed.
  _changed() {
    this._routes.clear(); // every change to subjects or subscriptions comes through here
    if (this._changeQueued) return;
    this._changeQueued = true;
    queueMicrotask(() => {
      this._changeQueued = false;
      for (const sub of this._subs) {
        if (!sub._settled) continue;
        const states = sub.subjects.map((s) => this._entries.get(s) || {});
        const failed = states.find((e) => e.state === "failed");
        sub._setState(failed ? "failed" : states.some((e) => e.state === "pending") ? "pending" : "subscribed", failed ? failed.error : null);
      }
      this._emit("subjects", this.subjects());
    });
  }

  // Sending, paced

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
        this._pumpTimer ??= setTimeout(() => {
          this._pumpTimer = null;
          this._pump();
        }, Math.ceil(((1 - this._tokens) * 1000) / o.requestsPerSecond));
        return;
      }
      this._tokens -= 1;
      const req = this._outbox.shift();
      if (echoable(req.id)) {
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
