import assert from 'node:assert/strict';
import { test } from 'node:test';
import { addStep, computeRdp, DEFAULT_RDP_ORDERS, epsilonOf, noiseMultiplierFor, privacySpent } from '../../../src/federation/privacy/rdp-accountant.js';
import { withCode } from '../../helpers/error-matchers.js';

/** |got − want| < 0.5·10^−places, as Python's assertAlmostEqual(places=…). */
function almost(got: number, want: number, places: number, what: string): void {
  assert.ok(Math.abs(got - want) < 0.5 * 10 ** -places, `${what}: ${got} vs ${want} to ${places} places`);
}

test("Opacus's RDPAccountant test: σ = 1.5, q = 0.04, 2250 steps, δ = 1e-5 gives ε = 7.32911117143 (7 places)", () => {
  const { epsilon } = epsilonOf([{ noiseMultiplier: 1.5, sampleRate: 0.04, steps: 2250 }], 1e-5);
  almost(epsilon, 7.32911117143, 7, 'ε');
});

test('2250 single steps composed as Opacus accounts them give the same ε as one stretch', () => {
  let history: ReturnType<typeof addStep> = [];
  for (let i = 0; i < 2250; i++) history = addStep(history, 1.5, 0.04);
  assert.deepEqual(history, [{ noiseMultiplier: 1.5, sampleRate: 0.04, steps: 2250 }]);
});

test("Opacus's get_noise_multiplier tests: ε = 8, δ = 1e-5, q = 0.04 needs σ = 1.416 over 90 epochs and 1.3562 over 2000 steps (4 places)", () => {
  almost(noiseMultiplierFor(8, 1e-5, 0.04, Math.floor(90 / 0.04)), 1.416, 4, 'σ (90 epochs)');
  almost(noiseMultiplierFor(8, 1e-5, 0.04, 2000), 1.3562, 4, 'σ (2000 steps)');
});

test("the σ found is never above the target ε (Opacus's overshoot property) and within the search tolerance of it", () => {
  for (const [eps, q, steps, delta] of [
    [1, 0.01, 1000, 1e-5],
    [3.7, 0.002, 25_000, 1e-6],
    [9.5, 0.1, 300, 1e-4],
  ]) {
    const sigma = noiseMultiplierFor(eps, delta, q, steps);
    const got = epsilonOf([{ noiseMultiplier: sigma, sampleRate: q, steps }], delta).epsilon;
    assert.ok(got < eps && eps - got <= 0.01, `ε ${got} for target ${eps}`);
  }
});

test("TF Privacy's rdp_accountant tests: scalar and sequence RDP values, q = 0 and q = 1", () => {
  almost(computeRdp(0.1, 2, 10, [5])[0], 0.07737, 5, 'compute_rdp(0.1, 2, 10, 5)');
  const want = [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307, Infinity];
  computeRdp(0.01, 2.5, 50, [1.5, 2.5, 5, 50, 100, Infinity]).forEach((got, i) => {
    if (want[i] === Infinity) assert.equal(got, Infinity);
    else assert.ok(Math.abs(got - want[i]) < 1e-5, `order ${[1.5, 2.5, 5, 50, 100][i]}: ${got} vs ${want[i]}`);
  });
  assert.deepEqual(computeRdp(0, 10, 1, [20]), [0]);
  assert.deepEqual(computeRdp(1, 10, 1, [20]), [0.1]);
});

test("Opacus's docstring example: two compositions, orders 2..32, δ = 1e-5 → ε 0.336 at order 23", () => {
  const orders = Array.from({ length: 31 }, (_, i) => i + 2);
  const a = computeRdp(1e-5, 1.0, 10, orders);
  const b = computeRdp(1e-4, 3.0, 4, orders);
  const { epsilon, order } = privacySpent(orders, a.map((x, i) => x + b[i]), 1e-5);
  almost(epsilon, 0.336, 3, 'ε');
  assert.equal(order, 23);
});

test('the fractional-order series meets the integer-order sum at integer orders', () => {
  for (const [q, sigma] of [
    [0.01, 1.1],
    [0.2, 3],
  ]) {
    const [atInt] = computeRdp(q, sigma, 1, [7]);
    const [near] = computeRdp(q, sigma, 1, [7 + 1e-9]);
    assert.ok(Math.abs(atInt - near) < 1e-7 * Math.max(1, atInt), `${atInt} vs ${near}`);
  }
});

test("Opacus's default orders: 1.1 … 10.9 by tenths, then 12 … 63", () => {
  assert.equal(DEFAULT_RDP_ORDERS.length, 99 + 52);
  assert.equal(DEFAULT_RDP_ORDERS[0], 1.1);
  assert.equal(DEFAULT_RDP_ORDERS[98], 10.9);
  assert.equal(DEFAULT_RDP_ORDERS[99], 12);
  assert.equal(DEFAULT_RDP_ORDERS.at(-1), 63);
});

test('no noise means no privacy: ε is infinite; bad arguments are refused with FED_DP_INVALID', () => {
  assert.equal(epsilonOf([{ noiseMultiplier: 0, sampleRate: 0.5, steps: 3 }], 1e-5).epsilon, Infinity);
  assert.throws(() => computeRdp(1.5, 1, 1), withCode('FED_DP_INVALID'));
  assert.throws(() => computeRdp(0.5, -1, 1), withCode('FED_DP_INVALID'));
  assert.throws(() => privacySpent([2], [1], 0), withCode('FED_DP_INVALID'));
  assert.throws(() => noiseMultiplierFor(1e-9, 1e-5, 1, 10_000), withCode('FED_DP_BUDGET_EXCEEDED'));
});
