/**
 * bench:decode — decode throughput of a SmolLM2-135M-shaped model with random weights at
 * batch 1, 8 and 32, the FLOP rate that implies, and the backend's own matMul rate measured
 * in the same run; then the cost of heterogeneous LoRA at batch 32 against the base model.
 *
 *   npm run bench:decode [-- --steps 8 --prompt 32]
 */
import * as tf from '@tensorflow/tfjs-core';
import os from 'node:os';
import { parseArgs } from 'node:util';
import { resolveBackend } from '../src/model/backend/backend.js';
import { DecodeBatchCache } from '../src/model/forward/kv-cache.js';
import type { LoraStrategy } from '../src/model/lora/lora-batch.js';
import { LoraStackCache } from '../src/model/lora/lora-stack-cache.js';
import type { LoraAdapter } from '../src/model/lora/lora-adapter.js';
import { forwardDecode, forwardSequences, LlamaModel } from '../src/model/forward/llama-model.js';
import { llamaWeightsFromArrays, PROJECTIONS, projectionModulePath, projectionShape, type ProjectionName } from '../src/model/architecture/llama-weights.js';
import { parseModelConfig, type ModelConfig } from '../src/model/architecture/model-config.js';
import { uploadAdapter } from '../src/model/lora/peft-adapter-reader.js';
import { randomLlamaWeights, randomLoraWeights } from '../src/model/synthetic/random-weights.js';
import { SMOLLM2_135M_SHAPE } from '../src/model/architecture/model-shapes.js';
import { SeededRandom } from '../src/model/synthetic/seeded-random.js';


const { values } = parseArgs({
  options: { steps: { type: 'string', default: '8' }, prompt: { type: 'string', default: '32' }, backend: { type: 'string', default: 'auto' } },
});
const STEPS = Number(values.steps);
const PROMPT = Number(values.prompt);

function matmulRate(n: number, reps: number): number {
  const a = tf.randomNormal([n, n]);
  const b = tf.randomNormal([n, n]);
  tf.tidy(() => tf.matMul(a, b).dataSync());
  const t0 = performance.now();
  for (let i = 0; i < reps; i++) {
    const c = tf.matMul(a, b);
    c.dataSync();
    c.dispose();
  }
  const s = (performance.now() - t0) / 1000 / reps;
  a.dispose();
  b.dispose();
  return (2 * n ** 3) / s;
}

function heapMB(): string {
  const heap = (tf.backend() as unknown as { wasm?: { HEAPU8?: Uint8Array } }).wasm?.HEAPU8;
  return heap ? (heap.length / 1e6).toFixed(0) : 'n/a';
}

/** Multiply-adds ×2 of one decode token: every projection, lm_head, and attention over ctx keys. */
function flopsPerToken(c: ModelConfig, ctx: number): number {
  let linear = 0;
  for (const p of PROJECTIONS) {
    const { inFeatures, outFeatures } = projectionShape(c, p);
    linear += inFeatures * outFeatures;
  }
  const attention = 2 * c.numHeads * c.headDim * ctx; // q·K and p·V
  return 2 * (c.numLayers * (linear + attention) + c.hiddenSize * c.vocabSize);
}

interface DecodeSession {
  /** Runs n decode steps, returns seconds. */
  run(n: number): Promise<number>;
  dispose(): void;
}

/** Prefills `batch` random prompts, packs their caches, and decodes greedily on demand. */
function decodeSession(model: LlamaModel, batch: number, adapters: (LoraAdapter | null)[], strategy: LoraStrategy): DecodeSession {
  const rng = new SeededRandom(batch);
  const V = model.config.vocabSize;
  const caches = Array.from({ length: batch }, () => model.newCache());
  const stackCache = new LoraStackCache();
  const prompts = caches.map(() => Array.from({ length: PROMPT }, () => rng.int(V)));
  forwardSequences(
    model,
    prompts.map((tokens, i) => ({ tokens, cache: caches[i], adapter: adapters[i], logits: 'none' as const })),
    { loraStrategy: strategy, stackCache },
  ).dispose();
  const packed = DecodeBatchCache.pack(caches, model.config.slidingWindow);
  caches.forEach((c) => c.dispose());
  let tokens = prompts.map((p) => p[p.length - 1]);
  const step = async () => {
    const logits = forwardDecode(model, packed, tokens, adapters, { loraStrategy: strategy, stackCache });
    const data = await logits.data();
    logits.dispose();
    tokens = tokens.map((_, b) => {
      let best = 0;
      for (let v = 1; v < V; v++) if (data[b * V + v] > data[b * V + best]) best = v;
      return best;
    });
  };
  return {
    async run(n) {
      const t0 = performance.now();
      for (let s = 0; s < n; s++) await step();
      return (performance.now() - t0) / 1000;
    },
    dispose() {
      packed.dispose();
      stackCache.clear();
    },
  };
}

