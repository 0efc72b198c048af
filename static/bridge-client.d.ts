// Types for bridge-client.js: a client for the NATS ⇄ WebSocket bridge (docs/protocol.md).

/** A reply frame from the bridge. */
export interface Reply {
  success: boolean;
  message: string;
  type: "reply";
  id?: string | number | boolean;
  action?: "subscribe" | "unsubscribe" | "publish" | "request" | "refresh" | "presence";
  subjects?: string[];
  /** On a failed request: why, in a word. */
  error?: RequestErrorCode;
  /** "http" when a backend made the request through POST /clients/{connection_id}. */
  source?: "http";
  [member: string]: unknown;
}

/** One client on a subject: one connection's subscription to it. */
export interface PresenceEntry {
  /** The token's sub, or null without JWT. */
  user: string | null;
  /** An opaque id of this entry alone (never a connection id). */
  client: string;
  /** When it joined (Unix seconds). */
  since: number;
  /** The token's `info` claim, as it is. */
  info?: Record<string, unknown>;
}

/** The answer to presence(): who is on `subject`, over every bridge process. */
export interface PresenceReply extends Reply {
  action: "presence";
  subject: string;
  /** Oldest first, at most PRESENCE_MAX of them. */
  presence: PresenceEntry[];
  /** Every entry, exact, also when `presence` is cut. */
  count: number;
  /** Distinct non-null users among them. */
  users: number;
  /** Not on the wire: the `order` of the last join or leave this client received before this
   * answer.  Events with a greater `order` came after it: the count moves with those only. */
  order: number;
}

/** Someone came on (`join`) or left (`leave`) a watched subject. */
export interface PresenceEvent {
  type: "join" | "leave";
  subject: string;
  user: string | null;
  client: string;
  /** On a join. */
  since?: number;
  /** On a join whose token has an `info` claim. */
  info?: Record<string, unknown>;
  /** Not on the wire: this client numbers join and leave frames as they come (see
   * PresenceReply.order). */
  order: number;
}

/** An Error whose message is the bridge's reply message. */
export interface ReplyError extends Error {
  reply?: Reply;
}

/** Why a request failed: the bridge's `error`, or "disconnected" when the socket dropped (or was
 * not open) before the answer: then the request is never sent again (it is not idempotent). */
export type RequestErrorCode =
  | "no_responders" | "timeout" | "not_allowed" | "too_many_requests" | "invalid" | "disconnected";

/** The Error a request rejects with. */
export interface RequestError extends Error {
  code: RequestErrorCode;
  /** The bridge's reply, unless no reply came ("disconnected"). */
  reply?: Reply;
}

export interface RequestOptions {
  /** Seconds to wait for the answer (the bridge's REQUEST_TIMEOUT when absent, and at most). */
  timeout?: number;
  /** NATS headers: name -> value, or values (one header line each).  Not Nats-*, Status or
   * Description (refused: "invalid"). */
  headers?: Record<string, string | string[]>;
  /** "base64": `data` is base64 of bytes; "text": `data` is a string of text. */
  encoding?: "text" | "base64";
  /** `data` is JSON text, sent verbatim (big numbers exact). */
  json?: boolean;
}

/** A service's answer to a request, carried as a message carries a payload. */
export interface RequestAnswer {
  /** JSON.parse's value for a JSON answer; the text ("text"), or base64 ("base64"). */
  data: unknown;
  /** The answer's JSON text exactly as the service sent it (digits, spelling, key order). */
  readonly dataJson: string;
  encoding?: "text" | "base64";
  /** The answer's NATS headers, if it had any. */
  headers?: Record<string, string>;
  /** The reply frame as received. */
  reply: Reply;
}

export type ConnectionState = "connecting" | "connected" | "disconnected";

export interface StateDetail {
  /** The WebSocket close code of the connection that ended (1001 shutdown, 1008 flooding,
   * 1009 frame too large, 1013 slow consumer, 1006 lost or refused, 4001 token expired,
   * 4003 closed by a backend: no reconnecting then until connect()). */
  code?: number;
  reason?: string;
  /** The connection that ended had been welcomed by the bridge. */
  wasConnected?: boolean;
  /** No reconnecting until connect(): close() was called, a backend closed the connection
   * (4003), or the token expired (4001) and there is no getToken to get another. */
  closed?: boolean;
  /** The token expired (4001) and there is no getToken: connect() does not open a socket
   * with it again (it only repeats this state) until setToken() gives another. */
  expired?: boolean;
  /** The browser says it is offline. */
  offline?: boolean;
  attempt?: number;
  /** Milliseconds until the next attempt, and when (Date.now() clock). */
  retryIn?: number;
  retryAt?: number;
  connectionId?: string;
}

export interface WelcomeFrame {
  success: true;
  data: "Successfully connected";
  type: "welcome";
  connection_id: string;
  protocol: number;
  nats: "connected" | "disconnected";
  publish: boolean;
  /** With JWT on: the token's sub, and its exp (Unix seconds). */
  user?: string;
  expires_at?: number;
}

