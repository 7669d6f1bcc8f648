import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { peftConfigJson, writePeftAdapter } from '../../src/model/synthetic/hf-folder-writer.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { resolvePeftConfig } from '../../src/model/lora/peft-config.js';
import { randomLoraWeights } from '../../src/model/synthetic/random-weights.js';
import { AdapterPager } from '../../src/pager/adapter-pager.js';
import { AdapterStore, type AdapterRecord } from '../../src/pager/adapter-store.js';
import { PagePool } from '../../src/pager/page-pool.js';
import { adapterPages } from '../../src/pager/page-sizes.js';
import { TINY_CONFIGS, useWasm } from '../helpers/tiny-models.js';

const cfg = TINY_CONFIGS.gqa;
const model = parseModelConfig(cfg);
let root: string;
let store: AdapterStore;
const records: AdapterRecord[] = [];
// every test adapter: rank 4 on q_proj and v_proj of both layers
const PAGES = adapterPages(model, resolvePeftConfig({ r: 4, lora_alpha: 8, target_modules: ['q_proj', 'v_proj'] }, model, 64));

before(async () => {
  await useWasm();
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-pager-'));
  store = await AdapterStore.open(join(root, 'store'), model, 64);
  for (let i = 0; i < 4; i++) {
    const json = peftConfigJson({ r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'] });
    const dir = join(root, `src-${i}`);
    await writePeftAdapter(dir, json, randomLoraWeights(cfg, resolvePeftConfig(json, model, 64), i));
    records.push(
      await store.put(`a${i}`, { config: await readFile(join(dir, 'adapter_config.json')), weights: await readFile(join(dir, 'adapter_model.safetensors')) }),
    );
  }
});
after(async () => rm(root, { recursive: true, force: true }));

test('adapters move disk → host → device; pinned ones stay, unpinned ones are evicted LRU; pages stay exact', async () => {
  const pool = new PagePool(2 * PAGES);
  const pager = new AdapterPager(store, pool, model, { hostMemoryBytes: 1 << 20 });
  const tensorsBefore = tf.memory().numTensors;
  assert.equal(pager.residence(records[0]), 'disk');
  await pager.prefetch(records[0]);
  assert.equal(pager.residence(records[0]), 'host');
  const a0 = await pager.acquire(records[0]);
  const a1 = await pager.acquire(records[1]);
  assert.ok(a0 && a1);
  assert.equal(pool.inUse('adapter'), 2 * PAGES);
  // both pinned: a third cannot fit
  assert.equal(await pager.acquire(records[2]), undefined);
  assert.equal(pool.inUse('adapter'), 2 * PAGES);
  pager.release(records[0]);
  pager.release(records[1]);
  await pager.acquire(records[1]); // touch a1: a0 is now least recently used
  pager.release(records[1]);
  const a2 = await pager.acquire(records[2]);
  assert.ok(a2);
  assert.equal(pager.residence(records[0]), 'host', 'a0 was evicted from device but stays on host');
  assert.equal(pager.residence(records[1]), 'device');
  assert.equal(pool.inUse('adapter'), 2 * PAGES);
  // host hits: a0 after its prefetch, a2 after the acquire that could not fit had read it
  assert.deepEqual(pager.counters, { hostHits: 2, hostMisses: 3, deviceLoads: 3, deviceEvictions: 1, hostEvictions: 0 });
  pager.dispose();
  assert.equal(pool.inUse(), 0);
  assert.equal(tf.memory().numTensors, tensorsBefore);
});

test('concurrent acquires of one version load it once', async () => {
  const pool = new PagePool(4 * PAGES);
  const pager = new AdapterPager(store, pool, model, { hostMemoryBytes: 1 << 20 });
  const got = await Promise.all([pager.acquire(records[3]), pager.acquire(records[3]), pager.acquire(records[3])]);
  assert.ok(got[0] && got[0] === got[1] && got[1] === got[2]);
  assert.equal(pager.counters.deviceLoads, 1);
  assert.deepEqual(pager.deviceResident(), [{ key: 'a3@1', pins: 3 }]);
  assert.equal(pool.inUse('adapter'), PAGES);
  pager.dispose();
});

test('the host tier is bounded in bytes', async () => {
  const pool = new PagePool(4 * PAGES);
  const oneAdapterBytes = PAGES * model.hiddenSize * 4; // an upper bound: pages round up
  const pager = new AdapterPager(store, pool, model, { hostMemoryBytes: oneAdapterBytes });
  for (const r of records) await pager.prefetch(r);
  const onHost = records.filter((r) => pager.residence(r) === 'host').length;
  assert.equal(onHost, 1);
  assert.equal(pager.counters.hostEvictions, 3);
  pager.dispose();
});
