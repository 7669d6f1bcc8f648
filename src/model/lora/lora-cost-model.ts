import * as tf from '@tensorflow/tfjs-core';
import type { LoraCostModel } from './lora-batch.js';

/** Seconds per call of `op`, over `reps` calls, synchronising once at the end. */
function secondsPerCall(op: () => tf.Tensor, reps: number): number {
  const out: tf.Tensor[] = [];
  const t0 = performance.now();
  for (let i = 0; i < reps; i++) out.push(op());
  out[out.length - 1].dataSync();
  const s = (performance.now() - t0) / 1000 / reps;
  for (const t of out) t.dispose();
  return s;
}

/**
 * Measures LoraCostModel's three constants on the running backend in ~0.2 s: the FLOP rate of a
 * decode-sized matMul, the fixed cost of a tiny op, and the cost per float of an element-wise op.
 * WASM_COST_MODEL was measured on one wasm machine; native backends differ by 10× and more, and
 * the stacked/segmented choice follows these numbers.
 */
export function measureLoraCostModel(): LoraCostModel {
  const a = tf.randomNormal([64, 576]);
  const b = tf.randomNormal([576, 576]);
  const one = tf.scalar(1);
  const big = tf.randomNormal([1 << 20]);
  try {
    // first calls pay one-time setup (kernel init, weight packing)
    secondsPerCall(() => tf.matMul(a, b), 2);
    secondsPerCall(() => tf.add(one, one), 5);
    secondsPerCall(() => tf.add(big, big), 1);
    // medians of three: a VM's speed jitters by 2× from one 10 ms window to the next
    const median = (f: () => number) => [f(), f(), f()].sort((x, y) => x - y)[1];
    const matMul = median(() => secondsPerCall(() => tf.matMul(a, b), 8));
    const op = median(() => secondsPerCall(() => tf.add(one, one), 200));
    const elementwise = median(() => secondsPerCall(() => tf.add(big, big), 4));
    return {
      flopsPerSecond: (2 * 64 * 576 * 576) / matMul,
      secondsPerOp: op,
      secondsPerElement: Math.max(elementwise - op, 0) / big.size,
    };
  } finally {
    for (const t of [a, b, one, big]) t.dispose();
  }
}

/** "15.2 GFLOP/s, 18 µs per op, 3.1 ns per float", for the startup log. */
export function describeLoraCostModel(c: LoraCostModel): string {
  return `${(c.flopsPerSecond / 1e9).toFixed(1)} GFLOP/s, ${(c.secondsPerOp * 1e6).toFixed(0)} µs per op, ${(c.secondsPerElement * 1e9).toFixed(1)} ns per float`;
}
