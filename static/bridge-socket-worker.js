// The bridge's WebSocket off the page's main thread (see worker-socket.js).  Messages go to
// the page in batches: one post per turn of this worker's event loop, at most MAX_BATCH
// messages or MAX_CHARS characters, so that the page handles each batch in a few
// milliseconds whatever arrives.
const MAX_BATCH = 250;
const MAX_CHARS = 512 * 1024;
const sockets = new Map();

self.onmessage = ({ data }) => {
  if (data.op === "open") open(data.id, data.url);
  else if (data.op === "send") sockets.get(data.id)?.ws.send(data.text);
  else if (data.op === "close") sockets.get(data.id)?.ws.close(data.code, data.reason);
};

function open(id, url) {
  let ws;
  try {
    ws = new WebSocket(url);
  } catch {
    self.postMessage({ id, ev: "close", code: 1006, reason: "" });
    return;
  }
  const s = { ws, batch: [], chars: 0, timer: 0 };
  sockets.set(id, s);
  const flush = () => {
    clearTimeout(s.timer);
    s.timer = 0;
    if (s.batch.length === 0) return;
    self.postMessage({ id, ev: "messages", data: s.batch });
    s.batch = [];
    s.chars = 0;
  };
  ws.onopen = () => self.postMessage({ id, ev: "open" });
  ws.onmessage = (event) => {
    s.batch.push(event.data);
    s.chars += event.data.length || 0;
    if (s.batch.length >= MAX_BATCH || s.chars >= MAX_CHARS) flush();
    else if (!s.timer) s.timer = setTimeout(flush, 0);
  };
  ws.onclose = (event) => {
    flush();
    sockets.delete(id);
    self.postMessage({ id, ev: "close", code: event.code, reason: event.reason });
  };
}