export interface StatusFrame {
  success: boolean;
  type: "status";
  nats: "connected" | "disconnected";
  message: string;
}

export interface DroppedFrame {
  success: false;
  type: "dropped";
  dropped: number;
  message: string;
}

export interface BridgeClientOptions {
  /** Sent as ?token= (browsers cannot set headers on a WebSocket). */
  token?: string | null;
  /** Supplies a fresh token when one is needed: before the first connection if there is no
   * token, before the current one expires (the bridge's token_expiring: the new one is sent
   * on the open socket as a refresh), and after a refused handshake or a 4001 close (then
   * the client reconnects with it). */
  getToken?: () => Promise<string> | string;
  /** Connect at once (default true); with false, call connect(). */
  connect?: boolean;
  /** A WebSocket implementation (default: the global one).  WorkerWebSocket from
   * worker-socket.js keeps the socket in a worker, so that bursts never block the page. */
  WebSocket?: new (url: string) => Pick<WebSocket, "send" | "close" | "onopen" | "onmessage" | "onclose">;
  /** First reconnect delay ceiling in ms (default 500); doubles per attempt... */
  minDelay?: number;
  /** ...up to this (default 20000).  The delay is a random share of the ceiling (full jitter). */
  maxDelay?: number;
  /** At least this long (ms, default 2000) after close codes 1008 and 1013. */
  laterDelay?: number;
  /** A connection that lived this long (ms, default 5000) starts the backoff over. */
  stableAfter?: number;
  /** Requests per second, and burst, this client sends at most (default 15 and 15: under the
   * bridge's default CONTROL_RATE of 20). */
  requestsPerSecond?: number;
  requestBurst?: number;
  /** Subjects per subscribe request (default 50: the bridge's MAX_SUBJECTS_PER_REQUEST). */
  maxSubjectsPerRequest?: number;
}

/** One NATS message. */
export interface BridgeMessage {
  subject: string;
  /** JSON.parse's value for a JSON payload; the text ("text"), or base64 ("base64"). */
  data: unknown;
  /** "text": UTF-8 that is not JSON; "base64": raw bytes; undefined: the payload is JSON. */
  encoding?: "text" | "base64";
  headers?: Record<string, string>;
  reply?: string;
  /** Its stream sequence, when a JetStream stream stores the subject (live messages too). */
  seq?: number;
  /** With `seq`: when JetStream stored it, i.e. when it was published (RFC 3339, UTC, to the
   * nanosecond, e.g. "2026-11-21T18:43:50.101348127Z"), as the bridge sent it. */
  time?: string;
  /** Sent as history the subscribe asked for (stored), rather than live. */
  history: boolean;
  /** This client's subscriptions (subjects or patterns) that match `subject`, on arrival. */
  matches: string[];
  /** The frame as received. */
  frame: string;
  /** Date.now() on arrival. */
  receivedAt: number;
  /** The payload's JSON text exactly as published (digits, spelling, key order). */
  readonly dataJson: string;
}

export type SubscriptionState = "pending" | "subscribed" | "failed" | "closed";

export declare class Subscription {
  readonly client: BridgeClient;
  /** Its subjects, each once. */
  subjects: string[];
  /** Members added to its subscribe request frames. */
  readonly options: Record<string, unknown>;
  state: SubscriptionState;
  error: string | null;
  /** The bridge's reply once subscribed; rejects with a ReplyError if it refused. */
  ready: Promise<Reply>;
  on(event: "message", fn: (message: BridgeMessage) => void): () => void;
  on(event: "state", fn: (state: SubscriptionState, error: string | null) => void): () => void;
  /** A reconnect could not recover every stored message missed (see BridgeClient "gap"). */
  on(event: "gap", fn: (gap: Gap) => void): () => void;
  /** With {presence: true}: someone came on or left one of its subjects, on any bridge process
   * (this connection's own join too, after the subscribe's reply, and again after a reconnect). */
  on(event: "join" | "leave", fn: (event: PresenceEvent) => void): () => void;
  off(event: string, fn: (...args: any[]) => void): void;
  /** Resolves with the bridge's replies (one per subject no other subscription holds). */
  unsubscribe(): Promise<Reply[]>;
  /** Who is on one of its subjects (default: the first); see BridgeClient.presence. */
  presence(subject?: string): Promise<PresenceReply>;
}

/** After a reconnect, stored messages of `subject` after `afterSeq` could not all be sent
 * (the stream dropped them, was recreated, or there were more than MAX_HISTORY): they are
 * lost to this client.  Live messages flow again; `firstSeq` is the oldest still stored. */
export interface Gap {
  subject: string;
  afterSeq?: number;
  stream: string;
  epoch: string;
  firstSeq?: number;
}

export interface SubjectState {
  subject: string;
  state: "pending" | "subscribed" | "removing" | "failed";
  error: string | null;
}

