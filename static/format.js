// JSON laid out for reading, exactly as the payload wrote it: tokens are copied verbatim
// (numbers keep their digits and spelling, strings their escapes, objects their key order
// and duplicate keys), only the whitespace between them changes.  A value that fits in
// `width` columns stays on one line.  Used by the page for small values and, off the main
// thread, by format-worker.js for large ones.

const NUMBER = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
const MAX_DEPTH = 40; // deeper than this is written on one line: indentation would dwarf the data

// Index just past the JSON string that starts at i, or -1.
function skipString(t, i) {
  for (let j = i + 1; ; ) {
    const q = t.indexOf('"', j);
    if (q < 0) return -1;
    let b = q - 1;
    while (t.charCodeAt(b) === 92) b--;
    if ((q - 1 - b) % 2 === 0) return q + 1;
    j = q + 1;
  }
}

// Nodes: {k: "str"|"num"|"lit", s, len} | {k: "arr", items, len} | {k: "obj", keys, vals, len}
// where len is the node's length written on one line ("[1, 2]", "{"a": 1}").
function parse(t) {
  let i = 0;
  const space = () => {
    for (let c = t.charCodeAt(i); c === 32 || c === 10 || c === 13 || c === 9; c = t.charCodeAt(++i));
  };
  const value = (depth) => {
    if (depth > 5000) throw new SyntaxError("too deep");
    space();
    const c = t.charCodeAt(i);
    if (c === 34) {
      const start = i;
      i = skipString(t, i);
      if (i < 0) throw new SyntaxError("unterminated string");
      const s = t.slice(start, i);
      return { k: "str", s, len: s.length };
    }
    if (c === 123 || c === 91) {
      const isObj = c === 123;
      i++;
      space();
      const close = isObj ? 125 : 93;
      const node = isObj ? { k: "obj", keys: [], vals: [], len: 2 } : { k: "arr", items: [], len: 2 };
      if (t.charCodeAt(i) === close) {
        i++;
        return node;
      }
      for (;;) {
        if (isObj) {
          space();
          if (t.charCodeAt(i) !== 34) throw new SyntaxError(`expected a key at ${i}`);
          const start = i;
          i = skipString(t, i);
          if (i < 0) throw new SyntaxError("unterminated key");
          const key = t.slice(start, i);
          space();
          if (t.charCodeAt(i++) !== 58) throw new SyntaxError(`expected : at ${i - 1}`);
          const v = value(depth + 1);
          node.keys.push(key);
          node.vals.push(v);
          node.len += key.length + 2 + v.len;
        } else {
          const v = value(depth + 1);
          node.items.push(v);
          node.len += v.len;
        }
        space();
        const next = t.charCodeAt(i++);
        if (next === close) return node;
        if (next !== 44) throw new SyntaxError(`expected , at ${i - 1}`);
        node.len += 2;
      }
    }
    if (t.startsWith("true", i) || t.startsWith("null", i)) {
      i += 4;
      return { k: "lit", s: t.slice(i - 4, i), len: 4 };
    }
    if (t.startsWith("false", i)) {
      i += 5;
      return { k: "lit", s: "false", len: 5 };
    }
    NUMBER.lastIndex = i;
    if (!NUMBER.test(t)) throw new SyntaxError(`unexpected character at ${i}`);
    const s = t.slice(i, NUMBER.lastIndex);
    i = NUMBER.lastIndex;
    return { k: "num", s, len: s.length };
  };
  const root = value(0);
  space();
  if (i !== t.length) throw new SyntaxError(`unexpected text at ${i}`);
  return root;
}

const CLASS = { str: "j-str", num: "j-num", lit: "j-lit" };

/**
 * Lay out JSON text.  Returns {text, lines, parts, classes}: `parts` concatenated are
 * `text`; `classes[i]` is the highlight class of parts[i] (null for punctuation and
 * whitespace), or `classes` is null when `highlight` is false.
 */
export function layoutJson(json, { width = 72, highlight = true } = {}) {
  const root = parse(json);
  const parts = [];
  const classes = highlight ? [] : null;
  let lines = 1;
  const put = highlight
    ? (s, cls) => {
        parts.push(s);
        classes.push(cls);
      }
    : (s) => {
        parts.push(s);
      };

  const inline = (node) => {
    if (node.k === "arr") {
      put("[", null);
      for (let n = 0; n < node.items.length; n++) {
        if (n) put(", ", null);
        inline(node.items[n]);
      }
      put("]", null);
    } else if (node.k === "obj") {
      put("{", null);
      for (let n = 0; n < node.keys.length; n++) {
        if (n) put(", ", null);
        put(node.keys[n], "j-key");
        put(": ", null);
        inline(node.vals[n]);
      }
      put("}", null);
    } else {
      put(node.s, CLASS[node.k]);
    }
  };

  const block = (node, indent, column, depth) => {
    if (node.len <= width - column || (node.k !== "arr" && node.k !== "obj") || depth >= MAX_DEPTH) {
      inline(node);
      return;
    }
    const inner = indent + "  ";
    const isObj = node.k === "obj";
    const count = isObj ? node.keys.length : node.items.length;
    put(isObj ? "{\n" : "[\n", null);
    lines += 1;
    for (let n = 0; n < count; n++) {
      put(inner, null);
      if (isObj) {
        put(node.keys[n], "j-key");
        put(": ", null);
        block(node.vals[n], inner, inner.length + node.keys[n].length + 2, depth + 1);
      } else {
        block(node.items[n], inner, inner.length, depth + 1);
      }
      put(n + 1 < count ? ",\n" : "\n", null);
      lines += 1;
    }
    put(indent + (isObj ? "}" : "]"), null);
  };

  block(root, "", 0, 0);
  return { text: parts.join(""), lines, parts, classes };
}

