import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { LoraGatewayError } from '../../src/errors.js';
import { peftConfigJson, writePeftAdapter } from '../../src/model/synthetic/hf-folder-writer.js';
import type { LlamaModel } from '../../src/model/forward/llama-model.js';
import type { ProjectionName } from '../../src/model/architecture/llama-weights.js';
import { loadPeftAdapter } from '../../src/model/lora/peft-adapter-reader.js';
import { resolvePeftConfig } from '../../src/model/lora/peft-config.js';
import { randomLoraWeights } from '../../src/model/synthetic/random-weights.js';
import { AdapterPager } from '../../src/pager/adapter-pager.js';
import { AdapterStore, type AdapterFiles } from '../../src/pager/adapter-store.js';
import { PagePool } from '../../src/pager/page-pool.js';
import { adapterPages, kvPagesPerToken } from '../../src/pager/page-sizes.js';
import { generateBatch } from '../../src/serving/batch-generator.js';
import { ContinuousBatcher, type BatcherLimits, type StepInfo } from '../../src/serving/continuous-batcher.js';
import type { CompletionRequest } from '../../src/serving/serving-engine.js';
import { memoryModel, TINY_CONFIGS, useWasm } from '../helpers/tiny-models.js';

const cfg = TINY_CONFIGS.gqa;
let model: LlamaModel;
const EOS = [2];
let root: string;
const SHAPES: { r: number; targets: ProjectionName[] }[] = [
  { r: 4, targets: ['q_proj', 'v_proj'] },
  { r: 8, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] },
  { r: 16, targets: ['gate_proj', 'up_proj', 'down_proj'] },
  { r: 2, targets: ['o_proj'] },
  { r: 12, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] },
  { r: 6, targets: ['v_proj', 'down_proj'] },
];

async function files(i: number, seed = i): Promise<AdapterFiles> {
  const { r, targets } = SHAPES[i % SHAPES.length];
  const json = peftConfigJson({ r, loraAlpha: 2 * r, targetModules: targets });
  const dir = join(root, 'src', `${i}-${seed}`);
  await writePeftAdapter(dir, json, randomLoraWeights(cfg, resolvePeftConfig(json, model.config, 64), 500 + seed, 0.3));
  return { config: await readFile(join(dir, 'adapter_config.json')), weights: await readFile(join(dir, 'adapter_model.safetensors')) };
}

async function setup(name: string, capacityPages: number, limits: Partial<BatcherLimits> = {}, adapters = SHAPES.length) {
  const store = await AdapterStore.open(join(root, name), model.config, 64);
  for (let i = 0; i < adapters; i++) await store.put(`a${i}`, await files(i));
  const pool = new PagePool(capacityPages);
  const pager = new AdapterPager(store, pool, model.config, { hostMemoryBytes: 1 << 24 });
  let maxInUse = 0;
  let preemptions = 0;
  const steps: StepInfo[] = [];
  const batcher = new ContinuousBatcher({
    model,
    store,
    pager,
    pool,
    stopTokenIds: EOS,
    limits: { maxRunningSeqs: 8, maxBatchTokens: 256, maxAdaptersPerBatch: 4, maxWaiting: 1000, ...limits },
    onStep: (info) => {
      steps.push(info);
      preemptions += info.preempted;
      maxInUse = Math.max(maxInUse, pool.inUse());
      assert.ok(pool.inUse() <= pool.capacity, 'pages in use never exceed the budget');
    },
  });
  return { store, pool, pager, batcher, steps, maxInUse: () => maxInUse, preemptions: () => preemptions };
}

function request(i: number, adapterId: string | null, over: Partial<CompletionRequest> = {}): CompletionRequest {
  return {
    adapterId,
    promptIds: [1, 3 + (i % 50), 7, 11 + (i % 7), 5].slice(0, 2 + (i % 4)),
    maxTokens: 3 + (i % 5),
    sampling: { temperature: 0, topP: 1, topK: -1 },
    ignoreEos: true,
    ...over,
  };
}

/** The same request run alone with the adapter version read straight from its folder. */
async function alone(store: AdapterStore, req: CompletionRequest, version?: number): Promise<number[]> {
  const rec = req.adapterId ? store.get(req.adapterId)! : null;
  const dir = rec && version ? join(rec.dir, '..', `v${version}`) : rec?.dir;
  const adapter = dir ? await loadPeftAdapter(dir, model.config, 64) : null;
  try {
    const [r] = await generateBatch(model, [{ ...req, adapter, stopTokenIds: EOS }]);
    return r.tokenIds;
  } finally {
    adapter?.dispose();
  }
}

before(async () => {
  await useWasm();
  model = memoryModel(cfg, 77).model;
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-batcher-'));
});
after(async () => {
  model.dispose();
  await rm(root, { recursive: true, force: true });
});