async function decodeRate(model: LlamaModel, batch: number): Promise<number> {
  const session = decodeSession(model, batch, new Array(batch).fill(null), 'auto');
  await session.run(1); // warm-up: first-use kernel setup
  if (process.env.BENCH_MEMORY) console.error(`  [memory] ${(tf.memory().numBytes / 1e6).toFixed(0)} MB in ${tf.memory().numTensors} tensors, wasm heap ${heapMB()} MB`);
  const seconds = await session.run(STEPS);
  session.dispose();
  return (batch * STEPS) / seconds;
}

/**
 * LoRA throughput relative to the base model at the same batch size: the two sessions
 * alternate in blocks of steps and the median per-block ratio is reported, because this
 * VM's speed drifts by ±15% over a minute and a sequential A-then-B run measures the drift.
 */
async function relativeRate(model: LlamaModel, adapters: (LoraAdapter | null)[], strategy: LoraStrategy): Promise<{ rate: number; ratio: number }> {
  const B = adapters.length;
  const base = decodeSession(model, B, new Array(B).fill(null), 'auto');
  const lora = decodeSession(model, B, adapters, strategy);
  await base.run(1);
  await lora.run(1);
  const blocks = 4;
  const per = Math.max(1, Math.round(STEPS / blocks));
  const ratios: number[] = [];
  let loraSeconds = 0;
  for (let b = 0; b < blocks; b++) {
    const tb = await base.run(per);
    const tl = await lora.run(per);
    loraSeconds += tl;
    ratios.push(tb / tl);
  }
  base.dispose();
  lora.dispose();
  ratios.sort((x, y) => x - y);
  return { rate: (B * per * blocks) / loraSeconds, ratio: (ratios[1] + ratios[2]) / 2 };
}

function makeAdapters(configJson: Record<string, unknown>, config: ModelConfig, count: number): LoraAdapter[] {
  const ranks = [8, 16, 32, 16];
  const targets: ProjectionName[] = ['q_proj', 'k_proj', 'v_proj', 'o_proj'];
  return Array.from({ length: count }, (_, i) => {
    const rank = ranks[i % ranks.length];
    const mods = [];
    for (let l = 0; l < config.numLayers; l++) for (const proj of targets) mods.push({ modulePath: projectionModulePath(l, proj), proj, rank, layer: l });
    const w = randomLoraWeights(configJson, mods, 1000 + i);
    return uploadAdapter(
      {
        id: `bench-${i}`,
        modules: mods.map((m) => ({
          spec: { layer: m.layer, proj: m.proj, modulePath: m.modulePath, rank, scale: 2 },
          a: w.get(`base_model.model.${m.modulePath}.lora_A.weight`)!.data,
          b: w.get(`base_model.model.${m.modulePath}.lora_B.weight`)!.data,
        })),
      },
      config,
    );
  });
}

async function main(): Promise<void> {
  const backend = await resolveBackend(values.backend as 'auto', (l) => console.log(l));
  const config = parseModelConfig(SMOLLM2_135M_SHAPE);
  console.log(`machine: ${os.cpus()[0]?.model ?? 'unknown cpu'}, ${os.cpus().length} cores; node ${process.version}; backend ${backend.name}`);
  console.log('building a SmolLM2-135M-shaped model with random weights ...');
  const model = new LlamaModel(config, llamaWeightsFromArrays(config, randomLlamaWeights({ ...SMOLLM2_135M_SHAPE }, 7)));
  const mm = matmulRate(1024, 5);
  console.log(`backend matMul 1024³: ${(mm / 1e9).toFixed(2)} GFLOP/s`);
  console.log(`decode: prompt ${PROMPT} tokens, ${STEPS} timed steps after one warm-up step`);
  console.log('| batch | adapters | tokens/s | GFLOP/s implied | share of matMul rate |');
  console.log('|---|---|---|---|---|');
  const ctx = PROMPT + STEPS / 2;
  for (const batch of process.env.BENCH_SKIP_BASE ? [] : [1, 8, 32]) {
    const rate = await decodeRate(model, batch);
    const gflops = (rate * flopsPerToken(config, ctx)) / 1e9;
    console.log(`| ${batch} | none | ${rate.toFixed(1)} | ${gflops.toFixed(2)} | ${((gflops * 1e9) / mm).toFixed(2)}× |`);
  }
  console.log('\nheterogeneous LoRA at batch 32 (q,k,v,o; ranks 8/16/32), throughput relative to the base model at batch 32,');
  console.log('measured alternately in blocks (median of per-block ratios):');
  console.log('| distinct adapters | strategy | tokens/s | vs base |');
  console.log('|---|---|---|---|');
  for (const count of [1, 8, 32]) {
    const adapters = makeAdapters({ ...SMOLLM2_135M_SHAPE }, config, count);
    const perRow = Array.from({ length: 32 }, (_, b) => adapters[b % count]);
    for (const strategy of ['auto', 'stacked', 'segmented'] as LoraStrategy[]) {
      const { rate, ratio } = await relativeRate(model, perRow, strategy);
      console.log(`| ${count} | ${strategy} | ${rate.toFixed(1)} | ${ratio.toFixed(2)}× |`);
    }
    adapters.forEach((a) => a.dispose());
  }
  model.dispose();
  console.log(`\ntensors alive at exit: ${tf.memory().numTensors}`);
}

await main();
