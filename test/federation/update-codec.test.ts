import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { FederationError } from '../../src/errors.js';
import { FED_METHODS, peftTensorName, type FactorSet, type FedMethod } from '../../src/federation/lora-factors.js';
import { decodeGlobalState, decodeUpdate, encodeGlobalState, encodeUpdate, type UpdateMeta } from '../../src/federation/update-codec.js';
import { encodeSafetensors, SafetensorsReader, type TensorToWrite } from '../../src/model/formats/safetensors.js';
import { gqaModules, randomFactors } from './factor-fixtures.js';
import { rejects } from '../helpers/error-matchers.js';

const modules = gqaModules(4);
const TRAINED: Record<FedMethod, ('a' | 'b' | 'r')[]> = { fedavg: ['a', 'b'], ffa: ['b'], flora: ['a', 'b'], fedsb: ['r'] };

function meta(method: FedMethod, over: Partial<UpdateMeta> = {}): UpdateMeta {
  return { job: 'job-1', round: 3, client: 'alice', method, numExamples: 120, trainLoss: 2.3125, ...over };
}

function expectFor(method: FedMethod, over: Partial<Parameters<typeof decodeUpdate>[1]> = {}) {
  return { job: 'job-1', round: 3, client: 'alice', method, modules, ...over };
}


/** The update's tensors and metadata, to build variants of the file by hand. */
function tensorsOf(factors: FactorSet, method: FedMethod): TensorToWrite[] {
  const out: TensorToWrite[] = [];
  for (const m of factors.values()) {
    if (m.a && TRAINED[method].includes('a')) out.push({ name: peftTensorName(m.modulePath, 'A'), shape: [m.rank, m.inFeatures], dtype: 'F32', data: m.a });
    if (m.b && TRAINED[method].includes('b')) out.push({ name: peftTensorName(m.modulePath, 'B'), shape: [m.outFeatures, m.rank], dtype: 'F32', data: m.b });
    if (m.r && TRAINED[method].includes('r')) out.push({ name: peftTensorName(m.modulePath, 'R'), shape: [m.rank, m.rank], dtype: 'F32', data: m.r });
  }
  return out;
}

function metadataOf(m: UpdateMeta): Record<string, string> {
  return { format: 'pt', job: m.job, round: String(m.round), client: m.client, method: m.method, numExamples: String(m.numExamples), trainLoss: String(m.trainLoss) };
}

