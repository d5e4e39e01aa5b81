// Runs shards with onnxruntime-web: detects what the browser really offers, picks an execution
// provider, loads shard sessions and runs them, timing the kernel.
import * as ort from '/ort/ort.all.min.mjs';

export { ort };

ort.env.wasm.wasmPaths = '/ort/';
ort.env.wasm.proxy = false;
ort.env.logLevel = 'error';

// Fault injection (tests only): on when the worker was started with --allow-fault-injection, which puts
// faults=1 in this page's URL. Otherwise an injected fault is refused and the kernel runs as asked.
export const faultInjection = new URLSearchParams(location.hash.slice(1)).get('faults') === '1';

const SOFTWARE_ADAPTER = /swiftshader|llvmpipe|lavapipe|softpipe|software|microsoft basic render/i;

const DTYPE_ARRAYS = {
  float32: Float32Array, float16: Uint16Array, float64: Float64Array, int64: BigInt64Array,
  int32: Int32Array, int16: Int16Array, int8: Int8Array, uint8: Uint8Array, bool: Uint8Array,
};

let capabilities = null;
let webgpuAdapter = null;
const sessions = new Map();   // key -> {session, provider, adapter}

// The page's memory budget: the most WebAssembly memory the runtime it loaded can grow to (its 32-bit
// build: 65536 pages of 64 KiB, 4 GiB, or less where the browser refuses to declare that much), lowered
// by the browser's own limit where it exposes one (navigator.deviceMemory, Chromium only). The worker
// registers budget_bytes, capped by its --page-budget-bytes (shard_worker/memory.py).
const WASM_PAGE_BYTES = 65536;
function probeMemory() {
  const memory = { wasm_max_bytes: 0, device_memory_bytes: null, js_heap_limit_bytes: null, budget_bytes: 0 };
  for (const pages of [65536, 49152, 32768, 16384, 8192]) {
    try {
      new WebAssembly.Memory({ initial: 1, maximum: pages });  // declaring a maximum reserves nothing
      memory.wasm_max_bytes = pages * WASM_PAGE_BYTES;
      break;
    } catch (e) { /* too large here: try a smaller maximum */ }
  }
  if (typeof navigator.deviceMemory === 'number') memory.device_memory_bytes = navigator.deviceMemory * 2 ** 30;
  if (performance.memory && performance.memory.jsHeapSizeLimit) {
    memory.js_heap_limit_bytes = performance.memory.jsHeapSizeLimit;
  }
  const limits = [memory.wasm_max_bytes, memory.device_memory_bytes].filter((x) => x);
  memory.budget_bytes = limits.length ? Math.min(...limits) : 0;
  return memory;
}

function describeAdapter(info, fallback) {
  const parts = [info.vendor, info.architecture, info.device, info.description].filter((x) => x);
  if (parts.length) return parts.join(' / ');
  return fallback ? 'unnamed fallback adapter (software)' : 'unnamed adapter';
}

export async function detect(threads) {
  if (capabilities) return capabilities;
  const caps = {
    userAgent: navigator.userAgent,
    hardwareConcurrency: navigator.hardwareConcurrency || 1,
    crossOriginIsolated: self.crossOriginIsolated === true,
    webnn: { available: false, error: null },
    webgpu: { available: false, error: null, adapter: null, software: false, fallback: false },
    wasm: { available: typeof WebAssembly === 'object', threads: 1 },
    memory: probeMemory(),
  };
  if (!('ml' in navigator)) {
    caps.webnn.error = 'navigator.ml is missing';
  } else {
    try {
      await navigator.ml.createContext({ deviceType: 'gpu' });
      caps.webnn.available = true;
    } catch (e) {
      caps.webnn.error = `navigator.ml.createContext failed: ${e && e.message ? e.message : e}`;
    }
  }
  if (!('gpu' in navigator)) {
    caps.webgpu.error = 'navigator.gpu is missing';
  } else {
    try {
      const adapter = await navigator.gpu.requestAdapter();
      if (!adapter) {
        caps.webgpu.error = 'navigator.gpu.requestAdapter() returned null';
      } else {
        const info = adapter.info || (adapter.requestAdapterInfo ? await adapter.requestAdapterInfo() : {});
        const fallback = Boolean(adapter.isFallbackAdapter || info.isFallbackAdapter);
        const desc = describeAdapter(info, fallback);
        webgpuAdapter = adapter;
        caps.webgpu.available = true;
        caps.webgpu.adapter = desc;
        caps.webgpu.fallback = fallback;
        caps.webgpu.software = caps.webgpu.fallback || SOFTWARE_ADAPTER.test(desc);
      }
    } catch (e) {
      caps.webgpu.error = `requestAdapter failed: ${e && e.message ? e.message : e}`;
    }
  }
  const wanted = threads > 0 ? threads : Math.min(4, caps.hardwareConcurrency);
  caps.wasm.threads = caps.crossOriginIsolated ? Math.max(1, wanted) : 1;
  ort.env.wasm.numThreads = caps.wasm.threads;
  capabilities = caps;
  return caps;
}

