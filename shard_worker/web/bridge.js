// WebSocket bridge between this page and its worker process.
// Text frames carry JSON control messages; binary frames carry tensors:
//   [u32 LE header length][JSON header][pad to 8][tensor bytes, each padded to 8]
// with header.tensors = [{name, dtype, shape, offset, length}], offsets relative to the data start.
import * as runner from './runner.js';
import * as kvcache from './kvcache.js';

const statusEl = document.getElementById('status');
const params = new URLSearchParams(location.hash.slice(1));
const align8 = (n) => (n + 7) & ~7;

function setStatus(text) { statusEl.textContent = text; }

function decodeFrame(buffer) {
  const headerLength = new DataView(buffer).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, headerLength)));
  const base = align8(4 + headerLength);
  const tensors = {};
  for (const t of header.tensors || []) {
    tensors[t.name] = { dtype: t.dtype, shape: t.shape, buffer, offset: base + t.offset, length: t.length };
  }
  return { header, tensors };
}

function encodeFrame(header, outputs) {
  const entries = [];
  let offset = 0;
  for (const [name, t] of Object.entries(outputs)) {
    const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    entries.push({ name, dtype: t.dtype, shape: t.shape, offset, length: bytes.byteLength, bytes });
    offset = align8(offset + bytes.byteLength);
  }
  header.tensors = entries.map(({ bytes, ...meta }) => meta);
  const headerBytes = new TextEncoder().encode(JSON.stringify(header));
  const base = align8(4 + headerBytes.byteLength);
  const frame = new Uint8Array(base + offset);
  new DataView(frame.buffer).setUint32(0, headerBytes.byteLength, true);
  frame.set(headerBytes, 4);
  for (const e of entries) frame.set(e.bytes, base + e.offset);
  return frame.buffer;
}

function errorText(e) { return e && e.message ? e.message : String(e); }

// onnxruntime tensors (on the CPU) as encodeFrame takes them.
function wire(tensors) {
  const out = {};
  for (const [name, t] of Object.entries(tensors)) out[name] = { dtype: t.type, shape: Array.from(t.dims), data: t.data };
  return out;
}

async function main() {
  const port = params.get('ws');
  const token = params.get('token');
  const threads = Number(params.get('threads') || '0');
  const ws = new WebSocket(`ws://127.0.0.1:${port}/bridge?token=${encodeURIComponent(token)}`);
  ws.binaryType = 'arraybuffer';
  const send = (obj) => ws.send(JSON.stringify(obj));

  ws.onopen = async () => {
    setStatus('detecting');
    try {
      const caps = await runner.detect(threads);
      let choice;
      try { choice = runner.choose(params.get('platform') || 'auto'); } catch (e) { choice = { error: errorText(e) }; }
      send({ op: 'hello', caps, choice });
      setStatus('ready');
    } catch (e) {
      send({ op: 'fatal', message: errorText(e) });
    }
  };
  ws.onclose = () => setStatus('bridge closed');

  ws.onmessage = async (event) => {
    if (typeof event.data === 'string') {
      const msg = JSON.parse(event.data);
      try {
        let result = null;
        if (msg.op === 'load') result = await runner.load(msg.key, msg.url, msg.platform, msg.external, msg.providers, msg.dtype);
        else if (msg.op === 'release') result = await runner.release(msg.key);
        else if (msg.op === 'end_session') result = kvcache.end(msg.session);
        else if (msg.op === 'sessions') result = kvcache.count();
        else if (msg.op === 'throw' && runner.faultInjection) throw new Error(`injected page error: ${msg.message}`);
        else if (msg.op === 'throw') throw new Error('fault injection is disabled in this page (op throw refused)');
        else throw new Error(`unknown op ${msg.op}`);
        send({ op: 'ok', id: msg.id, result });
      } catch (e) {
        send({ op: 'error', id: msg.id, message: errorText(e) });
      }
      return;
    }
    const recvMs = runner.nowMs();
    const { header, tensors } = decodeFrame(event.data);
    if (header.op === 'echo') { ws.send(event.data); return; } // the floor a page round trip is compared with
    const steps = header.steps || [{ key: header.key, carry: null, fail: header.fail }];
    try {
      const r = header.session ? await kvcache.runSteps(steps, tensors, header.session) : await runner.runSteps(steps, tensors);
      const head = { op: 'result', id: header.id, recv_ms: recvMs, steps: r.steps, sent_ms: runner.nowMs() };
      ws.send(encodeFrame(head, wire(r.outputs)));
    } catch (e) {
      if (!(e instanceof runner.StepError) || e.step === 0) {
        send({ op: 'error', id: header.id, message: errorText(e), step: 0 });
        return;
      }
      // a later step failed: hand back the tensors it was given, so that stage can be tried again
      const head = { op: 'error', id: header.id, message: e.message, step: e.step, steps: e.done, recv_ms: recvMs };
      ws.send(encodeFrame(head, wire(e.inputs)));
    }
  };
}

main().catch((e) => setStatus(`failed: ${errorText(e)}`));
