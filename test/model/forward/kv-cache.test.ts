import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { DecodeBatchCache } from '../../../src/model/forward/kv-cache.js';
import { forwardDecode, forwardSequences, type LlamaModel } from '../../../src/model/forward/llama-model.js';
import type { LoraAdapter } from '../../../src/model/lora/lora-adapter.js';
import { maxAbsDiff, memoryAdapter, memoryModel, TINY_CONFIGS, useWasm } from '../../helpers/tiny-models.js';

before(useWasm);

function prefill(model: LlamaModel, tokens: number[], adapter: LoraAdapter | null) {
  const cache = model.newCache();
  forwardSequences(model, [{ tokens, cache, adapter, logits: 'none' }]).dispose();
  return cache;
}

/** Last-position logits of the whole sequence recomputed from scratch. */
async function alone(model: LlamaModel, tokens: number[], adapter: LoraAdapter | null): Promise<number[]> {
  const l = forwardSequences(model, [{ tokens, adapter, logits: 'last' }]);
  const rows = (await l.array()) as number[][];
  l.dispose();
  return rows[0];
}

/**
 * 40 decode steps (past the batch's first capacity, so layers grow), a row dropped at step 8
 * (capacity given back once the longest row shrinks), a row re-packed from the batch next to a
 * new prefilled sequence at step 20: every row's logits at every step equal recomputation.
 */
async function growDropRepack(cfgName: string): Promise<void> {
  const cfg = TINY_CONFIGS[cfgName];
  const { model } = memoryModel(cfg, 21);
  const { adapter: a } = memoryAdapter(cfg, { id: 'a', targets: ['q_proj', 'k_proj', 'v_proj', 'down_proj'], rank: 4, scale: 2 }, 3);
  const before = tf.memory().numTensors;
  const seqs: { tokens: number[]; adapter: LoraAdapter | null }[] = [
    { tokens: [3, 9, 14], adapter: a },
    { tokens: Array.from({ length: 30 }, (_, i) => (i * 7) % 50), adapter: null },
    { tokens: [5, 1, 2, 8, 13, 21], adapter: null },
  ];
  let live = [0, 1, 2];
  let batch = DecodeBatchCache.repack(undefined, seqs.map((s) => ({ cache: prefill(model, s.tokens, s.adapter) })), model.config.slidingWindow);
  try {
    for (let step = 0; step < 40; step++) {
      if (step === 8) {
        live = [0, 2];
        batch.keepRows([0, 2]);
      }
      if (step === 20) {
        const fresh = { tokens: [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], adapter: a };
        seqs.push(fresh);
        batch = DecodeBatchCache.repack(batch, [{ cache: prefill(model, fresh.tokens, fresh.adapter) }, { row: 1 }], model.config.slidingWindow);
        live = [3, 2];
      }
      const next = live.map((i) => (step * 13 + i * 5) % 60);
      const logits = forwardDecode(model, batch, next, live.map((i) => seqs[i].adapter));
      const rows = (await logits.array()) as number[][];
      logits.dispose();
      for (let b = 0; b < live.length; b++) {
        const s = seqs[live[b]];
        s.tokens.push(next[b]);
        const diff = maxAbsDiff(rows[b], await alone(model, s.tokens, s.adapter));
        assert.ok(diff < 1e-4, `step ${step}, sequence ${live[b]}: max |Δlogit| = ${diff}`);
      }
    }
    assert.ok(batch.capacity > 0);
  } finally {
    batch.dispose();
  }
  assert.equal(tf.memory().numTensors, before, 'the batch frees every tensor it made');
  a.dispose();
  model.dispose();
}

for (const name of ['gqa', 'mistralWindow']) {
  test(`${name}: in-place decode cache grows, drops and re-packs rows and still equals recomputation`, () => growDropRepack(name));
}

test('the functional KV write (backends without in-place tensors) gives the same result', async () => {
  process.env.LORA_GATEWAY_KV_IN_PLACE = 'off';
  try {
    await growDropRepack('gqa');
  } finally {
    delete process.env.LORA_GATEWAY_KV_IN_PLACE;
  }
});

test('a batch keeps headroom past its longest row, so most decode steps write in place', () => {
  const cfg = TINY_CONFIGS.gqa;
  const { model } = memoryModel(cfg, 2);
  const caches = [prefill(model, [1, 2, 3], null), prefill(model, Array.from({ length: 40 }, (_, i) => i), null)];
  const batch = DecodeBatchCache.pack(caches, undefined);
  caches.forEach((c) => c.dispose());
  try {
    assert.ok(batch.capacity >= 40 + 16, `capacity ${batch.capacity}`);
    const cap = batch.capacity;
    for (let s = 0; s < cap - 40; s++) forwardDecode(model, batch, [1, 1], [null, null]).dispose();
    assert.equal(batch.capacity, cap, 'no growth while the longest row fits');
    forwardDecode(model, batch, [1, 1], [null, null]).dispose();
    assert.ok(batch.capacity > cap, 'grows once the longest row reaches the capacity');
  } finally {
    batch.dispose();
    model.dispose();
  }
});

test('dropping the longest row gives columns back in every layer alike, and decoding goes on equal to recomputation', async () => {
  const cfg = TINY_CONFIGS.gqa;
  const { model } = memoryModel(cfg, 5);
  assert.ok(model.config.numLayers > 1, 'the shrink must reach layers past the first');
  const before = tf.memory().numTensors;
  const short = [4, 8, 15];
  const long = Array.from({ length: 80 }, (_, i) => (i * 11) % 50);
  const batch = DecodeBatchCache.repack(undefined, [{ cache: prefill(model, short, null) }, { cache: prefill(model, long, null) }], model.config.slidingWindow);
  try {
    const wide = batch.capacity;
    batch.keepRows([0]);
    assert.ok(batch.capacity < wide / 2, `capacity ${wide} → ${batch.capacity}: given back once the longest row needs less than half`);
    for (let step = 0; step < 3; step++) {
      const logits = forwardDecode(model, batch, [step + 1], [null]);
      const row = ((await logits.array()) as number[][])[0];
      logits.dispose();
      short.push(step + 1);
      assert.ok(maxAbsDiff(row, await alone(model, short, null)) < 1e-4, `step ${step}`);
    }
  } finally {
    batch.dispose();
  }
  assert.equal(tf.memory().numTensors, before);
  model.dispose();
});
