import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { DecodeBatchCache } from '../../../src/model/forward/kv-cache.js';
import { forwardDecode, forwardSequences } from '../../../src/model/forward/llama-model.js';
import { logSoftmax, referenceForward } from '../../reference/llama-reference.js';
import { maxAbsDiff, memoryAdapter, memoryModel, TINY_CONFIGS, toF64, useWasm } from '../../helpers/tiny-models.js';

const PROMPT = [1, 7, 22, 5, 60, 13, 13, 40, 9, 31];

before(useWasm);

describe('forward pass matches a float64 transformers reference', () => {
  for (const [name, cfg] of Object.entries(TINY_CONFIGS)) {
    test(`${name}: logprobs at every position agree to 1e-4`, async () => {
      const { model, weights } = memoryModel(cfg, 11);
      try {
        const logits = forwardSequences(model, [{ tokens: PROMPT, adapter: null, logits: 'all' }]);
        const got = await logits.array();
        logits.dispose();
        const want = referenceForward(cfg, toF64(weights), PROMPT);
        for (let t = 0; t < PROMPT.length; t++) {
          const diff = maxAbsDiff(logSoftmax(got[t]), logSoftmax(want[t]));
          assert.ok(diff < 1e-4, `position ${t}: max |Δlogprob| = ${diff}`);
        }
      } finally {
        model.dispose();
      }
    });
  }
});

describe('KV cache', () => {
  for (const name of ['gqa', 'mistralWindow', 'llama3Rope']) {
    test(`${name}: cached token-by-token decoding equals full recomputation`, async () => {
      const cfg = TINY_CONFIGS[name];
      const { model } = memoryModel(cfg, 5);
      const cache = model.newCache();
      try {
        const full = forwardSequences(model, [{ tokens: PROMPT, adapter: null, logits: 'all' }]);
        const fullRows = await full.array();
        full.dispose();
        // prefill 4 tokens, then one at a time
        const first = forwardSequences(model, [{ tokens: PROMPT.slice(0, 4), cache, adapter: null, logits: 'last' }]);
        const rows: number[][] = [(await first.array())[0]];
        first.dispose();
        for (let t = 4; t < PROMPT.length; t++) {
          const step = forwardSequences(model, [{ tokens: [PROMPT[t]], cache, adapter: null, logits: 'last' }]);
          rows.push((await step.array())[0]);
          step.dispose();
        }
        for (let t = 3; t < PROMPT.length; t++) {
          assert.ok(maxAbsDiff(rows[t - 3], fullRows[t]) < 1e-4, `position ${t}`);
        }
        assert.equal(cache.length, PROMPT.length);
      } finally {
        cache.dispose();
        model.dispose();
      }
    });
  }

  test('packed decode batch with different lengths and adapters equals each sequence alone', async () => {
    const cfg = TINY_CONFIGS.mistralWindow;
    const { model } = memoryModel(cfg, 9);
    const { adapter: a } = memoryAdapter(cfg, { id: 'a', targets: ['q_proj', 'v_proj', 'down_proj'], rank: 4, scale: 2 }, 1);
    const { adapter: b } = memoryAdapter(cfg, { id: 'b', targets: ['k_proj', 'o_proj', 'up_proj', 'gate_proj'], rank: 8, scale: 0.5 }, 2);
    const prompts = [PROMPT.slice(0, 3), PROMPT, PROMPT.slice(2, 8)];
    const adapters = [a, null, b];
    const next = [[4, 17, 33], [8, 9, 10], [55, 0, 3]];
    try {
      // batched: prefill all, pack, three decode steps
      const caches = prompts.map(() => model.newCache());
      forwardSequences(model, prompts.map((p, i) => ({ tokens: p, cache: caches[i], adapter: adapters[i], logits: 'none' as const }))).dispose();
      const batch = DecodeBatchCache.pack(caches, model.config.slidingWindow);
      caches.forEach((c) => c.dispose());
      const batched: number[][][] = [];
      for (let s = 0; s < 3; s++) {
        const l = forwardDecode(model, batch, next.map((n) => n[s]), adapters);
        batched.push(await l.array());
        l.dispose();
      }
      batch.dispose();
      // alone: full recomputation per sequence
      for (let i = 0; i < prompts.length; i++) {
        const seq = [...prompts[i], ...next[i]];
        const l = forwardSequences(model, [{ tokens: seq, adapter: adapters[i], logits: 'all' }]);
        const rows = await l.array();
        l.dispose();
        for (let s = 0; s < 3; s++) {
          const diff = maxAbsDiff(batched[s][i], rows[prompts[i].length + s]);
          assert.ok(diff < 1e-4, `sequence ${i} step ${s}: ${diff}`);
        }
      }
    } finally {
      a.dispose();
      b.dispose();
      model.dispose();
    }
  });
});