// Which provider to use for `platform` ('auto' | 'wasm' | 'webgpu' | 'webnn'), and why. `allowed` lists the
// providers that run the shard's precision (empty: any; coordinator/planning/precision.py): auto picks the
// best of those, a forced platform outside them is refused (the coordinator refuses it first).
export function choose(platform, allowed = [], dtype = '') {
  const c = capabilities;
  const ok = (p) => !allowed.length || allowed.includes(p);
  const what = dtype ? `dtype ${dtype}` : 'this shard';
  const wasmAdapter = `wasm (${c.wasm.threads} thread${c.wasm.threads > 1 ? 's' : ''}, simd)`;
  if (platform !== 'auto' && !['wasm', 'webgpu', 'webnn'].includes(platform)) throw new Error(`unknown platform ${platform}`);
  if (platform !== 'auto' && !ok(platform)) throw new Error(`${what} cannot run on ${platform} (it runs on ${allowed.join(', ')})`);
  if (platform === 'webnn') {
    if (!c.webnn.available) throw new Error(`platform webnn forced but unavailable: ${c.webnn.error}`);
    return { provider: 'webnn', adapter: 'webnn gpu context', note: '' };
  }
  if (platform === 'webgpu') {
    if (!c.webgpu.available) throw new Error(`platform webgpu forced but unavailable: ${c.webgpu.error}`);
    return { provider: 'webgpu', adapter: c.webgpu.adapter, note: '' };
  }
  if (platform === 'wasm') return { provider: 'wasm', adapter: wasmAdapter, note: '' };
  if (ok('webnn') && c.webnn.available) return { provider: 'webnn', adapter: 'webnn gpu context', note: '' };
  if (ok('webgpu') && c.webgpu.available && (!c.webgpu.software || !ok('wasm'))) {
    const note = c.webgpu.software ? `${what} runs on webgpu only: on the software adapter "${c.webgpu.adapter}"` : '';
    return { provider: 'webgpu', adapter: c.webgpu.adapter, note };
  }
  if (!ok('wasm')) {
    throw new Error(`${what} runs on ${allowed.join(', ')} only, and this page has no webgpu (${c.webgpu.error})`);
  }
  const why = !ok('webgpu') ? `${what} does not run on webgpu`
    : c.webgpu.available
      ? `webgpu adapter "${c.webgpu.adapter}" is a software rasterizer, slower than wasm; webnn: ${c.webnn.error}`
      : `no webgpu (${c.webgpu.error}); no webnn (${c.webnn.error})`;
  return { provider: 'wasm', adapter: wasmAdapter, note: `fell back to wasm: ${why}` };
}