/** The first `max` characters of the value written on one line, for a folded summary. */
export function preview(text, max = 140) {
  const head = text.length > max * 4 ? text.slice(0, max * 4) : text;
  // Whitespace outside strings would be enough, but a summary may show a string's own
  // whitespace squeezed too: it is a preview, the value itself is shown exactly.
  const one = head.replace(/\s+/g, " ").trim();
  return one.length > max || head.length < text.length ? one.slice(0, max - 1) + "…" : one;
}

/** Lines in a text, as a <pre> shows them. */
export function countLines(text) {
  let n = 1;
  for (let i = text.indexOf("\n"); i >= 0; i = text.indexOf("\n", i + 1)) n++;
  return n;
}

// --- Why a text is not JSON, in words a person can act on ---------------------------------

const SCALAR = /true|false|null|-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
const WORD = /[A-Za-z_$][\w$.*>-]*/y;

function closerOf(open) {
  return open === "{" ? "}" : "]";
}

/** null when `text` is a JSON object; otherwise what is wrong with it, in plain words. */
export function requestProblem(text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    return `Not sent: this is not valid JSON. ${jsonProblem(text)}`;
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    const what = Array.isArray(value) ? "a list" : value === null ? "null" : `a ${typeof value}`;
    return `Not sent: a request is a JSON object in { }, like {"subjects":["test.subject"],"action":"subscribe"}; this is ${what}.`;
  }
  return null;
}

function jsonProblem(t) {
  const stack = [];
  let i = 0;
  let want = "value"; // value | key | colon | next | end
  const at = (n) => `(character ${n + 1})`;
  const after = () => (stack.length ? "next" : "end");
  for (;;) {
    while (i < t.length && " \t\n\r".includes(t[i])) i++;
    if (i >= t.length) {
      const closers = stack.map(closerOf).reverse().join(" ");
      if (want === "colon") return "It ends after a name: a \":\" and a value should follow.";
      if (closers) return `It ends too early: it still needs ${closers} at the end.`;
      return "It is empty or ends too early.";
    }
    const c = t[i];
    if (c === "'") return `Use double quotes (") around names and text, not single quotes ${at(i)}.`;
    if (want === "value") {
      if (c === '"') {
        const end = skipString(t, i);
        if (end < 0) return `A text in double quotes is never closed ${at(i)}: a " is missing.`;
        i = end;
        want = after();
      } else if (c === "{" || c === "[") {
        stack.push(c);
        i++;
        want = c === "{" ? "key" : "value";
        if (c === "[") {
          while (i < t.length && " \t\n\r".includes(t[i])) i++;
          if (t[i] === "]") {
            stack.pop();
            i++;
            want = after();
          }
        }
      } else if (c === "]" || c === "}") {
        return `A value is missing before ${c} ${at(i)}${t.slice(0, i).trimEnd().endsWith(",") ? ": remove the comma before it" : ""}.`;
      } else {
        SCALAR.lastIndex = i;
        if (SCALAR.test(t)) {
          i = SCALAR.lastIndex;
          want = after();
        } else {
          WORD.lastIndex = i;
          const word = WORD.test(t) ? t.slice(i, WORD.lastIndex) : "";
          if (word) return `Text needs double quotes: write "${word}" ${at(i)}.`;
          return `Unexpected ${JSON.stringify(c)} ${at(i)}: a value should be there (text in double quotes, a number, true, false, null, [ ] or { }).`;
        }
      }
    } else if (want === "key") {
      if (c === '"') {
        const end = skipString(t, i);
        if (end < 0) return `A name in double quotes is never closed ${at(i)}: a " is missing.`;
        i = end;
        want = "colon";
      } else if (c === "}") {
        if (t.slice(0, i).trimEnd().endsWith(",")) return `Remove the comma before } ${at(i)}.`;
        stack.pop();
        i++;
        want = after();
      } else {
        WORD.lastIndex = i;
        const word = WORD.test(t) ? t.slice(i, WORD.lastIndex) : "";
        if (word) return `Names need double quotes: write "${word}" ${at(i)}.`;
        return `Unexpected ${JSON.stringify(c)} ${at(i)}: a name in double quotes should be there.`;
      }
    } else if (want === "colon") {
      if (c !== ":") return `A ":" is missing after the name ${at(i)}.`;
      i++;
      want = "value";
    } else if (want === "next") {
      const top = stack[stack.length - 1];
      if (c === ",") {
        i++;
        want = top === "{" ? "key" : "value";
      } else if (c === closerOf(top)) {
        stack.pop();
        i++;
        want = after();
      } else if (c === "}" || c === "]") {
        return `Unexpected ${c} ${at(i)}: the ${top === "{" ? "object" : "list"} opened before needs ${closerOf(top)} first.`;
      } else {
        return `A comma is missing ${at(i)}.`;
      }
    } else {
      return `There is more after the end of the request ${at(i)}: send one JSON object.`;
    }
  }
}
