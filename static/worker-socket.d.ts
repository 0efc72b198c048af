// Types for worker-socket.js.

/** The part of WebSocket that bridge-client.js uses, with the socket in a worker
 * (bridge-socket-worker.js, next to worker-socket.js).  Where workers are not available it
 * is a plain WebSocket.  Usage: new BridgeClient(url, {WebSocket: WorkerWebSocket}). */
export declare class WorkerWebSocket {
  constructor(url: string);
  readonly url: string;
  onopen: ((event?: unknown) => void) | null;
  onmessage: ((event: { data: string }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  send(text: string): void;
  close(code?: number, reason?: string): void;
}