// onnxruntime's verbose log of a session's creation ends with where each node went: "Node(s) placed on
// [CPUExecutionProvider]. Number of nodes: N" and one "  OpType (name)" line per node. On a GPU provider,
// the nodes it left to the CPU: shape computations by design, and any op the provider has no kernel for.
function placement(lines) {
  const out = { nodes: 0, cpuNodes: 0, cpuOps: {} };
  let onCpu = false;
  for (const line of lines) {
    const all = line.match(/All nodes placed on \[(\w+)\]\. Number of nodes: (\d+)/);
    const some = line.match(/Node\(s\) placed on \[(\w+)\]\. Number of nodes: (\d+)/);
    if (all || some) {
      const [, ep, n] = all || some;
      out.nodes += Number(n);
      onCpu = ep === 'CPUExecutionProvider';
      if (onCpu) out.cpuNodes += Number(n);
      continue;
    }
    const node = onCpu && line.match(/VerifyEachNodeIsAssignedToAnEp\]\s+(\w+) \(/);
    if (node) out.cpuOps[node[1]] = (out.cpuOps[node[1]] || 0) + 1;
  }
  return out;
}

// `create(bytes, options)` with onnxruntime's verbose log captured (it writes to console.error), for
// `placement`; the page's console is itself again afterwards.
async function createLogged(bytes, options) {
  const lines = [];
  const original = console.error;
  console.error = (...args) => { lines.push(args.map(String).join(' ')); };
  try {
    const session = await ort.InferenceSession.create(bytes, { ...options, logSeverityLevel: 0, logVerbosityLevel: 0 });
    return { session, lines };
  } finally {
    console.error = original;
  }
}

function providerOptions(provider) {
  if (provider === 'webnn') return [{ name: 'webnn', deviceType: 'gpu' }];
  if (provider === 'webgpu') return ['webgpu'];
  return ['wasm'];
}