describe('LoRA in the forward pass', () => {
  test('unmerged heterogeneous LoRA matches the float64 reference per sequence', async () => {
    const cfg = TINY_CONFIGS.gqa;
    const { model, weights } = memoryModel(cfg, 3);
    const x = memoryAdapter(cfg, { id: 'x', targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj'], rank: 4, scale: 2 }, 7);
    const y = memoryAdapter(cfg, { id: 'y', targets: ['gate_proj', 'up_proj', 'down_proj', 'v_proj'], rank: 16, scale: 0.25, layers: [1] }, 8);
    try {
      const seqs = [PROMPT.slice(0, 6), PROMPT, PROMPT.slice(3)];
      const ads = [x, null, y];
      const logits = forwardSequences(
        model,
        seqs.map((s, i) => ({ tokens: s, adapter: ads[i]?.adapter ?? null, logits: 'all' as const })),
      );
      const got = await logits.array();
      logits.dispose();
      let row = 0;
      seqs.forEach((s, i) => {
        const want = referenceForward(cfg, toF64(weights), s, ads[i]?.reference);
        for (let t = 0; t < s.length; t++, row++) {
          const diff = maxAbsDiff(logSoftmax(got[row]), logSoftmax(want[t]));
          assert.ok(diff < 1e-4, `sequence ${i} position ${t}: ${diff}`);
        }
      });
    } finally {
      x.adapter.dispose();
      y.adapter.dispose();
      model.dispose();
    }
  });

  test('unmerged LoRA equals a forward with merged weights W + s·B·A', async () => {
    const cfg = TINY_CONFIGS.mha;
    const { model, weights } = memoryModel(cfg, 21);
    const { adapter, reference } = memoryAdapter(cfg, { id: 'm', targets: ['q_proj', 'o_proj', 'up_proj'], rank: 8, scale: 1.5 }, 4);
    const merged = new Map(weights);
    for (const [path, m] of reference.modules) {
      const w = Float32Array.from(weights.get(`${path}.weight`)!);
      const inF = m.a.length / m.rank;
      const outF = m.b.length / m.rank;
      for (let o = 0; o < outF; o++) {
        for (let i = 0; i < inF; i++) {
          let s = 0;
          for (let k = 0; k < m.rank; k++) s += m.b[o * m.rank + k] * m.a[k * inF + i];
          w[o * inF + i] += m.scale * s;
        }
      }
      merged.set(`${path}.weight`, w);
    }
    const { model: mergedModel } = memoryModelFrom(cfg, merged);
    try {
      const a = forwardSequences(model, [{ tokens: PROMPT, adapter, logits: 'all' }]);
      const b = forwardSequences(mergedModel, [{ tokens: PROMPT, adapter: null, logits: 'all' }]);
      const diff = maxAbsDiff(await a.data(), await b.data());
      a.dispose();
      b.dispose();
      assert.ok(diff < 1e-4, `max |Δlogit| = ${diff}`);
    } finally {
      adapter.dispose();
      model.dispose();
      mergedModel.dispose();
    }
  });
});

import { LlamaModel } from '../../../src/model/forward/llama-model.js';
import { llamaWeightsFromArrays } from '../../../src/model/architecture/llama-weights.js';
import { parseModelConfig } from '../../../src/model/architecture/model-config.js';

function memoryModelFrom(cfg: Record<string, unknown>, weights: Map<string, Float32Array>): { model: LlamaModel } {
  const config = parseModelConfig(cfg);
  return { model: new LlamaModel(config, llamaWeightsFromArrays(config, weights)) };
}

test('a forward pass leaves no tensors behind', async () => {
  const { model } = memoryModel(TINY_CONFIGS.gqa, 1);
  const before = tf.memory().numTensors;
  for (let i = 0; i < 5; i++) {
    const cache = model.newCache();
    forwardSequences(model, [{ tokens: PROMPT, cache, adapter: null, logits: 'last' }]).dispose();
    cache.dispose();
  }
  assert.equal(tf.memory().numTensors, before);
  model.dispose();
});
