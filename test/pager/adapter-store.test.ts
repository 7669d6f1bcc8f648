import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { AdapterError } from '../../src/errors.js';
import { peftConfigJson, writePeftAdapter } from '../../src/model/synthetic/hf-folder-writer.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { resolvePeftConfig } from '../../src/model/lora/peft-config.js';
import { randomLoraWeights } from '../../src/model/synthetic/random-weights.js';
import { AdapterStore, type AdapterFiles } from '../../src/pager/adapter-store.js';
import { TINY_CONFIGS } from '../helpers/tiny-models.js';

const cfg = TINY_CONFIGS.gqa;
const model = parseModelConfig(cfg);
let root: string;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-store-'));
});
after(async () => rm(root, { recursive: true, force: true }));

/** Real PEFT files for an adapter of rank r, as bytes (what an upload carries). */
async function adapterFiles(r: number, seed: number): Promise<AdapterFiles> {
  const json = peftConfigJson({ r, loraAlpha: 2 * r, targetModules: ['q_proj', 'v_proj'] });
  const dir = join(root, 'src', `${r}-${seed}`);
  await writePeftAdapter(dir, json, randomLoraWeights(cfg, resolvePeftConfig(json, model, 64), seed));
  return { config: await readFile(join(dir, 'adapter_config.json')), weights: await readFile(join(dir, 'adapter_model.safetensors')) };
}

function code(c: string) {
  return (e: unknown) => e instanceof AdapterError && e.code === c;
}

describe('AdapterStore', () => {
  test('put stores a validated version with rank, targets, size and checksums; re-put adds a version', async () => {
    const store = await AdapterStore.open(join(root, 's1'), model, 64);
    const v1 = await store.put('cust-1', await adapterFiles(8, 1));
    assert.equal(v1.version, 1);
    assert.equal(v1.rank, 8);
    assert.deepEqual(v1.targets.sort(), ['q_proj', 'v_proj']);
    assert.match(v1.sha256.weights, /^[0-9a-f]{64}$/);
    const v2 = await store.put('cust-1', await adapterFiles(4, 2));
    assert.equal(v2.version, 2);
    assert.equal(store.get('cust-1')?.rank, 4);
    // the old version stays readable for requests still using it
    const old = await store.readHost(v1);
    assert.equal(old.modules[0].spec.rank, 8);
    assert.deepEqual(store.list().map((r) => r.id), ['cust-1']);
  });

  test('a reopened store finds the latest complete version and removes interrupted writes', async () => {
    const dir = join(root, 's2');
    const store = await AdapterStore.open(dir, model, 64);
    await store.put('a', await adapterFiles(8, 3));
    await store.put('a', await adapterFiles(16, 4));
    // a crash mid-write: a temporary folder, and a version folder without its manifest
    await mkdir(join(dir, '.tmp-deadbeef'));
    await mkdir(join(dir, 'a', 'v3'));
    await writeFile(join(dir, 'a', 'v3', 'adapter_config.json'), '{"r": 8');
    const reopened = await AdapterStore.open(dir, model, 64);
    assert.equal(reopened.get('a')?.version, 2);
    assert.equal(reopened.get('a')?.rank, 16);
    assert.ok(!(await readdir(dir)).includes('.tmp-deadbeef'));
  });

  test('bad uploads are refused and change nothing: truncated weights, rank over the limit, NaN', async () => {
    const store = await AdapterStore.open(join(root, 's3'), model, 16);
    const good = await store.put('x', await adapterFiles(8, 5));
    const files = await adapterFiles(8, 6);
    await assert.rejects(store.put('x', { ...files, weights: files.weights.subarray(0, files.weights.length - 10) }), code('ADAPTER_WEIGHTS_INVALID'));
    await assert.rejects(store.put('x', await adapterFiles(32, 7)), code('ADAPTER_RANK_TOO_LARGE'));
    const nan = Buffer.from(files.weights);
    nan.writeFloatLE(NaN, nan.length - 4);
    await assert.rejects(store.put('x', { ...files, weights: nan }), code('ADAPTER_WEIGHTS_INVALID'));
    assert.deepEqual(store.get('x'), good);
    assert.deepEqual(await readdir(join(root, 's3', 'x')), ['v1']);
    assert.ok(!(await readdir(join(root, 's3'))).some((n) => n.startsWith('.tmp-')));
  });

  test('ids that could escape the store are refused', async () => {
    const store = await AdapterStore.open(join(root, 's4'), model, 64);
    const files = await adapterFiles(4, 8);
    for (const id of ['../evil', 'a/b', '..', '.hidden', '', 'x'.repeat(129), 'a..b']) {
      await assert.rejects(store.put(id, files), code('ADAPTER_ID_INVALID'), id);
    }
    assert.deepEqual(await readdir(join(root, 's4')), []);
  });

  test('delete removes every version; a tampered file fails its checksum on read', async () => {
    const store = await AdapterStore.open(join(root, 's5'), model, 64);
    const rec = await store.put('d', await adapterFiles(4, 9));
    const weights = join(rec.dir, 'adapter_model.safetensors');
    const bytes = await readFile(weights);
    bytes[bytes.length - 1] ^= 0xff;
    await writeFile(weights, bytes);
    await assert.rejects(store.readHost(rec), code('ADAPTER_WEIGHTS_INVALID'));
    await store.delete('d');
    assert.equal(store.get('d'), undefined);
    await assert.rejects(store.delete('d'), code('ADAPTER_NOT_FOUND'));
  });
});