describe('update codec: client updates', () => {
  for (const method of FED_METHODS) {
    it(`${method}: encodeUpdate → decodeUpdate round-trips the meta and exactly the factors ${method} trains (${TRAINED[method].join(', ')})`, async () => {
      const factors = randomFactors(1, modules, TRAINED[method]);
      const bytes = encodeUpdate(meta(method), factors);
      const { meta: back, factors: got } = decodeUpdate(bytes, expectFor(method));
      assert.deepEqual(back, meta(method));
      assert.deepEqual([...got.keys()], modules.map((m) => m.modulePath));
      for (const [k, m] of factors) {
        const g = got.get(k)!;
        for (const key of ['a', 'b', 'r'] as const) assert.deepEqual(g[key], m[key], `${k}.${key}`);
      }
      // a real safetensors file: the gateway's own reader sees the PEFT names, F32 and the metadata
      const reader = await SafetensorsReader.fromBytes(bytes, 'update.safetensors');
      assert.deepEqual(reader.metadata, metadataOf(meta(method)));
      assert.ok(reader.entries().every((e) => e.dtype === 'F32'));
      assert.equal(reader.entries().length, modules.length * TRAINED[method].length);
    });
  }

  it('flora: a client of its own rank (16) decodes against clientRank, and the job rank (4) would be a shape mismatch', () => {
    const factors = randomFactors(2, modules, ['a', 'b'], 16);
    const bytes = encodeUpdate(meta('flora'), factors);
    const { factors: got } = decodeUpdate(bytes, expectFor('flora', { clientRank: 16 }));
    for (const m of got.values()) assert.equal(m.rank, 16);
    assert.throws(() => decodeUpdate(bytes, expectFor('flora')), rejects('shape_mismatch', '[4, 32]'));
  });

  it('decodes bytes that sit at an odd offset inside a larger buffer (as Redis buffers do)', () => {
    const factors = randomFactors(3, modules, ['a', 'b']);
    const bytes = encodeUpdate(meta('fedavg'), factors);
    const padded = Buffer.concat([Buffer.from([1, 2, 3]), bytes]).subarray(3);
    assert.deepEqual(decodeUpdate(padded, expectFor('fedavg')).factors.get(modules[0].modulePath)!.a, factors.get(modules[0].modulePath)!.a);
  });

  const good = randomFactors(4, modules, ['a', 'b']);
  const file = (tensors: TensorToWrite[], md: Record<string, string>) => encodeSafetensors(tensors, md);

  it('not_safetensors: garbage, truncated files, a header that is not JSON, and a non-F32 dtype', () => {
    const bytes = encodeUpdate(meta('fedavg'), good);
    assert.throws(() => decodeUpdate(Buffer.from('hello, not a tensor file at all'), expectFor('fedavg')), rejects('not_safetensors'));
    assert.throws(() => decodeUpdate(new Uint8Array(3), expectFor('fedavg')), rejects('not_safetensors', 'too short'));
    assert.throws(() => decodeUpdate(bytes.subarray(0, bytes.length - 4), expectFor('fedavg')), rejects('not_safetensors'));
    const notJson = Buffer.concat([Buffer.from([8, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('{nope!!}')]);
    assert.throws(() => decodeUpdate(notJson, expectFor('fedavg')), rejects('not_safetensors', 'JSON'));
    const f16 = file(tensorsOf(good, 'fedavg').map((t) => ({ ...t, dtype: 'F16' as const })), metadataOf(meta('fedavg')));
    assert.throws(() => decodeUpdate(f16, expectFor('fedavg')), rejects('not_safetensors', 'F16'));
  });

  it('metadata_mismatch names the field: wrong round, wrong client, wrong job, wrong method, no metadata', () => {
    const bytes = encodeUpdate(meta('fedavg'), good);
    assert.throws(() => decodeUpdate(bytes, expectFor('fedavg', { round: 4 })), rejects('metadata_mismatch', 'round "3", expected "4"'));
    assert.throws(() => decodeUpdate(bytes, expectFor('fedavg', { client: 'bob' })), rejects('metadata_mismatch', 'client "alice", expected "bob"'));
    assert.throws(() => decodeUpdate(bytes, expectFor('fedavg', { job: 'job-2' })), rejects('metadata_mismatch', 'job'));
    assert.throws(() => decodeUpdate(bytes, expectFor('flora')), rejects('metadata_mismatch', 'method "fedavg", expected "flora"'));
    assert.throws(() => decodeUpdate(file(tensorsOf(good, 'fedavg'), {}), expectFor('fedavg')), rejects('metadata_mismatch', 'format (absent)'));
  });

  it('num_examples_invalid and train_loss_invalid: zero, fractional, text, NaN, negative', () => {
    for (const n of ['0', '1.5', '-2', 'abc', '', '12e3']) {
      const md = { ...metadataOf(meta('fedavg')), numExamples: n };
      assert.throws(() => decodeUpdate(file(tensorsOf(good, 'fedavg'), md), expectFor('fedavg')), rejects('num_examples_invalid'), n);
    }
    for (const l of ['NaN', 'Infinity', '-0.5', '', 'low']) {
      const md = { ...metadataOf(meta('fedavg')), trainLoss: l };
      assert.throws(() => decodeUpdate(file(tensorsOf(good, 'fedavg'), md), expectFor('fedavg')), rejects('train_loss_invalid'), l);
    }
    const ok = { ...metadataOf(meta('fedavg')), trainLoss: '1e-7' };
    assert.equal(decodeUpdate(file(tensorsOf(good, 'fedavg'), ok), expectFor('fedavg')).meta.trainLoss, 1e-7);
  });

  it('unexpected_tensor: an extra tensor, a factor the method does not train (lora_A in an ffa update), a module the job lacks', () => {
    const md = metadataOf(meta('fedavg'));
    const extra = [...tensorsOf(good, 'fedavg'), { name: 'base_model.model.lm_head.weight', shape: [2, 2], dtype: 'F32' as const, data: new Float32Array(4) }];
    assert.throws(() => decodeUpdate(file(extra, md), expectFor('fedavg')), rejects('unexpected_tensor', 'lm_head'));
    const ffaWithA = file(tensorsOf(good, 'fedavg'), metadataOf(meta('ffa')));
    assert.throws(() => decodeUpdate(ffaWithA, expectFor('ffa')), rejects('unexpected_tensor', 'lora_A'));
    assert.throws(() => decodeUpdate(encodeUpdate(meta('fedavg'), good), expectFor('fedavg', { modules: modules.slice(1) })), rejects('unexpected_tensor', modules[0].modulePath));
  });

  it('missing_tensor: a module without its lora_B', () => {
    const tensors = tensorsOf(good, 'fedavg').filter((t) => t.name !== peftTensorName(modules[2].modulePath, 'B'));
    assert.throws(() => decodeUpdate(file(tensors, metadataOf(meta('fedavg'))), expectFor('fedavg')), rejects('missing_tensor', peftTensorName(modules[2].modulePath, 'B')));
  });

  it('shape_mismatch: a factor of the wrong shape (transposed A, 1-D B)', () => {
    const md = metadataOf(meta('fedavg'));
    const name = peftTensorName(modules[1].modulePath, 'A');
    const transposed = tensorsOf(good, 'fedavg').map((t) => (t.name === name ? { ...t, shape: [t.shape[1], t.shape[0]] } : t));
    assert.throws(() => decodeUpdate(file(transposed, md), expectFor('fedavg')), rejects('shape_mismatch', name));
    const flat = tensorsOf(good, 'fedavg').map((t) => (t.name === name ? { ...t, shape: [t.data.length] } : t));
    assert.throws(() => decodeUpdate(file(flat, md), expectFor('fedavg')), rejects('shape_mismatch', name));
  });

  it('not_finite: a NaN or an Infinity anywhere in a factor', () => {
    for (const bad of [NaN, Infinity, -Infinity]) {
      const factors = randomFactors(5, modules, ['r']);
      factors.get(modules[2].modulePath)!.r![7] = bad;
      assert.throws(() => decodeUpdate(encodeUpdate(meta('fedsb'), factors), expectFor('fedsb')), rejects('not_finite', 'index 7'));
    }
  });
});

describe('update codec: global state', () => {
  it('round-trips a flora global whose modules have different ranks, with its meta', () => {
    const global: FactorSet = new Map();
    modules.forEach((m, i) => global.set(m.modulePath, randomFactors(10 + i, [m], ['a', 'b'], 4 + 6 * i).get(m.modulePath)!));
    const { meta: md, factors } = decodeGlobalState(encodeGlobalState({ job: 'j', round: 2, method: 'flora' }, global));
    assert.deepEqual(md, { job: 'j', round: 2, method: 'flora' });
    assert.deepEqual(factors, global);
  });

  it('round-trips flora round 1 (no modules), an ffa global that carries only B, and a fedsb global with a, b and r', () => {
    assert.equal(decodeGlobalState(encodeGlobalState({ job: 'j', round: 1, method: 'flora' }, new Map())).factors.size, 0);
    const ffa = randomFactors(20, modules, ['b']);
    assert.deepEqual(decodeGlobalState(encodeGlobalState({ job: 'j', round: 1, method: 'ffa' }, ffa)).factors, ffa);
    const fedsb = randomFactors(21, modules, ['a', 'b', 'r']);
    assert.deepEqual(decodeGlobalState(encodeGlobalState({ job: 'j', round: 5, method: 'fedsb' }, fedsb)).factors, fedsb);
  });

  it('refuses garbage, a fedsb global without R, and a NaN (FED_DATA_INVALID)', () => {
    const invalid = (...mentions: string[]) => (e: unknown) => e instanceof FederationError && e.code === 'FED_DATA_INVALID' && mentions.every((m) => e.message.includes(m));
    assert.throws(() => decodeGlobalState(Buffer.from('garbage garbage')), invalid());
    const noR = randomFactors(22, modules, ['a', 'b']);
    assert.throws(() => decodeGlobalState(encodeGlobalState({ job: 'j', round: 1, method: 'fedsb' }, noR)), invalid('lora_R'));
    const nan = randomFactors(23, modules, ['a', 'b']);
    nan.get(modules[0].modulePath)!.b![0] = NaN;
    assert.throws(() => decodeGlobalState(encodeGlobalState({ job: 'j', round: 1, method: 'fedavg' }, nan)), invalid('NaN'));
  });
});
