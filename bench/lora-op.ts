/**
 * bench:lora-op — the batched heterogeneous LoRA op alone: one projection 576→576, rank 16,
 * T tokens spread evenly over n adapters, each strategy's time as a multiple of the base
 * matMul x·W measured in the same run, and what `auto` picks.
 *
 *   npm run bench:lora-op [-- --tokens 32 --reps 200 --layout interleaved|contiguous]
 */
import * as tf from '@tensorflow/tfjs-core';
import { parseArgs } from 'node:util';
import { resolveBackend } from '../src/model/backend/backend.js';
import { LoraAdapter, loraModuleKey } from '../src/model/lora/lora-adapter.js';
import { LoraBatch, type LoraRowSegment, type LoraStrategy } from '../src/model/lora/lora-batch.js';
import { LoraStackCache } from '../src/model/lora/lora-stack-cache.js';

const { values } = parseArgs({
  options: {
    tokens: { type: 'string', default: '32' },
    reps: { type: 'string', default: '200' },
    hidden: { type: 'string', default: '576' },
    rank: { type: 'string', default: '16' },
    layout: { type: 'string', default: 'interleaved' },
  },
});
const T = Number(values.tokens);
const REPS = Number(values.reps);
const H = Number(values.hidden);
const R = Number(values.rank);

function callsMs(fn: () => tf.Tensor | null, calls: number): number {
  const t0 = performance.now();
  for (let i = 0; i < calls; i++) {
    const y = fn();
    y?.dataSync();
    y?.dispose();
  }
  return (performance.now() - t0) / calls;
}

/**
 * Each variant's time as a multiple of the baseline, measured round-robin in 7 blocks and
 * reported as the median of the per-block ratios: this VM's speed drifts between blocks,
 * and interleaving puts every variant under the same drift.
 */
function ratios(baseline: () => tf.Tensor, variants: (() => tf.Tensor | null)[]): { baseMs: number; ratios: number[] } {
  for (const f of [baseline, ...variants]) for (let i = 0; i < 3; i++) f()?.dispose();
  const per = Math.max(1, Math.round(REPS / 7));
  const baseMs: number[] = [];
  const rs: number[][] = variants.map(() => []);
  for (let b = 0; b < 7; b++) {
    const base = callsMs(baseline, per);
    baseMs.push(base);
    variants.forEach((v, i) => rs[i].push(callsMs(v, per) / base));
  }
  const median = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
  return { baseMs: median(baseMs), ratios: rs.map(median) };
}

await resolveBackend('auto', (l) => console.log(l));
const x = tf.randomNormal([T, H]) as tf.Tensor2D;
const w = tf.randomNormal([H, H]) as tf.Tensor2D;
console.log(`projection ${H}→${H}, rank ${R}, ${T} tokens (${values.layout}), ${REPS} calls per variant`);
console.log('| adapters | stacked | segmented | auto | auto picks | base x·W |');
console.log('|---|---|---|---|---|---|');
for (const n of [1, 2, 4, 8, 16, 32, 64].filter((k) => k <= T)) {
  const adapters = Array.from(
    { length: n },
    (_, i) =>
      new LoraAdapter(
        `a${i}`,
        new Map([[loraModuleKey(0, 'q_proj'), { aT: tf.randomNormal([H, R]) as tf.Tensor2D, bT: tf.randomNormal([R, H]) as tf.Tensor2D, rank: R, scale: 2 }]]),
        new Set(['q_proj']),
      ),
  );
  // interleaved: decode-like, token t is sequence t, adapters alternate row by row;
  // contiguous: prefill-like, each adapter's tokens form one run of rows
  const per = Math.floor(T / n);
  const segments: LoraRowSegment[] =
    values.layout === 'contiguous'
      ? adapters.map((adapter, i) => ({ start: i * per, count: i === n - 1 ? T - i * per : per, adapter }))
      : Array.from({ length: T }, (_, t) => ({ start: t, count: 1, adapter: adapters[t % n] }));
  const strategies: LoraStrategy[] = ['stacked', 'segmented', 'auto'];
  const caches = strategies.map(() => new LoraStackCache());
  const batches = strategies.map((strategy, i) => new LoraBatch(segments, T, { strategy, stackCache: caches[i] }));
  const { baseMs, ratios: r } = ratios(
    () => tf.matMul(x, w),
    batches.map((lora) => () => tf.tidy(() => tf.add(tf.matMul(x, w), lora.delta(0, 'q_proj', x)!))),
  );
  const cells = r.map((v) => `${v.toFixed(2)}×`);
  const picked = batches[2].lastChoice ?? '';
  batches.forEach((b) => b.dispose());
  caches.forEach((c) => c.clear());
  console.log(`| ${n} | ${cells.join(' | ')} | ${picked} | ${baseMs.toFixed(3)} ms |`);
  adapters.forEach((a) => a.dispose());
}
console.log('(each cell: time of x·W + LoRA delta as a multiple of x·W alone, median of 7 interleaved blocks)');
