import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { resolvePeftConfig } from '../../src/model/lora/peft-config.js';
import { peftConfigJson, writePeftAdapter } from '../../src/model/synthetic/hf-folder-writer.js';
import { randomLoraWeights } from '../../src/model/synthetic/random-weights.js';
import { AdapterStore, type AdapterFiles } from '../../src/pager/adapter-store.js';
import { TINY_CONFIGS } from '../helpers/tiny-models.js';

const cfg = TINY_CONFIGS.gqa;
const model = parseModelConfig(cfg);
let root: string;
let files: AdapterFiles;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-retention-'));
  const json = peftConfigJson({ r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'] });
  const dir = join(root, 'src');
  await writePeftAdapter(dir, json, randomLoraWeights(cfg, resolvePeftConfig(json, model, 64), 1));
  files = { config: await readFile(join(dir, 'adapter_config.json')), weights: await readFile(join(dir, 'adapter_model.safetensors')) };
});
after(async () => rm(root, { recursive: true, force: true }));

const onDisk = async (store: string, id: string) => (await readdir(join(root, store, id))).sort();

describe('AdapterStore keepVersions', () => {
  test('prune keeps the newest N versions; pruned ones are gone for readVersion and findVersion', async () => {
    const store = await AdapterStore.open(join(root, 'a'), model, 64, { keepVersions: 2 });
    for (let i = 0; i < 4; i++) await store.put('x', files);
    assert.deepEqual(await onDisk('a', 'x'), ['v1', 'v2', 'v3', 'v4'], 'put alone removes nothing: the engine prunes, knowing what runs');
    assert.deepEqual(await store.prune('x', () => false), [2, 1]);
    assert.deepEqual(await onDisk('a', 'x'), ['v3', 'v4']);
    assert.equal(await store.readVersion('x', 1), undefined);
    assert.equal((await store.readVersion('x', 3))?.version, 3);
    assert.equal(await store.findVersion('x', (r) => r.version < 3), undefined);
    assert.equal(store.get('x')?.version, 4);
  });

  test('a version in use is spared and removed by a later prune once it is not', async () => {
    const store = await AdapterStore.open(join(root, 'b'), model, 64, { keepVersions: 1 });
    await store.put('x', files);
    await store.put('x', files);
    await store.put('x', files);
    let inUse = new Set([1]);
    assert.deepEqual(await store.prune('x', (v) => inUse.has(v)), [2]);
    assert.deepEqual(await onDisk('b', 'x'), ['v1', 'v3']);
    inUse = new Set();
    assert.deepEqual(await store.prune('x', (v) => inUse.has(v)), [1]);
    assert.deepEqual(await onDisk('b', 'x'), ['v3']);
  });

  test('without keepVersions nothing is pruned; opening with it prunes what an earlier run left', async () => {
    const all = await AdapterStore.open(join(root, 'c'), model, 64);
    for (let i = 0; i < 3; i++) await all.put('x', files);
    assert.deepEqual(await all.prune('x', () => false), []);
    assert.deepEqual(await onDisk('c', 'x'), ['v1', 'v2', 'v3']);
    const bounded = await AdapterStore.open(join(root, 'c'), model, 64, { keepVersions: 1 });
    assert.deepEqual(await onDisk('c', 'x'), ['v3']);
    assert.equal(bounded.get('x')?.version, 3);
  });

  test('the latest readable version is kept even when a newer folder is an interrupted write', async () => {
    const first = await AdapterStore.open(join(root, 'd'), model, 64);
    await first.put('x', files);
    await first.put('x', files);
    await mkdir(join(root, 'd', 'x', 'v3')); // no manifest: never completed
    const store = await AdapterStore.open(join(root, 'd'), model, 64, { keepVersions: 1 });
    assert.equal(store.get('x')?.version, 2);
    assert.deepEqual(await onDisk('d', 'x'), ['v2', 'v3']);
  });
});
