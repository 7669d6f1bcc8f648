import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { LoraAdapter, loraModuleKey, type LoraModuleWeights } from '../../../src/model/lora/lora-adapter.js';
import { LoraBatch, type LoraRowSegment } from '../../../src/model/lora/lora-batch.js';
import { LoraStackCache } from '../../../src/model/lora/lora-stack-cache.js';
import { SeededRandom } from '../../../src/model/synthetic/seeded-random.js';
import { maxAbsDiff, useWasm } from '../../helpers/tiny-models.js';

before(useWasm);

const IN = 12;
const OUT = 10;

function adapter(id: string, rank: number, rng: SeededRandom): LoraAdapter {
  const modules = new Map<string, LoraModuleWeights>([
    [loraModuleKey(0, 'q_proj'), { aT: tf.tensor2d(rng.normalArray(IN * rank, 0.3), [IN, rank]), bT: tf.tensor2d(rng.normalArray(rank * OUT, 0.3), [rank, OUT]), rank, scale: 0.5 + rng.next() }],
  ]);
  return new LoraAdapter(id, modules, new Set(['q_proj']));
}

/** One row per listed adapter (null = base), as a decode step lays them out. */
function rows(adapters: (LoraAdapter | null)[]): LoraRowSegment[] {
  return adapters.map((adapter, start) => ({ start, count: 1, adapter }));
}

async function delta(segments: LoraRowSegment[], x: Float32Array, cache?: LoraStackCache): Promise<Float32Array> {
  const lora = new LoraBatch(segments, segments.length, { strategy: 'stacked', stackCache: cache });
  const d = tf.tidy(() => lora.delta(0, 'q_proj', tf.tensor2d(x, [segments.length, IN]))!);
  lora.dispose();
  const data = (await d.data()) as Float32Array;
  d.dispose();
  return data;
}

describe('LoraStackCache keeps stacked weights in chunks across changing batches', () => {
  test('as adapters join and leave step by step, every delta equals the one-off stack of that step, and no tensor leaks', async () => {
    const rng = new SeededRandom(5);
    const pool = Array.from({ length: 8 }, (_, i) => adapter(`a${i}`, [2, 4, 8][i % 3], rng));
    const before = tf.memory().numTensors;
    const cache = new LoraStackCache({ maxChunks: 3 });
    // a continuous-batching-like walk: rows finish, new ones arrive with other adapters, some base rows
    const steps: (LoraAdapter | null)[][] = [
      [pool[0], pool[1], pool[2]],
      [pool[0], pool[2]], // pool[1] left: masked, not rebuilt
      [pool[0], pool[2], pool[3], null], // joined: a new chunk
      [pool[2], pool[3], pool[4], pool[4]],
      [pool[3], pool[5], pool[6], pool[0]], // pool[0] came back
      [pool[7], pool[6]],
      [pool[7]],
      [pool[1], pool[2], pool[3], pool[4], pool[5], pool[6], pool[7]],
    ];
    for (const [i, step] of steps.entries()) {
      const segs = rows(step);
      const x = rng.normalArray(segs.length * IN, 1);
      const got = await delta(segs, x, cache);
      const want = await delta(segs, x);
      assert.ok(maxAbsDiff(got, want) < 1e-5, `step ${i}: max |Δ| = ${maxAbsDiff(got, want)}`);
      assert.ok(cache.size <= 3, `step ${i}: ${cache.size} chunks`);
    }
    cache.clear();
    assert.equal(tf.memory().numTensors, before);
    pool.forEach((a) => a.dispose());
  });

  test('an adapter leaving keeps the chunk; one joining adds a chunk; a fourth chunk compacts to one', async () => {
    const rng = new SeededRandom(6);
    const [a, b, c, d, e] = Array.from({ length: 5 }, (_, i) => adapter(`x${i}`, 4, rng));
    const cache = new LoraStackCache({ maxChunks: 3 });
    const run = (as: LoraAdapter[]) => delta(rows(as), rng.normalArray(as.length * IN, 1), cache);
    await run([a, b, c]);
    const first = cache.plan(new Set([a, b, c]))[0];
    await run([a, c]);
    assert.equal(cache.size, 1);
    assert.equal(cache.plan(new Set([a, c]))[0], first, 'the same chunk object is reused after b left');
    await run([a, c, d]);
    assert.equal(cache.size, 2);
    await run([a, c, d, e]);
    assert.equal(cache.size, 3);
    await run([a, c, d, e, b]); // b was still in the first chunk: nothing new
    assert.equal(cache.size, 3);
    const f = adapter('f', 4, rng);
    await run([a, f]);
    // {d} and {e} have no active member: dropped; {a,b,c} stays (dead ranks 8 ≤ live 8), {f} is added
    assert.equal(cache.size, 2);
    await run([f, d]);
    // {a,b,c} dropped, {d} added
    assert.equal(cache.size, 2);
    await run([f, d, e]);
    assert.equal(cache.size, 3);
    const g = adapter('g', 4, rng);
    await run([f, d, e, g]);
    // a fourth chunk would exceed maxChunks: everything is rebuilt as one chunk of the active set
    assert.equal(cache.size, 1);
    assert.deepEqual(cache.plan(new Set([f, d, e, g]))[0].adapters.map((x) => x.id).sort(), ['f', 'g', 'x3', 'x4']);
    await run([f, a]);
    // dead ranks (d, e, g: 12) outweigh live (f, a: 8): compacted to one chunk {a, f}
    assert.equal(cache.size, 1);
    g.dispose();
    cache.clear();
    [a, b, c, d, e, f].forEach((x) => x.dispose());
  });

  test('a chunk member evicted from device is left out of stacks built later', async () => {
    const rng = new SeededRandom(7);
    const a = adapter('a', 4, rng);
    const b = adapter('b', 4, rng);
    const cache = new LoraStackCache();
    const [chunk] = cache.plan(new Set([a, b]));
    b.dispose();
    const stack = chunk.stack(0, 'q_proj');
    assert.deepEqual(stack?.members.map((m) => m.adapter.id), ['a']);
    assert.deepEqual(stack?.aCat.shape, [IN, 4]);
    cache.clear();
    a.dispose();
  });
});
