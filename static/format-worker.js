// Lays out large JSON values off the page's main thread (a 1 MB value takes ~100 ms).
import { countLines, layoutJson } from "./format.js";

self.onmessage = (event) => {
  const { id, json } = event.data;
  try {
    const { text, lines } = layoutJson(json, { highlight: false });
    self.postMessage({ id, text, lines });
  } catch {
    // Not laid out: shown exactly as it came.
    self.postMessage({ id, text: json, lines: countLines(json) });
  }
};
