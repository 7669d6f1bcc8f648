import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { RequestError } from '../../src/errors.js';
import { argmax, logSoftmax, TokenSampler, topLogprobs } from '../../src/serving/sampler.js';

const logits = Float32Array.from([1, 3, 2, 3, -1, 0.5]);

describe('sampling', () => {
  test('logSoftmax is normalised and shift-invariant', () => {
    const lp = logSoftmax(logits);
    const mass = lp.reduce((s, v) => s + Math.exp(v), 0);
    assert.ok(Math.abs(mass - 1) < 1e-12);
    const shifted = logSoftmax(logits.map((v) => v + 1000));
    lp.forEach((v, i) => assert.ok(Math.abs(v - shifted[i]) < 1e-9));
  });

  test('greedy picks the first maximum, as torch.argmax does', () => {
    assert.equal(argmax(logits), 1);
    assert.equal(new TokenSampler({ temperature: 0, topP: 1, topK: -1 }).sample(logits), 1);
  });

  test('topLogprobs returns the n best, most likely first, lower id first on ties', () => {
    const top = topLogprobs(logSoftmax(logits), 3);
    assert.deepEqual(top.map((t) => t.tokenId), [1, 3, 2]);
  });

  test('the same seed gives the same tokens; the draw follows the distribution', () => {
    const draw = (seed: number) => {
      const s = new TokenSampler({ temperature: 1, topP: 1, topK: -1, seed });
      return Array.from({ length: 2000 }, () => s.sample(logits));
    };
    assert.deepEqual(draw(42), draw(42));
    assert.notDeepEqual(draw(42), draw(43));
    const counts = new Array(logits.length).fill(0);
    for (const t of draw(7)) counts[t]++;
    const p = logSoftmax(logits).map(Math.exp);
    counts.forEach((c, i) => assert.ok(Math.abs(c / 2000 - p[i]) < 0.04, `token ${i}: ${c / 2000} vs ${p[i]}`));
  });

  test('top-k keeps only the k most likely tokens', () => {
    const s = new TokenSampler({ temperature: 1, topP: 1, topK: 2, seed: 1 });
    const seen = new Set(Array.from({ length: 500 }, () => s.sample(logits)));
    assert.deepEqual([...seen].sort(), [1, 3]);
  });

  test('top-p keeps the smallest set whose mass reaches p', () => {
    // probabilities of tokens 1 and 3 are ~0.39 each: p = 0.5 needs both, p = 0.3 only the first
    const both = new TokenSampler({ temperature: 1, topP: 0.5, topK: -1, seed: 3 });
    assert.deepEqual([...new Set(Array.from({ length: 500 }, () => both.sample(logits)))].sort(), [1, 3]);
    const one = new TokenSampler({ temperature: 1, topP: 0.3, topK: -1, seed: 3 });
    assert.deepEqual([...new Set(Array.from({ length: 200 }, () => one.sample(logits)))], [1]);
  });

  test('invalid parameters are refused with REQUEST_INVALID', () => {
    for (const bad of [{ temperature: -1 }, { topP: 0 }, { topP: 1.5 }, { topK: 1.5 }]) {
      assert.throws(
        () => new TokenSampler({ temperature: 1, topP: 1, topK: -1, ...bad }),
        (e: unknown) => e instanceof RequestError && e.code === 'REQUEST_INVALID',
      );
    }
  });
});
