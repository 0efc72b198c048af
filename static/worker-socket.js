// WorkerWebSocket: what bridge-client.js needs of a WebSocket, with the socket itself in a
// worker (bridge-socket-worker.js).  Pass it as the client's WebSocket option.
//
// Why: under a burst Chromium hands a page its socket's backlog in one task, thousands of
// message events: 50 ms and more of a blocked main thread however little each handler does.
// In a worker that happens off the main thread, and the page gets the messages in batches
// small enough to handle in a few milliseconds.

const SCRIPT = new URL("./bridge-socket-worker.js", import.meta.url).href;
let host = null; // {worker, sockets, broken}: one worker for all sockets
let ids = 0;

function start() {
  const worker = new Worker(SCRIPT);
  const h = { worker, sockets: new Map(), broken: false };
  worker.onmessage = (event) => h.sockets.get(event.data.id)?._event(event.data);
  // The script did not load or failed: its sockets are lost; later ones open on this thread.
  worker.onerror = () => {
    h.broken = true;
    for (const socket of h.sockets.values()) socket._event({ ev: "close", code: 1006, reason: "" });
  };
  return h;
}

export class WorkerWebSocket {
  constructor(url) {
    try {
      host ??= start();
    } catch {
      host = { broken: true }; // no workers here (a policy forbids them, say)
    }
    // A class may return another object: a plain WebSocket does the same job, on this thread.
    if (host.broken) return new WebSocket(url);
    this.url = url;
    this._id = ++ids;
    host.sockets.set(this._id, this);
    this._post({ op: "open", url });
  }

  _post(message) {
    host.worker.postMessage({ ...message, id: this._id });
  }

  send(text) {
    this._post({ op: "send", text });
  }

  close(code, reason) {
    this._post({ op: "close", code, reason });
  }

  _event(d) {
    if (d.ev === "messages") for (const data of d.data) this.onmessage?.({ data });
    else if (d.ev === "open") this.onopen?.();
    else if (host.sockets.delete(this._id)) this.onclose?.(d);
  }
}