// `external`: the shard's external data files ([{path, url}], broker/shardfiles.py), for a shard past 2 GB;
// onnxruntime-web fetches them itself into the session.
export async function load(key, url, platform, external = [], providers = [], dtype = '') {
  const pick = choose(platform, providers || [], dtype || '');
  if (pick.provider === 'webgpu' && webgpuAdapter) ort.env.webgpu.adapter = webgpuAdapter;
  const t0 = performance.now();
  const response = await fetch(url);
  if (!response.ok) throw new Error(`fetch ${url}: HTTP ${response.status}`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  const options = { executionProviders: providerOptions(pick.provider), graphOptimizationLevel: 'all' };
  if (external && external.length) options.externalData = external.map((e) => ({ path: e.path, data: e.url }));
  let session;
  let placed = { nodes: 0, cpuNodes: 0, cpuOps: {} };
  if (pick.provider === 'wasm') {
    session = await ort.InferenceSession.create(bytes, options);
  } else {  // say which nodes fall off the GPU provider onto the CPU: never a silent fallback
    const created = await createLogged(bytes, options);
    session = created.session;
    placed = placement(created.lines);
  }
  sessions.set(key, { session, provider: pick.provider, adapter: pick.adapter, url, onDevice: [] });
  const cpuOps = Object.entries(placed.cpuOps).sort((a, b) => b[1] - a[1]).map(([op, n]) => `${op} x${n}`).join(', ');
  return {
    provider: pick.provider, adapter: pick.adapter, note: pick.note,
    load_ms: performance.now() - t0,
    inputs: session.inputNames, outputs: session.outputNames,
    nodes: placed.nodes, cpu_nodes: placed.cpuNodes, cpu_ops: cpuOps,
  };
}

export async function release(key) {
  const entry = sessions.get(key);
  sessions.delete(key);
  if (entry) await entry.session.release();
}

// On WebGPU, recreate `key`'s session so that the outputs `names` stay on the GPU (a KV cache fed back
// at the next step never crosses to the CPU). A no-op on other providers and once done.
export async function keepOnDevice(key, names) {
  const entry = sessions.get(key);
  if (!entry || entry.provider !== 'webgpu' || names.every((n) => entry.onDevice.includes(n))) return;
  const response = await fetch(entry.url);
  if (!response.ok) throw new Error(`fetch ${entry.url}: HTTP ${response.status}`);
  const onDevice = [...new Set([...entry.onDevice, ...names])];
  const session = await ort.InferenceSession.create(new Uint8Array(await response.arrayBuffer()), {
    executionProviders: providerOptions('webgpu'),
    graphOptimizationLevel: 'all',
    preferredOutputLocation: Object.fromEntries(onDevice.map((n) => [n, 'gpu-buffer'])),
  });
  await entry.session.release();
  sessions.set(key, { ...entry, session, onDevice });
}

export function toOrt(t) {
  const Ctor = DTYPE_ARRAYS[t.dtype];
  if (!Ctor) throw new Error(`unsupported dtype ${t.dtype}`);
  return new ort.Tensor(t.dtype, new Ctor(t.buffer, t.offset, t.length / Ctor.BYTES_PER_ELEMENT), t.shape);
}

// Wall-clock instants in epoch ms on the page's clock (the worker compares them with its own).
export const nowMs = () => performance.timeOrigin + performance.now();

// A step of runSteps failed: which one, why, the tensors it was given (so that stage can be tried again
// elsewhere) and what the steps before it measured.
export class StepError extends Error {
  constructor(step, message, inputs, done) {
    super(message);
    this.step = step;
    this.inputs = inputs;
    this.done = done;
  }
}

function errorText(e) { return e && e.message ? e.message : String(e); }

async function onCpu(tensor) {
  if (tensor.location === 'cpu' || !tensor.location) return tensor;
  return new ort.Tensor(tensor.type, await tensor.getData(true), tensor.dims);
}

export function carried(env, names, key) {
  const missing = names.filter((n) => !(n in env));
  if (missing.length) throw new Error(`shard ${key} did not produce ${missing.join(', ')}`);
  return Object.fromEntries(names.map((n) => [n, env[n]]));
}

// One loaded session on what the steps before it carried. `fail` (an injected fault) makes it throw
// instead, only with fault injection on; a refused one is reported back as `fault_refused`.
export async function runStep(step, env, keep = null) {
  const entry = sessions.get(step.key);
  if (!entry) throw new Error(`shard ${step.key} is not loaded in this page`);
  if (step.fail && faultInjection) throw new Error(`injected kernel error: ${step.fail}`);
  const faultRefused = step.fail ? `fault injection is disabled in this page; ignored: ${step.fail}` : '';
  if (faultRefused) console.error(faultRefused);
  const feeds = {};
  for (const name of entry.session.inputNames) {
    if (!(name in env)) throw new Error(`shard ${step.key} lacks input ${name}`);
    feeds[name] = env[name];
  }
  const fedMs = nowMs();
  const out = await entry.session.run(feeds);
  const ranMs = nowMs();
  const outputs = {};
  for (const [name, tensor] of Object.entries(out)) outputs[name] = keep && keep.has(name) ? tensor : await onCpu(tensor);
  const marks = {
    kernel_ms: ranMs - fedMs, fed_ms: fedMs, ran_ms: ranMs, read_ms: nowMs(),
    provider: entry.provider, adapter: entry.adapter, fault_refused: faultRefused,
  };
  return { outputs, marks };
}

// Runs loaded sessions one after another, inside this page: consecutive stages of one worker cost no
// stream hop and no bridge round trip between them. Each step is {key, carry, fail}: it is fed from
// what the steps before it carried (the wire tensors first), then keeps `carry` of its inputs and
// outputs (all its outputs when carry is null). Returns the last step's carried tensors and each step's
// marks; a failing step throws a StepError holding that step's inputs.
export async function runSteps(steps, wire) {
  let env = {};
  for (const [name, t] of Object.entries(wire)) env[name] = toOrt(t);
  const done = [];
  for (let i = 0; i < steps.length; i++) {
    const step = steps[i];
    try {
      const { outputs, marks } = await runStep(step, env);
      env = step.carry ? carried({ ...env, ...outputs }, step.carry, step.key) : outputs;
      done.push(marks);
    } catch (e) {
      throw new StepError(i, errorText(e), env, done);
    }
  }
  return { outputs: env, steps: done };
}
