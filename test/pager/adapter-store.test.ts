import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { AdapterError, RequestError } from '../../src/errors.js';
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

describe('AdapterStore versions and provenance', () => {
  const provenance = { job: 'job-1', round: 3, method: 'fedavg', clients: ['c1', 'c2'], examples: 640 };

  test('provenance is written into the manifest and comes back on the record, also after reopening', async () => {
    const dir = join(root, 'p1');
    const store = await AdapterStore.open(dir, model, 64);
    const plain = await store.put('fed', await adapterFiles(4, 20));
    assert.equal(plain.provenance, undefined);
    assert.ok(!('provenance' in plain), 'an upload without provenance has none');
    const published = await store.put('fed', await adapterFiles(4, 21), { provenance });
    assert.deepEqual(published.provenance, provenance);
    const manifest = JSON.parse(await readFile(join(published.dir, 'manifest.json'), 'utf8')) as { provenance: unknown };
    assert.deepEqual(manifest.provenance, provenance);
    const reopened = await AdapterStore.open(dir, model, 64);
    assert.deepEqual(reopened.get('fed'), published);
    assert.deepEqual(await reopened.readVersion('fed', 1), plain);
    await assert.rejects(store.put('fed', await adapterFiles(4, 22), { provenance: [1, 2] as unknown as Record<string, unknown> }), RequestError);
    assert.equal(store.get('fed')?.version, 2);
  });

  test('readVersion returns old and latest versions from their manifests, undefined for ones that do not exist', async () => {
    const store = await AdapterStore.open(join(root, 'p2'), model, 64);
    const v1 = await store.put('r', await adapterFiles(8, 23));
    const v2 = await store.put('r', await adapterFiles(4, 24), { provenance: { round: 1 } });
    assert.deepEqual(await store.readVersion('r'), v2);
    assert.deepEqual(await store.readVersion('r', 2), v2);
    const old = await store.readVersion('r', 1);
    assert.deepEqual(old, v1);
    assert.equal(old?.rank, 8);
    for (const v of [0, 3, 1.5, -1]) assert.equal(await store.readVersion('r', v), undefined, String(v));
    assert.equal(await store.readVersion('nope'), undefined);
    assert.equal(await store.readVersion('nope', 1), undefined);
    await assert.rejects(store.readVersion('../r'), code('ADAPTER_ID_INVALID'));
  });

  test('findVersion scans versions newest first and returns the first match', async () => {
    const store = await AdapterStore.open(join(root, 'p3'), model, 64);
    await store.put('f', await adapterFiles(4, 25), { provenance: { job: 'j', round: 1 } });
    await store.put('f', await adapterFiles(4, 26));
    const r2 = await store.put('f', await adapterFiles(4, 27), { provenance: { job: 'j', round: 2 } });
    await store.put('f', await adapterFiles(4, 28), { provenance: { job: 'other', round: 2 } });
    const seen: number[] = [];
    const found = await store.findVersion('f', (r) => {
      seen.push(r.version);
      return r.provenance?.job === 'j';
    });
    assert.deepEqual(found, r2);
    assert.deepEqual(seen, [4, 3]);
    assert.equal((await store.findVersion('f', (r) => r.provenance?.round === 1))?.version, 1);
    assert.equal(await store.findVersion('f', (r) => r.provenance?.round === 9), undefined);
    assert.equal(await store.findVersion('missing', () => true), undefined);
  });

  test('readFiles gives back the stored bytes and rejects a tampered file', async () => {
    const store = await AdapterStore.open(join(root, 'p4'), model, 64);
    const files = await adapterFiles(4, 29);
    const rec = await store.put('t', files);
    const back = await store.readFiles(rec);
    assert.ok(back.config.equals(files.config));
    assert.ok(back.weights.equals(files.weights));
    const config = join(rec.dir, 'adapter_config.json');
    await writeFile(config, Buffer.concat([files.config, Buffer.from(' ')]));
    await assert.rejects(store.readFiles(rec), code('ADAPTER_WEIGHTS_INVALID'));
  });

  test('a version folder left without a manifest is skipped, and the next put goes past it', async () => {
    const dir = join(root, 'p5');
    const store = await AdapterStore.open(dir, model, 64);
    await store.put('g', await adapterFiles(4, 30));
    await mkdir(join(dir, 'g', 'v2'));
    const reopened = await AdapterStore.open(dir, model, 64);
    assert.equal(await reopened.readVersion('g', 2), undefined);
    const next = await reopened.put('g', await adapterFiles(4, 31));
    assert.equal(next.version, 3);
  });

  test('concurrent puts of one id get distinct consecutive versions', async () => {
    const store = await AdapterStore.open(join(root, 'p6'), model, 64);
    const files = await adapterFiles(4, 32);
    const records = await Promise.all([1, 2, 3, 4].map((round) => store.put('c', files, { provenance: { round } })));
    assert.deepEqual(records.map((r) => r.version).sort(), [1, 2, 3, 4]);
    assert.equal(store.get('c')?.version, 4);
  });
});
