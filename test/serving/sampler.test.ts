import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { RequestError } from '../../src/errors.js';
import { argmax, logSoftmax, TokenSampler, topLogprobs } from '../../src/serving/sampler.js';
import { SeededRandom } from '../../src/model/synthetic/seeded-random.js';

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

describe('presence / frequency penalties and logit_bias (OpenAI and vLLM semantics)', () => {
  /** The reference: l'[t] = l[t] + bias[t] − presence·[c[t] > 0] − frequency·c[t], in float64, argmax. */
  function referenceGreedy(rows: Float32Array[], presence: number, frequency: number, bias: Map<number, number>): number[] {
    const counts = new Map<number, number>();
    return rows.map((row) => {
      let best = -1;
      let bestV = -Infinity;
      row.forEach((x, t) => {
        const c = counts.get(t) ?? 0;
        const v = x + (bias.get(t) ?? 0) - (c > 0 ? presence : 0) - frequency * c;
        if (v > bestV) {
          bestV = v;
          best = t;
        }
      });
      counts.set(best, (counts.get(best) ?? 0) + 1);
      return best;
    });
  }

  test('greedy choices under penalties and bias match the reference over 40 steps of random logits', () => {
    const rng = new SeededRandom(9);
    // a few tokens clearly ahead, so that without penalties the same ones repeat
    const rows = Array.from({ length: 40 }, () => Float32Array.from({ length: 50 }, (_, t) => (t < 4 ? 3 : 0) + rng.normal() * 0.3));
    for (const [presence, frequency] of [
      [0, 0],
      [0.8, 0],
      [0, 0.6],
      [1.5, -0.3],
      [-1, 2],
    ]) {
      const bias: [number, number][] = [
        [7, 2.5],
        [1, -1],
      ];
      const s = new TokenSampler({ temperature: 0, topP: 1, topK: -1, presencePenalty: presence, frequencyPenalty: frequency, logitBias: bias });
      const got = rows.map((r) => s.sample(r));
      assert.deepEqual(got, referenceGreedy(rows, presence, frequency, new Map(bias)), `presence ${presence}, frequency ${frequency}`);
    }
  });

  test('logit_bias of +100 makes a token certain and −100 makes it impossible, at temperature 1', () => {
    const logits = Float32Array.from({ length: 30 }, (_, t) => (t === 3 ? 5 : 0));
    const up = new TokenSampler({ temperature: 1, topP: 1, topK: -1, seed: 1, logitBias: [[11, 100]] });
    assert.ok(Array.from({ length: 200 }, () => up.sample(logits)).every((t) => t === 11));
    const down = new TokenSampler({ temperature: 1, topP: 1, topK: -1, seed: 2, logitBias: [[3, -100]] });
    assert.ok(Array.from({ length: 200 }, () => down.sample(logits)).every((t) => t !== 3));
  });

  test('out-of-range penalties and biases are refused', () => {
    assert.throws(() => new TokenSampler({ temperature: 0, topP: 1, topK: -1, presencePenalty: 2.5 }), /presence_penalty/);
    assert.throws(() => new TokenSampler({ temperature: 0, topP: 1, topK: -1, logitBias: [[1, 101]] }), /logit_bias/);
  });
});
