import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseModelConfig } from '../../../src/model/architecture/model-config.js';
import { parseJobSpec } from '../../../src/federation/job-spec.js';
import { accountRound, epsilonAfterRound, planPrivacy, roundSampleRate } from '../../../src/federation/privacy/privacy-plan.js';
import { epsilonOf } from '../../../src/federation/privacy/rdp-accountant.js';
import { withCode } from '../../helpers/error-matchers.js';
import { TINY_CONFIGS } from '../../helpers/tiny-models.js';

const model = parseModelConfig(TINY_CONFIGS.gqa);
const spec = (extra: Record<string, unknown>) => parseJobSpec({ target_adapter_id: 'dp-x', method: 'ffa', clients_per_round: 2, rounds: 10, ...extra }, model, 64);

test('client-level sampling rate: clients_per_round / compatible clients, 1 for a fixed list or too few clients', () => {
  assert.equal(roundSampleRate(spec({ dp: { level: 'client', clip_norm: 1, noise_multiplier: 1 } }), 8), 0.25);
  assert.equal(roundSampleRate(spec({ dp: { level: 'client', clip_norm: 1, noise_multiplier: 1 } }), 1), 1);
  assert.equal(roundSampleRate(parseJobSpec({ target_adapter_id: 'x', method: 'ffa', clients: ['a', 'b'], dp: { level: 'client', clip_norm: 1, noise_multiplier: 1 } }, model, 64), 100), 1);
});

test('a plan that would spend more than target_epsilon is refused, naming the ε it would reach', () => {
  const s = spec({ dp: { level: 'client', clip_norm: 1, noise_multiplier: 0.8, target_epsilon: 2, delta: 1e-5 } });
  const would = epsilonOf([{ noiseMultiplier: 0.8, sampleRate: 0.25, steps: 10 }], 1e-5).epsilon;
  assert.ok(would > 2);
  assert.throws(() => planPrivacy(s, 8), withCode('FED_DP_BUDGET_EXCEEDED', `ε = ${would.toPrecision(6)}`, 'target_epsilon 2'));
});

test('without noise_multiplier the plan takes the smallest σ that keeps all planned rounds under target_epsilon', () => {
  const plan = planPrivacy(spec({ dp: { level: 'client', clip_norm: 0.5, target_epsilon: 3, delta: 1e-5 } }), 8);
  assert.ok(plan.planned_epsilon! <= 3 && plan.planned_epsilon! > 2.99, String(plan.planned_epsilon));
  assert.equal(plan.planned_sample_rate, 0.25);
  assert.equal(plan.epsilon, 0);
  assert.equal(plan.clip_norm, 0.5);
});

test('each published round adds one step at its own sampling rate; ε after the next round is what accounting it gives', () => {
  let plan = planPrivacy(spec({ dp: { level: 'client', clip_norm: 1, noise_multiplier: 1.2, delta: 1e-6 } }), 8);
  const ahead = epsilonAfterRound(plan, 0.25);
  plan = accountRound(plan, 0.25);
  assert.equal(plan.epsilon, ahead.epsilon);
  plan = accountRound(accountRound(plan, 0.25), 0.5);
  assert.deepEqual(plan.history, [
    { noiseMultiplier: 1.2, sampleRate: 0.25, steps: 2 },
    { noiseMultiplier: 1.2, sampleRate: 0.5, steps: 1 },
  ]);
  assert.equal(plan.epsilon, epsilonOf(plan.history, 1e-6).epsilon);
});

test('job specs: dp and robust options are checked with named codes', () => {
  assert.throws(() => spec({ dp: { level: 'client', clip_norm: 1 } }), withCode('FED_DP_INVALID', 'noise_multiplier'));
  assert.throws(() => spec({ dp: { level: 'sample', clip_norm: 1, target_epsilon: 3 } }), withCode('FED_DP_INVALID', 'noise_multiplier'));
  assert.doesNotThrow(() => spec({ dp: { level: 'sample', clip_norm: 1, noise_multiplier: 1 }, robust: { rule: 'median' } }));
  assert.throws(() => spec({ method: 'fedsb', dp: { level: 'sample', clip_norm: 1, noise_multiplier: 1 } }), withCode('FED_DP_UNSUPPORTED', 'init'));
  assert.throws(() => spec({ method: 'fedsb', dp: { level: 'client', clip_norm: 1, noise_multiplier: 1 } }), withCode('FED_DP_UNSUPPORTED', 'init'));
  assert.doesNotThrow(() => spec({ method: 'fedsb', fedsb: { init: 'random' }, dp: { level: 'client', clip_norm: 1, noise_multiplier: 1 } }));
  assert.throws(() => spec({ dp: { level: 'client', clip_norm: 1, noise_multiplier: 1 }, robust: { rule: 'median' } }), withCode('FED_DP_UNSUPPORTED', 'median'));
  assert.throws(() => spec({ method: 'fedavg', robust: { rule: 'trimmed_mean', beta: 0.2 } }), withCode('FED_ROBUST_UNSUPPORTED', 'coordinate'));
  assert.throws(() => spec({ method: 'flora', robust: { rule: 'median' } }), withCode('FED_ROBUST_UNSUPPORTED'));
  assert.throws(() => spec({ clients_per_round: 4, robust: { rule: 'krum', f: 1 } }), withCode('FED_ROBUST_UNSUPPORTED', 'min_clients ≥ 5'));
  assert.doesNotThrow(() => spec({ clients_per_round: 5, robust: { rule: 'krum', f: 1, m: 3 } }));
  assert.throws(() => spec({ robust: { rule: 'median', beta: 0.1 } }), withCode('FED_JOB_INVALID', 'beta'));
  assert.throws(() => spec({ robust: {} }), withCode('FED_JOB_INVALID'));
  assert.throws(() => spec({ dp: { level: 'client', clip_norm: -1, noise_multiplier: 1 } }), withCode('FED_JOB_INVALID', 'clip_norm'));
});
