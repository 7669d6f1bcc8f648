/**
 * bench:matmul-paths — the engine on the native OpenBLAS kernels against the stock wasm
 * (XNNPACK, one thread) kernels, in one run: decode tokens/s at batch 1, 8 and 32 and the
 * prefill of 64 prompts × 64 tokens (4,096 tokens) on a SmolLM2-135M-shaped model (or, with
 * --shape peer-75m, the llama.cpp peer's 75M benchmark model), each path
 * in its own process (the kernel is chosen once per process), passes interleaved
 * (wasm, native, wasm, native, ...), medians reported with the native / wasm ratio. Also
 * prints each path's 1024³ matMul rate (best of three measurements through the run) and the share
 * of it that decode and prefill reach, and that the batch-32 decode's weight products reach alone.
 *
 *   npm run bench:matmul-paths [-- --passes 3 --shape smollm2-135m|peer-75m]
 */
import { execFileSync } from 'node:child_process';
import os from 'node:os';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { passes: { type: 'string', default: '3' }, worker: { type: 'boolean', default: false }, shape: { type: 'string', default: 'smollm2-135m' } } });

interface Sample {
  path: string;
  gemm: number;
  decode: Record<number, number>;
  decodeGflops: Record<number, number>;
  /** The batch-32 decode step's weight products alone (projections and lm_head). */
  weightProductsGflops: number;
  prefillSeconds: number;
  prefillGflops: number;
}

async function worker(): Promise<void> {
  const tf = await import('@tensorflow/tfjs-core');
  const { resolveBackend } = await import('../src/model/backend/backend.js');
  const { matMulPath } = await import('../src/model/backend/native-matmul.js');
  const { DecodeBatchCache } = await import('../src/model/forward/kv-cache.js');
  const { forwardDecode, forwardSequences, LlamaModel } = await import('../src/model/forward/llama-model.js');
  const { llamaWeightsFromArrays, PROJECTIONS, projectionShape } = await import('../src/model/architecture/llama-weights.js');
  const { parseModelConfig } = await import('../src/model/architecture/model-config.js');
  const { randomLlamaWeights } = await import('../src/model/synthetic/random-weights.js');
  const { SMOLLM2_135M_SHAPE, PEER_75M_SHAPE } = await import('../src/model/architecture/model-shapes.js');
  const SHAPE = values.shape === 'peer-75m' ? PEER_75M_SHAPE : SMOLLM2_135M_SHAPE;
  await resolveBackend('wasm');
  // the ceiling: this path's own 1024³ matMul, measured three times through the run (start,
  // after decode, after prefill) and the best taken: on a shared host one measurement can land
  // on a slow moment and make every share look better than it is
  const n = 1024;
  const a = tf.randomNormal([n, n]);
  const b = tf.randomNormal([n, n]);
  // (no tf.tidy around dataSync: tidy walks a returned typed array element by element)
  const once = () => {
    const c = tf.matMul(a, b);
    c.dataSync();
    c.dispose();
  };
  once();
  const gemmRate = () => {
    const t = performance.now();
    for (let i = 0; i < 5; i++) once();
    return (2 * n ** 3 * 5) / ((performance.now() - t) / 1000) / 1e9;
  };
  const gemms = [gemmRate()];
  let t0: number;
  const cfg = parseModelConfig(SHAPE);
  const model = new LlamaModel(cfg, llamaWeightsFromArrays(cfg, randomLlamaWeights(SHAPE, 1)));
  // FLOPs of one token's projections and lm_head (attention over a short context is small)
  const perToken = 2 * (cfg.numLayers * PROJECTIONS.reduce((s, p) => s + projectionShape(cfg, p).inFeatures * projectionShape(cfg, p).outFeatures, 0) + cfg.hiddenSize * cfg.vocabSize);
  const prompt = (i: number, len: number) => Array.from({ length: len }, (_, j) => 1 + ((i * 7919 + j * 104729) % (cfg.vocabSize - 1)));
  const decode: Record<number, number> = {};
  const decodeGflops: Record<number, number> = {};
  for (const batch of [1, 8, 32]) {
    const caches = Array.from({ length: batch }, () => model.newCache());
    tf.dispose(forwardSequences(model, caches.map((cache, i) => ({ tokens: prompt(i, 16), cache, adapter: null, logits: 'none' as const }))));
    const packed = DecodeBatchCache.pack(caches);
    const tokens = Array.from({ length: batch }, (_, i) => 1 + i);
    const adapters = tokens.map(() => null);
    tf.dispose(forwardDecode(model, packed, tokens, adapters));
    const steps = 8;
    t0 = performance.now();
    for (let s = 0; s < steps; s++) {
      const logits = forwardDecode(model, packed, tokens, adapters);
      await logits.data();
      logits.dispose();
    }
    const tps = (batch * steps) / ((performance.now() - t0) / 1000);
    decode[batch] = tps;
    decodeGflops[batch] = (tps * perToken) / 1e9;
    packed.dispose();
    for (const c of caches) c.dispose();
  }
  // the decode step's weight products alone at batch 32 (every projection and lm_head, the
  // weights as the model holds them): what this path's GEMM does on exactly these shapes
  const x32 = tf.randomNormal([32, cfg.intermediateSize]);
  const products = () => {
    for (const layer of model.weights.layers) {
      for (const p of PROJECTIONS) {
        const w = layer.proj[p].wT;
        const y = tf.tidy(() => tf.matMul(tf.slice(x32, [0, 0], [32, w.shape[0]]), w));
        y.dataSync();
        y.dispose();
      }
    }
    const y = tf.tidy(() => tf.matMul(tf.slice(x32, [0, 0], [32, cfg.hiddenSize]), model.weights.lmHeadT));
    y.dataSync();
    y.dispose();
  };
  products();
  t0 = performance.now();
  for (let r = 0; r < 4; r++) products();
  const weightProductsGflops = (4 * 32 * perToken) / ((performance.now() - t0) / 1000) / 1e9;
  x32.dispose();
  gemms.push(gemmRate());
  // prefill: 64 prompts of 64 tokens in one step, last-token logits only (as admission does)
  t0 = performance.now();
  const logits = forwardSequences(model, Array.from({ length: 64 }, (_, i) => ({ tokens: prompt(i, 64), adapter: null, logits: 'last' as const })));
  await logits.data();
  logits.dispose();
  const prefillSeconds = (performance.now() - t0) / 1000;
  const prefillGflops = (4096 * (perToken - 2 * cfg.hiddenSize * cfg.vocabSize) + 64 * 2 * cfg.hiddenSize * cfg.vocabSize) / prefillSeconds / 1e9;
  model.dispose();
  gemms.push(gemmRate());
  tf.dispose([a, b]);
  const sample: Sample = { path: matMulPath()!.detail, gemm: Math.max(...gemms), decode, decodeGflops, weightProductsGflops, prefillSeconds, prefillGflops };
  process.stdout.write(`${JSON.stringify(sample)}\n`);
}

