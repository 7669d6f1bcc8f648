import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { nativeSgmvAvailable } from '../../../src/model/backend/native-lora.js';
import { LoraBatch } from '../../../src/model/lora/lora-batch.js';
import { LoraAdapter, loraModuleKey } from '../../../src/model/lora/lora-adapter.js';
import { describeLoraCostModel, measureLoraCostModel } from '../../../src/model/lora/lora-cost-model.js';
import { useWasm } from '../../helpers/tiny-models.js';

before(useWasm);

test('the cost model measured on the running backend has finite positive constants and leaves no tensors', () => {
  const before = tf.memory().numTensors;
  const c = measureLoraCostModel();
  assert.equal(tf.memory().numTensors, before);
  for (const v of [c.flopsPerSecond, c.secondsPerOp]) assert.ok(Number.isFinite(v) && v > 0, describeLoraCostModel(c));
  assert.ok(Number.isFinite(c.secondsPerElement) && c.secondsPerElement >= 0);
  assert.match(describeLoraCostModel(c), /GFLOP\/s, \d+ µs per op, [\d.]+ ns per float/);
});

test("'auto' follows the cost model it is given (free ops favour segmented, costly ops favour stacked), or takes the native kernel where it is loaded", () => {
  const mk = (id: string) =>
    new LoraAdapter(id, new Map([[loraModuleKey(0, 'q_proj'), { aT: tf.ones([8, 4]) as tf.Tensor2D, bT: tf.ones([4, 8]) as tf.Tensor2D, rank: 4, scale: 1 }]]), new Set(['q_proj']));
  const adapters = [mk('a'), mk('b'), mk('c')];
  const segments = adapters.map((adapter, start) => ({ start, count: 1, adapter }));
  const choose = (cost: { flopsPerSecond: number; secondsPerOp: number; secondsPerElement: number }) => {
    const lora = new LoraBatch(segments, 3, { strategy: 'auto', cost });
    tf.tidy(() => void lora.delta(0, 'q_proj', tf.ones([3, 8]) as tf.Tensor2D));
    lora.dispose();
    return lora.lastChoice;
  };
  // the native SGMV kernel has exact FLOPs and one op per projection: the cost model is moot there
  const native = nativeSgmvAvailable();
  assert.equal(choose({ flopsPerSecond: 1e6, secondsPerOp: 0, secondsPerElement: 0 }), native ? 'native' : 'segmented');
  assert.equal(choose({ flopsPerSecond: 1e15, secondsPerOp: 1, secondsPerElement: 0 }), native ? 'native' : 'stacked');
  adapters.forEach((a) => a.dispose());
});
