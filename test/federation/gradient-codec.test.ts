import assert from 'node:assert/strict';
import { test } from 'node:test';
import { UpdateRejectedError } from '../../src/errors.js';
import { decodeGradients, encodeGradients } from '../../src/federation/gradient-codec.js';
import { moduleSpecsFor } from '../../src/federation/lora-init.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { TINY_CONFIGS } from '../helpers/tiny-models.js';

const modules = moduleSpecsFor(parseModelConfig(TINY_CONFIGS.gqa), { r: 4, alpha: 8, targetModules: ['q_proj', 'v_proj'] });
const grads = new Map(modules.map((m, i) => [m.modulePath, Float32Array.from({ length: m.outFeatures * m.inFeatures }, (_, j) => Math.sin(i + j))]));
const meta = { job: 'fj-1', round: 0, client: 'c1', numExamples: 12, trainLoss: 3.5 };
const expect = { job: 'fj-1', round: 0, client: 'c1', modules };

test('a Fed-SB gradient upload round-trips every module gradient [out, in] and its metadata', async () => {
  const { meta: got, grads: back } = await decodeGradients(encodeGradients(meta, grads, modules), expect);
  assert.deepEqual(got, meta);
  for (const m of modules) assert.deepEqual(back.get(m.modulePath), grads.get(m.modulePath));
});

test('a gradient upload is rejected with a named reason: garbage, wrong client or round, NaN, missing module', async () => {
  const reason = async (bytes: Uint8Array, exp = expect) => {
    try {
      await decodeGradients(bytes, exp);
    } catch (err) {
      assert.ok(err instanceof UpdateRejectedError);
      return err.reason;
    }
    return 'accepted';
  };
  assert.equal(await reason(Buffer.from('not a safetensors file at all')), 'not_safetensors');
  assert.equal(await reason(encodeGradients({ ...meta, client: 'c2' }, grads, modules)), 'metadata_mismatch');
  assert.equal(await reason(encodeGradients({ ...meta, round: 1 }, grads, modules)), 'metadata_mismatch');
  const nan = new Map(grads);
  nan.set(modules[0].modulePath, Float32Array.from(grads.get(modules[0].modulePath)!, (v, i) => (i === 5 ? Number.NaN : v)));
  assert.equal(await reason(encodeGradients(meta, nan, modules)), 'not_finite');
  assert.equal(await reason(encodeGradients(meta, grads, modules.slice(1))), 'missing_tensor');
  assert.equal(await reason(encodeGradients(meta, grads, modules), { ...expect, modules: modules.slice(1) }), 'unexpected_tensor');
  assert.equal(await reason(encodeGradients({ ...meta, numExamples: 0 }, grads, modules)), 'num_examples_invalid');
});
