import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { LoraAdapter, loraModuleKey } from '../../../src/model/lora/lora-adapter.js';
import { forwardSequences } from '../../../src/model/forward/llama-model.js';
import { memoryModel, TINY_CONFIGS, useWasm } from '../../helpers/tiny-models.js';

before(useWasm);

const TOKENS = [1, 8, 30, 4, 17, 22];

test('tf.grad runs through the forward pass to the LoRA weights and matches finite differences', () => {
  const { model } = memoryModel(TINY_CONFIGS.gqa, 4);
  const hidden = model.config.hiddenSize;
  const rank = 4;
  const aT0 = tf.randomNormal([hidden, rank], 0, 0.2, 'float32', 1) as tf.Tensor2D;
  const bT0 = tf.randomNormal([rank, hidden], 0, 0.2, 'float32', 2) as tf.Tensor2D;
  // negative log-likelihood of the next token, as local LoRA training will use it
  const loss = (aT: tf.Tensor2D, bT: tf.Tensor2D): tf.Scalar =>
    tf.tidy(() => {
      const adapter = new LoraAdapter('train', new Map([[loraModuleKey(1, 'o_proj'), { aT, bT, rank, scale: 2 }]]), new Set(['o_proj']));
      const logits = forwardSequences(model, [{ tokens: TOKENS.slice(0, -1), adapter, logits: 'all' }]);
      const logp = tf.logSoftmax(logits);
      const picked = tf.mul(logp, tf.oneHot(tf.tensor1d(TOKENS.slice(1), 'int32'), model.config.vocabSize));
      return tf.neg(tf.sum(picked)) as tf.Scalar;
    });
  const before = tf.memory().numTensors;
  const [gA, gB] = tf.grads((a: tf.Tensor, b: tf.Tensor) => loss(a as tf.Tensor2D, b as tf.Tensor2D))([aT0, bT0]);
  const gAData = gA.dataSync();
  const gBData = gB.dataSync();
  assert.ok(gAData.some((v) => v !== 0) && gBData.some((v) => v !== 0), 'gradients are non-zero');
  // central differences on a few entries of B (float32: use a generous step and tolerance)
  const eps = 1e-2;
  for (const idx of [0, 7, 45]) {
    const bump = (delta: number) =>
      tf.tidy(() => {
        const b = bT0.dataSync().slice();
        b[idx] += delta;
        return loss(aT0, tf.tensor2d(b, bT0.shape)).dataSync()[0];
      });
    const numeric = (bump(eps) - bump(-eps)) / (2 * eps);
    assert.ok(Math.abs(numeric - gBData[idx]) < 2e-2 * Math.max(1, Math.abs(numeric)), `B[${idx}]: analytic ${gBData[idx]} vs numeric ${numeric}`);
  }
  gA.dispose();
  gB.dispose();
  assert.equal(tf.memory().numTensors, before);
  aT0.dispose();
  bT0.dispose();
  model.dispose();
});