export declare class BridgeClient {
  constructor(url: string | URL, options?: BridgeClientOptions);
  readonly url: string;
  state: ConnectionState;
  /** From the welcome frame; null while not connected. */
  connectionId: string | null;
  /** The bridge's link to NATS. */
  nats: "connected" | "disconnected" | null;
  /** Whether this bridge lets clients publish (PUBLISH_ALLOW). */
  canPublish: boolean;
  /** With JWT on: who the token says this is, and when it expires (Unix seconds). */
  user: string | null;
  expiresAt: number | null;

  /** A subject or several; NATS wildcards allowed.  Members of `options` go into the request
   * frame as they are (`id` becomes the request's id; `history`, e.g. {last: 10}, asks for
   * stored messages first; `presence: true` brings "join" and "leave" events for exact subjects
   * within the bridge's PRESENCE_SUBJECTS, and is refused elsewhere).  Subscribing to something already held resolves.  After a
   * reconnect, every subscription of a stored subject resumes after the last sequence it
   * saw, so no stored message is lost across a drop (or a "gap" says which were). */
  subscribe(subjects: string | readonly string[], options?: Record<string, unknown>): Subscription;
  /** Drop these subjects from every subscription holding them; resolves with the replies. */
  unsubscribe(subjects: string | readonly string[]): Promise<Reply[]>;
  /** A string goes as text, bytes as base64, other values as JSON; with {json: true} `data` is
   * JSON text sent verbatim.  Resolves with the reply; rejects with a ReplyError. */
  publish(subject: string, data: unknown, options?: { json?: boolean; encoding?: "text" | "base64" }): Promise<Reply>;
  /** Call a NATS service on `subject` (where PUBLISH_ALLOW lets this client publish): `data` as
   * for publish (default "": an empty payload).  Resolves with the answer; rejects with a
   * RequestError whose `code` says why.  Answers come as they arrive, whatever the order sent. */
  request(subject: string, data?: unknown, options?: RequestOptions): Promise<RequestAnswer>;
  /** Who is on `subject` (exact, within PRESENCE_SUBJECTS, one this client may subscribe to;
   * no subscription needed), over every bridge process.  Rejects with a ReplyError (where
   * presence is not kept, not allowed) or when the connection drops first (never re-sent). */
  presence(subject: string): Promise<PresenceReply>;
  /** Any request, as an object or as text sent as typed; resolves with all its replies. */
  send(request: object | string): Promise<Reply[]>;
  /** Every subject held or wanted, with its state. */
  subjects(): SubjectState[];
  /** Connect again after close(). */
  connect(): void;
  /** Try now rather than at the next scheduled attempt. */
  reconnect(): void;
  /** Close and stop reconnecting; subscriptions are kept for connect(). */
  close(): void;
  /** The token for the next connections, e.g. after an expiry (4001) without getToken. */
  setToken(token: string | null): void;

  on(event: "message", fn: (message: BridgeMessage) => void): () => void;
  on(event: "state", fn: (state: ConnectionState, detail: StateDetail) => void): () => void;
  on(event: "welcome", fn: (frame: WelcomeFrame) => void): () => void;
  on(event: "status", fn: (frame: StatusFrame) => void): () => void;
  on(event: "dropped", fn: (frame: DroppedFrame) => void): () => void;
  /** Someone came on or left a subject any subscription watches ({presence: true}). */
  on(event: "join" | "leave", fn: (event: PresenceEvent) => void): () => void;
  /** Every reply; `matched` is false for replies to no request of this client. */
  on(event: "reply", fn: (frame: Reply, matched: boolean) => void): () => void;
  on(event: "subjects", fn: (subjects: SubjectState[]) => void): () => void;
  /** After a reconnect, once every renewal request is answered. */
  on(event: "resubscribed", fn: (result: { renewed: string[]; failed: { subject: string; error: string }[] }) => void): () => void;
  /** The bridge warned that the token expires soon (getToken is then asked for a new one). */
  on(event: "expiring", fn: (frame: { type: "token_expiring"; expires_at: number; message: string }) => void): () => void;
  /** A token from getToken was accepted on the open socket; the reply has the new expires_at. */
  on(event: "refreshed", fn: (reply: Reply) => void): () => void;
  /** A reconnect resumed a stored subject with nothing missing; `count` stored messages follow. */
  on(event: "recovered", fn: (result: { subject: string; afterSeq?: number; count: number }) => void): () => void;
  on(event: "gap", fn: (gap: Gap) => void): () => void;
  /** A handshake failed: what the bridge answers the same address over HTTP, with the same
   * token.  401 (a token is needed, or this one is not accepted), 403 (this origin may not
   * connect), 429 or 503 (full), with the bridge's `message`; another status: it answers and
   * did not refuse; 0: no answer at all (down, restarting or unreachable). */
  on(event: "refused", fn: (result: { status: number; message: string }) => void): () => void;
  on(event: "error", fn: (error: Error) => void): () => void;
  off(event: string, fn: (...args: any[]) => void): void;
}

/** NATS wildcard matching (`*` one token, `>` the rest). */
export declare function subjectMatches(pattern: string, subject: string): boolean;

/** The verbatim text of one member of a JSON object's text. */
export declare function memberText(text: string, name: string): string | undefined;
