// Generation sessions: each session's KV cache kept in this page between steps, as onnxruntime-web
// tensors (on WebGPU they stay on the GPU), fed back at the next step and freed at the session's end,
// after `ttl_ms` unused, or never taken when the page already holds `limit` sessions.
//
// A step is {key, carry, fail, states: [{input_name, output_name, dtype, empty_shape}]}: its state inputs
// come from what the session holds for that key (empty tensors when the step is `fresh`), its state
// outputs replace them and are never sent back; only `carry` travels on.
//
// With `mirror` the page also returns, for each state, the positions this step added (a CPU copy, named
// MIRROR + step position + '+' + input name): the worker keeps them, and after a lost page it sends the
// whole cache back with `restore` (same names), so the new page goes on from there without a replay.
import * as runner from './runner.js';

const held = new Map();   // session id -> {usedMs, ttlMs, caches: Map(step key -> {input name -> ort tensor})}

// Errors the worker tells apart by their prefix (shard_worker/sessions.py).
export const LIMIT = 'session-limit:';
export const MISSING = 'session-missing:';
export const MIRROR = 'state+';

const EMPTY = {
  float32: Float32Array, float16: Uint16Array, float64: Float64Array, int64: BigInt64Array, int32: Int32Array,
};

function emptyTensor(slot) {
  const Ctor = EMPTY[slot.dtype];
  if (!Ctor) throw new Error(`unsupported state dtype ${slot.dtype}`);
  return new runner.ort.Tensor(slot.dtype, new Ctor(0), slot.empty_shape);
}

function dispose(cache) {
  for (const tensor of Object.values(cache)) if (tensor.dispose) tensor.dispose();
}

export function end(id) {
  const session = held.get(id);
  held.delete(id);
  if (session) for (const cache of session.caches.values()) dispose(cache);
  return session !== undefined;
}

// Frees the sessions unused for longer than their TTL; returns how many.
export function sweep(now = runner.nowMs()) {
  let freed = 0;
  for (const [id, session] of [...held]) {
    if (now - session.usedMs > session.ttlMs) freed += end(id) ? 1 : 0;
  }
  return freed;
}

export function count() { return held.size; }

// The session a step runs in: a fresh one replaces what the page held for it, within the page's limit.
function sessionFor(info) {
  sweep();
  if (info.fresh || info.restore) {
    end(info.id);
    if (held.size >= info.limit) {
      throw new Error(`${LIMIT} this page holds ${held.size} session(s), its limit; session ${info.id} refused`);
    }
    held.set(info.id, { usedMs: runner.nowMs(), ttlMs: info.ttl_ms, caches: new Map() });
  }
  const session = held.get(info.id);
  if (!session) throw new Error(`${MISSING} session ${info.id} is not held by this page (ended, expired or lost)`);
  session.usedMs = runner.nowMs();
  return session;
}

function stateFeeds(step, cache) {
  const feeds = {};
  for (const slot of step.states) {
    const tensor = cache ? cache[slot.input_name] : emptyTensor(slot);
    if (!tensor) throw new Error(`${MISSING} step ${step.key} holds no ${slot.input_name}`);
    feeds[slot.input_name] = tensor;
  }
  return feeds;
}

// The positions a step added to state `present` (past: `pastLength` of them), as a CPU tensor.
async function newSlice(slot, present, pastLength) {
  const axis = slot.empty_shape.indexOf(0);
  const dims = Array.from(present.dims);
  const data = present.location && present.location !== 'cpu' ? await present.getData() : present.data;
  const n = dims[axis] - pastLength;
  const inner = dims.slice(axis + 1).reduce((a, b) => a * b, 1);
  const outer = dims.slice(0, axis).reduce((a, b) => a * b, 1);
  const out = new data.constructor(outer * n * inner);
  for (let o = 0; o < outer; o++) {
    const src = (o * dims[axis] + pastLength) * inner;
    out.set(data.subarray(src, src + n * inner), o * n * inner);
  }
  dims[axis] = n;
  return new runner.ort.Tensor(present.type, out, dims);
}

// What a restoring step sends back for each step's states (MIRROR names), taken out of `env`.
function restored(steps, env) {
  const caches = new Map();
  steps.forEach((step, i) => {
    const cache = {};
    for (const slot of step.states) {
      const name = `${MIRROR}${i}+${slot.input_name}`;
      if (!(name in env)) throw new Error(`${MISSING} restoring step ${step.key}: no ${slot.input_name} sent`);
      cache[slot.input_name] = env[name];
      delete env[name];
    }
    caches.set(step.key, cache);
  });
  return caches;
}

function keptStates(step, outputs) {
  const cache = {};
  for (const slot of step.states) {
    if (!(slot.output_name in outputs)) throw new Error(`shard ${step.key} did not produce ${slot.output_name}`);
    cache[slot.input_name] = outputs[slot.output_name];
    delete outputs[slot.output_name];
  }
  return cache;
}

// Runs the steps of one session step (see runner.runSteps) with each step's cache fed and kept here.
export async function runSteps(steps, wire, info) {
  const session = sessionFor(info);
  let env = {};
  for (const [name, t] of Object.entries(wire)) env[name] = runner.toOrt(t);
  if (info.restore) session.caches = restored(steps, env);
  const done = [];
  const mirror = {};
  for (let i = 0; i < steps.length; i++) {
    const step = steps[i];
    try {
      const names = step.states.map((s) => s.output_name);
      await runner.keepOnDevice(step.key, names);
      const before = info.fresh ? null : session.caches.get(step.key) || null;
      const feeds = stateFeeds(step, before);
      const { outputs, marks } = await runner.runStep(step, { ...env, ...feeds }, new Set(names));
      const after = keptStates(step, outputs);
      if (info.mirror) {
        for (const slot of step.states) {
          const axis = slot.empty_shape.indexOf(0);
          const past = before && before[slot.input_name] ? before[slot.input_name].dims[axis] : 0;
          mirror[`${MIRROR}${i}+${slot.input_name}`] = await newSlice(slot, after[slot.input_name], past);
        }
      }
      if (before) dispose(before);
      session.caches.set(step.key, after);
      env = step.carry ? runner.carried({ ...env, ...outputs }, step.carry, step.key) : outputs;
      done.push(marks);
    } catch (e) {
      throw new runner.StepError(i, e && e.message ? e.message : String(e), env, done);
    }
  }
  return { outputs: { ...env, ...mirror }, steps: done };
}

setInterval(() => sweep(), 5000);