describe('ContinuousBatcher', () => {
  test('32 concurrent requests over 6 adapters and the base model give each request’s solo greedy tokens', async () => {
    const { store, pool, pager, batcher } = await setup('many', 100000);
    const tensors = tf.memory().numTensors;
    const reqs = Array.from({ length: 32 }, (_, i) => request(i, i % 7 === 6 ? null : `a${i % 6}`));
    const results = await Promise.all(reqs.map((r) => batcher.submit(r)));
    for (let i = 0; i < reqs.length; i++) assert.deepEqual(results[i].tokenIds, await alone(store, reqs[i]), `request ${i}`);
    assert.equal(pool.inUse('kv'), 0);
    batcher.close();
    pager.dispose();
    assert.equal(pool.inUse(), 0);
    assert.equal(tf.memory().numTensors, tensors, 'serving leaves no tensors behind');
  });

  test('a device budget for two adapters serves requests spread over six, evicting and reloading', async () => {
    const kv = kvPagesPerToken(model.config);
    const biggest = Math.max(...SHAPES.map((s) => adapterPages(model.config, resolvePeftConfig(peftConfigJson({ r: s.r, loraAlpha: 1, targetModules: s.targets }), model.config, 64))));
    const { store, pool, pager, batcher, maxInUse } = await setup('tight', 2 * biggest + 2 * kv * 12, { maxRunningSeqs: 2 });
    const reqs = Array.from({ length: 18 }, (_, i) => request(i, `a${(i * 5) % 6}`));
    const results = await Promise.all(reqs.map((r) => batcher.submit(r)));
    for (let i = 0; i < reqs.length; i++) assert.deepEqual(results[i].tokenIds, await alone(store, reqs[i]));
    assert.ok(pager.counters.deviceEvictions > 0, 'adapters were evicted to make room');
    assert.ok(maxInUse() <= pool.capacity);
    batcher.close();
    pager.dispose();
  });

  test('when decode runs out of pages the newest sequences are preempted and resumed, with their solo tokens', async () => {
    const kv = kvPagesPerToken(model.config);
    const biggest = adapterPages(model.config, resolvePeftConfig(peftConfigJson({ r: SHAPES[1].r, loraAlpha: 1, targetModules: SHAPES[1].targets }), model.config, 64));
    // each request may need 5 + 30 tokens of KV; the pool holds about 2.5 such requests plus two adapters,
    // but admission only checks that one request's total fits what is free, so more run at once
    const { store, pool, pager, batcher, maxInUse, preemptions } = await setup('preempt', 2 * biggest + Math.floor(kv * 35 * 2.5), { maxRunningSeqs: 8 }, 2);
    const reqs = Array.from({ length: 8 }, (_, i) => request(i, i % 3 === 2 ? null : `a${i % 2}`, { maxTokens: 30, sampling: { temperature: 0.8, topP: 0.9, topK: -1, seed: i } }));
    const results = await Promise.all(reqs.map((r) => batcher.submit(r)));
    assert.ok(preemptions() > 0, 'some sequences were preempted');
    for (let i = 0; i < reqs.length; i++) assert.deepEqual(results[i].tokenIds, await alone(store, reqs[i]), `request ${i}`);
    assert.ok(maxInUse() <= pool.capacity);
    assert.equal(pool.inUse('kv'), 0);
    assert.ok(pager.deviceResident().every((a) => a.pins === 0), 'no adapter stays pinned');
    batcher.close();
    pager.dispose();
  });

  test('a prompt longer than max-batch-tokens is prefilled in chunks while the others keep decoding, with its solo tokens', async () => {
    const { store, pager, batcher, steps } = await setup('chunked', 100000, { maxBatchTokens: 4 }, 2);
    const long = request(0, 'a1', { promptIds: Array.from({ length: 21 }, (_, k) => 1 + ((k * 7) % 40)), maxTokens: 5 });
    const short = [1, 2, 3].map((i) => request(i, i === 2 ? null : 'a0', { maxTokens: 12 }));
    // the short ones start first, then the long prompt arrives while they decode
    const first = short.map((r) => batcher.submit(r));
    await new Promise((r) => setImmediate(r));
    const results = await Promise.all([batcher.submit(long), ...first]);
    for (const [i, r] of [long, ...short].entries()) assert.deepEqual(results[i].tokenIds, await alone(store, r), `request ${i}`);
    assert.ok(steps.every((st) => st.prefilled <= 4), `prefill tokens per step: ${steps.map((st) => st.prefilled).join(' ')}`);
    const overlapped = steps.filter((st) => st.prefilled > 0 && st.running > 1);
    assert.ok(overlapped.length >= 5, 'the long prompt took several steps, during which the others decoded');
    batcher.close();
    pager.dispose();
  });

  test('an echo prompt over max-batch-tokens is not split, and still runs', async () => {
    const { pager, batcher, steps } = await setup('echo-long', 100000, { maxBatchTokens: 4 }, 0);
    const prompt = Array.from({ length: 9 }, (_, k) => 2 + k);
    const [echoed, other] = await Promise.all([
      batcher.submit(request(0, null, { promptIds: prompt, maxTokens: 2, echo: true, logprobs: 1 })),
      batcher.submit(request(1, null, { maxTokens: 4 })),
    ]);
    assert.equal(echoed.promptLogprobs?.length, prompt.length);
    assert.ok(echoed.promptLogprobs!.slice(1).every((lp) => lp && Number.isFinite(lp.logprob)));
    assert.equal(other.tokenIds.length, 4);
    assert.ok(steps.some((st) => st.prefilled === 9), 'the echo prompt went in whole');
    batcher.close();
    pager.dispose();
  });

  test('cancelling a running request frees its pages; the others finish', async () => {
    const { pool, pager, batcher } = await setup('cancel', 100000, {}, 1);
    const ctrl = new AbortController();
    let seen = 0;
    const doomed = batcher.submit(request(0, 'a0', { maxTokens: 40, signal: ctrl.signal }), () => {
      if (++seen === 2) ctrl.abort();
    });
    const survivor = batcher.submit(request(1, null, { maxTokens: 6 }));
    await assert.rejects(doomed, (e: unknown) => e instanceof LoraGatewayError && e.code === 'REQUEST_CANCELLED');
    assert.equal((await survivor).tokenIds.length, 6);
    assert.ok(seen < 40);
    assert.equal(pool.inUse('kv'), 0);
    batcher.close();
    pager.dispose();
  });

  test('a token callback that throws fails only its own request', async () => {
    const { pool, pager, batcher } = await setup('callback', 100000, {}, 0);
    const bad = batcher.submit(request(0, null, { maxTokens: 8 }), () => {
      throw new Error('client went away');
    });
    const good = batcher.submit(request(1, null, { maxTokens: 8 }));
    await assert.rejects(bad, /client went away/);
    assert.equal((await good).tokenIds.length, 8);
    assert.equal(pool.inUse('kv'), 0);
    batcher.close();
    pager.dispose();
  });

  test('a full waiting queue refuses with QUEUE_FULL; an unknown adapter with ADAPTER_NOT_FOUND', async () => {
    const { pager, batcher } = await setup('queue', 100000, { maxWaiting: 2, maxRunningSeqs: 1 }, 0);
    const outcomes = await Promise.allSettled(Array.from({ length: 5 }, (_, i) => batcher.submit(request(i, null))));
    const codes = outcomes.map((o) => (o.status === 'fulfilled' ? 'ok' : (o.reason as LoraGatewayError).code));
    assert.deepEqual(codes, ['ok', 'ok', 'ok', 'QUEUE_FULL', 'QUEUE_FULL']);
    await assert.rejects(batcher.submit(request(0, 'nope')), (e: unknown) => e instanceof LoraGatewayError && e.code === 'ADAPTER_NOT_FOUND');
    batcher.close();
    pager.dispose();
  });

  test('re-uploading an adapter mid-request: the running request finishes on v1, new requests get v2', async () => {
    const { store, pager, batcher } = await setup('hot', 100000, {}, 1);
    const first = request(3, 'a0', { maxTokens: 12 });
    const v2 = await files(0, 99);
    let swapped: Promise<unknown> | undefined;
    // the new version lands while the first request is decoding
    const r1 = await batcher.submit(first, () => {
      swapped ??= store.put('a0', v2);
    });
    await swapped;
    const second = request(3, 'a0', { maxTokens: 12 });
    const r2 = await batcher.submit(second);
    assert.equal(store.get('a0')?.version, 2);
    assert.deepEqual(r1.tokenIds, await alone(store, first, 1));
    assert.deepEqual(r2.tokenIds, await alone(store, second, 2));
    assert.notDeepEqual(r1.tokenIds, r2.tokenIds);
    batcher.close();
    pager.dispose();
  });

  test('one hot adapter cannot starve another: the cold request is admitted ahead of the hot backlog', async () => {
    const { pager, batcher } = await setup('fair', 100000, { maxRunningSeqs: 1 }, 2);
    const order: string[] = [];
    const hot = Array.from({ length: 8 }, (_, i) => batcher.submit(request(i, 'a0', { maxTokens: 2 }), () => void (order.at(-1) !== `hot${i}` && order.push(`hot${i}`))));
    const cold = batcher.submit(request(9, 'a1', { maxTokens: 2 }), () => void (order.at(-1) !== 'cold' && order.push('cold')));
    await Promise.all([...hot, cold]);
    assert.ok(order.indexOf('cold') <= 3, `admission order: ${order.join(' ')}`);
    batcher.close();
    pager.dispose();
  });
});
