// Runs shards with onnxruntime-web: detects what the browser really offers, picks an execution
// provider, loads shard sessions and runs them, timing the kernel.
import * as ort from '/ort/ort.all.min.mjs';

ort.env.wasm.wasmPaths = '/ort/';
ort.env.wasm.proxy = false;
ort.env.logLevel = 'error';

const SOFTWARE_ADAPTER = /swiftshader|llvmpipe|lavapipe|softpipe|software|microsoft basic render/i;

const DTYPE_ARRAYS = {
  float32: Float32Array, float16: Uint16Array, float64: Float64Array, int64: BigInt64Array,
  int32: Int32Array, int16: Int16Array, int8: Int8Array, uint8: Uint8Array, bool: Uint8Array,
};

let capabilities = null;
let webgpuAdapter = null;
const sessions = new Map();   // key -> {session, provider, adapter}

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

// Which provider to use for `platform` ('auto' | 'wasm' | 'webgpu' | 'webnn'), and why.
export function choose(platform) {
  const c = capabilities;
  const wasmAdapter = `wasm (${c.wasm.threads} thread${c.wasm.threads > 1 ? 's' : ''}, simd)`;
  if (platform === 'webnn') {
    if (!c.webnn.available) throw new Error(`platform webnn forced but unavailable: ${c.webnn.error}`);
    return { provider: 'webnn', adapter: 'webnn gpu context', note: '' };
  }
  if (platform === 'webgpu') {
    if (!c.webgpu.available) throw new Error(`platform webgpu forced but unavailable: ${c.webgpu.error}`);
    return { provider: 'webgpu', adapter: c.webgpu.adapter, note: '' };
  }
  if (platform === 'wasm') return { provider: 'wasm', adapter: wasmAdapter, note: '' };
  if (platform !== 'auto') throw new Error(`unknown platform ${platform}`);
  if (c.webnn.available) return { provider: 'webnn', adapter: 'webnn gpu context', note: '' };
  if (c.webgpu.available && !c.webgpu.software) return { provider: 'webgpu', adapter: c.webgpu.adapter, note: '' };
  const why = c.webgpu.available
    ? `webgpu adapter "${c.webgpu.adapter}" is a software rasterizer, slower than wasm; webnn: ${c.webnn.error}`
    : `no webgpu (${c.webgpu.error}); no webnn (${c.webnn.error})`;
  return { provider: 'wasm', adapter: wasmAdapter, note: `fell back to wasm: ${why}` };
}

function providerOptions(provider) {
  if (provider === 'webnn') return [{ name: 'webnn', deviceType: 'gpu' }];
  if (provider === 'webgpu') return ['webgpu'];
  return ['wasm'];
}

export async function load(key, url, platform) {
  const pick = choose(platform);
  if (pick.provider === 'webgpu' && webgpuAdapter) ort.env.webgpu.adapter = webgpuAdapter;
  const t0 = performance.now();
  const response = await fetch(url);
  if (!response.ok) throw new Error(`fetch ${url}: HTTP ${response.status}`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  const session = await ort.InferenceSession.create(bytes, {
    executionProviders: providerOptions(pick.provider),
    graphOptimizationLevel: 'all',
  });
  sessions.set(key, { session, provider: pick.provider, adapter: pick.adapter });
  return {
    provider: pick.provider, adapter: pick.adapter, note: pick.note,
    load_ms: performance.now() - t0,
    inputs: session.inputNames, outputs: session.outputNames,
  };
}

export async function release(key) {
  const entry = sessions.get(key);
  sessions.delete(key);
  if (entry) await entry.session.release();
}

export function toOrt(t) {
  const Ctor = DTYPE_ARRAYS[t.dtype];
  if (!Ctor) throw new Error(`unsupported dtype ${t.dtype}`);
  return new ort.Tensor(t.dtype, new Ctor(t.buffer, t.offset, t.length / Ctor.BYTES_PER_ELEMENT), t.shape);
}

export async function run(key, feeds, fail) {
  const entry = sessions.get(key);
  if (!entry) throw new Error(`shard ${key} is not loaded in this page`);
  if (fail) throw new Error(`injected kernel error: ${fail}`);
  const ortFeeds = {};
  for (const [name, t] of Object.entries(feeds)) ortFeeds[name] = toOrt(t);
  const t0 = performance.now();
  const out = await entry.session.run(ortFeeds);
  const kernelMs = performance.now() - t0;
  const outputs = {};
  for (const [name, tensor] of Object.entries(out)) {
    const data = tensor.location === 'cpu' || !tensor.location ? tensor.data : await tensor.getData(true);
    outputs[name] = { dtype: tensor.type, shape: Array.from(tensor.dims), data };
  }
  return { outputs, kernelMs, provider: entry.provider, adapter: entry.adapter };
}