function median(xs: number[]): number {
  const s = [...xs].sort((x, y) => x - y);
  return s[Math.floor(s.length / 2)];
}

function main(): void {
  const passes = Number(values.passes);
  const runs: Record<'wasm' | 'native', Sample[]> = { wasm: [], native: [] };
  for (let p = 0; p < passes; p++) {
    for (const path of ['wasm', 'native'] as const) {
      const out = execFileSync(process.execPath, ['--import', 'tsx', 'bench/matmul-paths.ts', '--worker', '--shape', values.shape!], {
        env: { ...process.env, LORA_GATEWAY_NATIVE_BLAS: path === 'wasm' ? 'off' : 'auto' },
        encoding: 'utf8',
      });
      runs[path].push(JSON.parse(out.trim().split('\n').pop()!) as Sample);
      process.stderr.write(`pass ${p + 1}/${passes} ${path} done\n`);
    }
  }
  const med = (path: 'wasm' | 'native', f: (s: Sample) => number) => median(runs[path].map(f));
  console.log(`model shape: ${values.shape}; machine: ${os.cpus()[0].model}, ${os.cpus().length} cores; ${new Date().toISOString().slice(0, 10)}; medians of ${passes} interleaved passes`);
  console.log(`wasm path:   ${runs.wasm[0].path}`);
  console.log(`native path: ${runs.native[0].path}`);
  console.log('');
  console.log('| measure | wasm | native | native / wasm |');
  console.log('|---|---|---|---|');
  const row = (name: string, f: (s: Sample) => number, digits = 1, lowerIsBetter = false) => {
    const w = med('wasm', f);
    const n = med('native', f);
    console.log(`| ${name} | ${w.toFixed(digits)} | ${n.toFixed(digits)} | ${(lowerIsBetter ? w / n : n / w).toFixed(2)}× |`);
  };
  row('1024³ matMul GFLOP/s (the ceiling)', (s) => s.gemm);
  for (const b of [1, 8, 32]) row(`decode tokens/s, batch ${b}`, (s) => s.decode[b]);
  row('prefill of 64 × 64 tokens, seconds (ratio: speed-up)', (s) => s.prefillSeconds, 2, true);
  console.log('');
  console.log('| share of the same path\'s matMul rate | wasm | native |');
  console.log('|---|---|---|');
  console.log(`| decode at batch 32 | ${med('wasm', (s) => s.decodeGflops[32] / s.gemm).toFixed(2)} | ${med('native', (s) => s.decodeGflops[32] / s.gemm).toFixed(2)} |`);
  console.log(`| prefill of 4,096 tokens | ${med('wasm', (s) => s.prefillGflops / s.gemm).toFixed(2)} | ${med('native', (s) => s.prefillGflops / s.gemm).toFixed(2)} |`);
  console.log(`| batch-32 decode's weight products alone (the GEMM on these shapes) | ${med('wasm', (s) => s.weightProductsGflops / s.gemm).toFixed(2)} | ${med('native', (s) => s.weightProductsGflops / s.gemm).toFixed(2)} |`);
}

if (values.worker) await worker();
else main();
