import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { LoraAdapter, loraModuleKey, type LoraModuleWeights } from '../../../src/model/lora/lora-adapter.js';
import { nativeSgmvAvailable } from '../../../src/model/backend/native-lora.js';
import { LoraBatch, type LoraRowSegment, type LoraStrategy } from '../../../src/model/lora/lora-batch.js';
import { LoraStackCache } from '../../../src/model/lora/lora-stack-cache.js';
import type { ProjectionName } from '../../../src/model/architecture/llama-weights.js';
import { SeededRandom } from '../../../src/model/synthetic/seeded-random.js';
import { maxAbsDiff, useWasm } from '../../helpers/tiny-models.js';

before(useWasm);

interface HostModule {
  a: Float32Array; // [r, in]
  b: Float32Array; // [out, r]
  rank: number;
  scale: number;
}

/** Slow, obvious reference: delta[t] = s·(x[t]·Aᵀ)·Bᵀ of row t's adapter, or 0. */
function referenceDelta(x: Float32Array, T: number, inF: number, outF: number, rowModule: (HostModule | undefined)[]): Float64Array {
  const y = new Float64Array(T * outF);
  for (let t = 0; t < T; t++) {
    const m = rowModule[t];
    if (!m) continue;
    for (let o = 0; o < outF; o++) {
      let s = 0;
      for (let k = 0; k < m.rank; k++) {
        let xa = 0;
        for (let i = 0; i < inF; i++) xa += x[t * inF + i] * m.a[k * inF + i];
        s += xa * m.b[o * m.rank + k];
      }
      y[t * outF + o] = m.scale * s;
    }
  }
  return y;
}

function makeAdapter(id: string, proj: ProjectionName | null, rank: number, inF: number, outF: number, rng: SeededRandom) {
  const host: HostModule = { a: rng.normalArray(rank * inF, 0.3), b: rng.normalArray(outF * rank, 0.3), rank, scale: 0.5 + rng.next() };
  const modules = new Map<string, LoraModuleWeights>();
  if (proj) {
    modules.set(loraModuleKey(0, proj), {
      aT: tf.transpose(tf.tensor2d(host.a, [rank, inF])),
      bT: tf.transpose(tf.tensor2d(host.b, [outF, rank])),
      rank,
      scale: host.scale,
    });
  }
  return { adapter: new LoraAdapter(id, modules, new Set(proj ? [proj] : [])), host: proj ? host : undefined };
}

const CASES = [
  { rows: [1], ranks: [8], inF: 16, outF: 24 },
  { rows: [1, 1, 1, 1], ranks: [4, 16], inF: 32, outF: 32 },
  { rows: [5, 1, 7, 2, 3], ranks: [1, 8, 64], inF: 24, outF: 40 },
  { rows: [33, 4, 1, 12], ranks: [16, 16, 2, 4], inF: 48, outF: 16 },
  { rows: Array.from({ length: 32 }, () => 1), ranks: [4, 8, 16, 32, 64], inF: 40, outF: 40 },
];

describe('batched heterogeneous LoRA equals the per-row reference', () => {
  for (const strategy of ['stacked', 'segmented', 'auto'] as LoraStrategy[]) {
    CASES.forEach((c, ci) => {
      test(`${strategy}: segments ${c.rows.length} (${c.rows.reduce((a, b) => a + b)} rows), ranks ${c.ranks.join('/')}, ${c.inF}→${c.outF}`, async () => {
        const rng = new SeededRandom(100 + ci);
        const numAdapters = Math.min(c.rows.length, c.ranks.length + 2);
        // the last adapter does not adapt q_proj: its rows must get zero delta
        const made = Array.from({ length: numAdapters }, (_, a) =>
          makeAdapter(`a${a}`, a === numAdapters - 1 && numAdapters > 1 ? 'v_proj' : 'q_proj', c.ranks[a % c.ranks.length], c.inF, c.outF, rng),
        );
        const T = c.rows.reduce((a, b) => a + b, 0);
        const segments: LoraRowSegment[] = [];
        const rowModule: (HostModule | undefined)[] = [];
        let start = 0;
        c.rows.forEach((count, s) => {
          // every third segment uses no adapter; adapters repeat across non-adjacent segments
          const pick = s % 3 === 2 ? undefined : made[s % made.length];
          segments.push({ start, count, adapter: pick?.adapter ?? null });
          const adaptsQ = pick?.adapter.targets.has('q_proj') ?? false;
          for (let i = 0; i < count; i++) rowModule.push(adaptsQ ? pick?.host : undefined);
          start += count;
        });
        const x = rng.normalArray(T * c.inF, 1);
        const cache = new LoraStackCache();
        const before = tf.memory().numTensors;
        const lora = new LoraBatch(segments, T, { strategy, stackCache: cache });
        const delta = tf.tidy(() => lora.delta(0, 'q_proj', tf.tensor2d(x, [T, c.inF])) ?? undefined) as tf.Tensor2D | undefined;
        const choice = lora.lastChoice;
        lora.dispose();
        // on the native path 'auto' takes the native kernel whenever more than one adapter (or a partial one) is in the batch
        if (strategy === 'auto' && nativeSgmvAvailable() && choice !== undefined && choice !== 'single') assert.equal(choice, 'native');
        const want = referenceDelta(x, T, c.inF, c.outF, rowModule);
        if (rowModule.every((m) => !m)) {
          assert.equal(delta, undefined);
        } else {
          assert.ok(delta);
          assert.deepEqual(delta.shape, [T, c.outF]);
          const diff = maxAbsDiff(await delta.data(), want);
          assert.ok(diff < 1e-4, `max |Δ| = ${diff}`);
          delta.dispose();
        }
        cache.clear();
        assert.equal(tf.memory().numTensors, before, 'no tensors left behind');
        made.forEach((m) => m.adapter.dispose());
      });
    });
  }

  test('a batch with no adapter on a module returns null (base path untouched)', () => {
    const rng = new SeededRandom(1);
    const { adapter } = makeAdapter('only-v', 'v_proj', 4, 8, 8, rng);
    const before = tf.memory().numTensors;
    const out = tf.tidy(() => new LoraBatch([{ start: 0, count: 3, adapter }], 3).delta(0, 'q_proj', tf.zeros([3, 8]) as tf.Tensor2D) ?? undefined);
    assert.equal(out, undefined);
    assert.equal(tf.memory().numTensors, before);
    adapter.dispose();
  });

  test('the stack cache reuses concatenated weights across steps with the same adapters', () => {
    const rng = new SeededRandom(2);
    const a = makeAdapter('a', 'q_proj', 4, 8, 8, rng).adapter;
    const b = makeAdapter('b', 'q_proj', 8, 8, 8, rng).adapter;
    const cache = new LoraStackCache();
    for (let step = 0; step < 3; step++) {
      const lora = new LoraBatch(
        [
          { start: 0, count: 1, adapter: a },
          { start: 1, count: 1, adapter: b },
        ],
        2,
        { strategy: 'stacked', stackCache: cache },
      );
      tf.tidy(() => {
        lora.delta(0, 'q_proj', tf.ones([2, 8]) as tf.Tensor2D);
      });
      lora.dispose();
    }
    assert.equal(cache.size, 1);
    cache.clear();
    a.dispose();
    b.dispose();
  });
});
