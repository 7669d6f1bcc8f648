import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openCheckpoint, type CheckpointEntry } from '../../../src/model/formats/checkpoint.js';
import { writeSafetensors, type TensorToWrite } from '../../../src/model/formats/safetensors.js';
import { hasCode } from '../../helpers/error-matchers.js';

const root = await mkdtemp(join(tmpdir(), 'checkpoint-test-'));
after(() => rm(root, { recursive: true, force: true }));
let dirCounter = 0;

function tensor(name: string, values: number[], dtype: TensorToWrite['dtype'] = 'F32'): TensorToWrite {
  return { name, shape: [values.length], dtype, data: new Float32Array(values) };
}

/** A model folder with the given shard files and, if given, an index whose weight_map is `weightMap`. */
async function modelDir(shards: Record<string, TensorToWrite[]>, weightMap?: Record<string, string> | string): Promise<string> {
  const dir = join(root, `model-${dirCounter++}`);
  await mkdir(dir);
  for (const [file, tensors] of Object.entries(shards)) await writeSafetensors(join(dir, file), tensors);
  if (weightMap !== undefined) {
    const text = typeof weightMap === 'string' ? weightMap : JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap });
    await writeFile(join(dir, 'model.safetensors.index.json'), text);
  }
  return dir;
}

const threeShards = {
  'model-00001-of-00003.safetensors': [tensor('embed', [1, 2, 3]), tensor('layer0', [4, 5], 'BF16')],
  'model-00002-of-00003.safetensors': [tensor('layer1', [6, 7], 'F16')],
  'model-00003-of-00003.safetensors': [tensor('norm', [8]), tensor('head', [9, 10])],
};
const threeShardMap = {
  embed: 'model-00001-of-00003.safetensors',
  layer0: 'model-00001-of-00003.safetensors',
  layer1: 'model-00002-of-00003.safetensors',
  norm: 'model-00003-of-00003.safetensors',
  head: 'model-00003-of-00003.safetensors',
};

async function readAll(dir: string, names?: Set<string>): Promise<Map<string, { entry: CheckpointEntry; values: number[] }>> {
  const ckpt = await openCheckpoint(dir);
  const got = new Map<string, { entry: CheckpointEntry; values: number[] }>();
  try {
    await ckpt.readTensors((entry, data) => {
      assert.ok(!got.has(entry.name), `'${entry.name}' read twice`);
      got.set(entry.name, { entry, values: [...data] });
    }, names);
  } finally {
    await ckpt.close();
  }
  return got;
}

test('a single model.safetensors is opened as a one-file checkpoint', async () => {
  const dir = await modelDir({ 'model.safetensors': [tensor('a', [1, 2]), tensor('b', [3], 'F16')] });
  const ckpt = await openCheckpoint(dir);
  assert.deepEqual(ckpt.files, [join(dir, 'model.safetensors')]);
  assert.deepEqual(ckpt.tensorNames(), ['a', 'b']);
  assert.deepEqual(ckpt.entry('b'), { name: 'b', dtype: 'F16', shape: [1], begin: 8, end: 10, file: join(dir, 'model.safetensors') });
  assert.equal(ckpt.entry('missing'), undefined);
  await ckpt.close();
  const got = await readAll(dir);
  assert.deepEqual([...got].map(([n, g]) => [n, g.values]), [['a', [1, 2]], ['b', [3]]]);
});

test('a checkpoint sharded over 3 files reads every tensor exactly once with the right values and shard', async () => {
  const dir = await modelDir(threeShards, threeShardMap);
  const ckpt = await openCheckpoint(dir);
  assert.deepEqual(ckpt.files, Object.keys(threeShards).map((f) => join(dir, f)));
  assert.deepEqual(ckpt.tensorNames().sort(), Object.keys(threeShardMap).sort());
  assert.equal(ckpt.entry('layer1')?.file, join(dir, 'model-00002-of-00003.safetensors'));
  await ckpt.close();
  const got = await readAll(dir);
  assert.deepEqual(
    Object.fromEntries([...got].map(([n, g]) => [n, g.values])),
    { embed: [1, 2, 3], layer0: [4, 5], layer1: [6, 7], norm: [8], head: [9, 10] },
  );
  for (const [name, g] of got) assert.equal(g.entry.file, join(dir, threeShardMap[name as keyof typeof threeShardMap]));
});

test('readTensors with names reads only those tensors, across shards', async () => {
  const dir = await modelDir(threeShards, threeShardMap);
  const got = await readAll(dir, new Set(['head', 'layer0']));
  assert.deepEqual([...got.keys()], ['layer0', 'head']);
  assert.deepEqual(got.get('head')?.values, [9, 10]);
});

test('model.safetensors takes precedence over an index, as in transformers', async () => {
  const dir = await modelDir({ 'model.safetensors': [tensor('only', [1])] }, { other: 'gone.safetensors' });
  const ckpt = await openCheckpoint(dir);
  assert.deepEqual(ckpt.tensorNames(), ['only']);
  await ckpt.close();
});

test('a folder with neither model.safetensors nor an index is MODEL_FILE_MISSING', async () => {
  const dir = await modelDir({ 'pytorch_model.safetensors': [tensor('a', [1])] });
  await assert.rejects(openCheckpoint(dir), hasCode('MODEL_FILE_MISSING', dir, 'model.safetensors.index.json'));
});

test('an index naming a shard file that does not exist is MODEL_FILE_MISSING naming that file', async () => {
  const dir = await modelDir(
    { 'model-00001-of-00002.safetensors': [tensor('a', [1])] },
    { a: 'model-00001-of-00002.safetensors', b: 'model-00002-of-00002.safetensors' },
  );
  await assert.rejects(openCheckpoint(dir), hasCode('MODEL_FILE_MISSING', join(dir, 'model-00002-of-00002.safetensors')));
});

test('an index listing a tensor its shard does not hold is SAFETENSORS_INDEX_INVALID', async () => {
  const dir = await modelDir(threeShards, { ...threeShardMap, ghost: 'model-00002-of-00003.safetensors' });
  await assert.rejects(openCheckpoint(dir), hasCode('SAFETENSORS_INDEX_INVALID', "'ghost'", 'model-00002-of-00003.safetensors'));
});

test('an index placing a tensor in the wrong shard is SAFETENSORS_INDEX_INVALID', async () => {
  const dir = await modelDir(threeShards, { ...threeShardMap, norm: 'model-00001-of-00003.safetensors' });
  await assert.rejects(openCheckpoint(dir), hasCode('SAFETENSORS_INDEX_INVALID', "'norm'"));
});

test('a shard holding a tensor the index does not list is SAFETENSORS_INDEX_INVALID', async () => {
  const { head: _head, ...withoutHead } = threeShardMap;
  const dir = await modelDir(threeShards, withoutHead);
  await assert.rejects(openCheckpoint(dir), hasCode('SAFETENSORS_INDEX_INVALID', "'head'", 'does not list'));
});

test('shard names that would leave the model folder are SAFETENSORS_INDEX_INVALID', async () => {
  for (const escape of ['../outside.safetensors', '/etc/passwd', 'sub/../../x.safetensors', '', '.', 'a\\..\\..\\x']) {
    const dir = await modelDir(threeShards, { ...threeShardMap, norm: escape });
    await assert.rejects(openCheckpoint(dir), hasCode('SAFETENSORS_INDEX_INVALID', "'norm'"), `'${escape}' must be refused`);
  }
});

test('an index that is not JSON, lacks weight_map or maps to non-strings is SAFETENSORS_INDEX_INVALID', async () => {
  const bad = ['{"weight_map": ', '[]', '{"metadata": {}}', '{"weight_map": {"a": 3}}', '{"weight_map": {}}', '{"weight_map": []}'];
  for (const text of bad) {
    const dir = await modelDir(threeShards, text);
    await assert.rejects(openCheckpoint(dir), hasCode('SAFETENSORS_INDEX_INVALID', 'model.safetensors.index.json'), text);
  }
});

test('a corrupt shard is reported with that shard\'s path and its own error code', async () => {
  const dir = await modelDir(threeShards, threeShardMap);
  const shard = join(dir, 'model-00002-of-00003.safetensors');
  await writeFile(shard, Buffer.from([1, 2, 3]));
  await assert.rejects(openCheckpoint(dir), hasCode('SAFETENSORS_TOO_SHORT', shard));
});

test('an unreadable dtype in a later shard fails readTensors before any tensor is handed over', async () => {
  const dir = await modelDir(threeShards, threeShardMap);
  // Replace shard 2 with an I32 tensor of the same name, written by hand.
  const header = Buffer.from(JSON.stringify({ layer1: { dtype: 'I32', shape: [2], data_offsets: [0, 8] } }));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(header.length));
  await writeFile(join(dir, 'model-00002-of-00003.safetensors'), Buffer.concat([len, header, Buffer.alloc(8)]));
  const ckpt = await openCheckpoint(dir);
  try {
    let calls = 0;
    await assert.rejects(ckpt.readTensors(() => void calls++), hasCode('SAFETENSORS_UNSUPPORTED_DTYPE', "'layer1'", 'I32'));
    assert.equal(calls, 0);
    await ckpt.readTensors(() => void calls++, new Set(['embed', 'head']));
    assert.equal(calls, 2);
  } finally {
    await ckpt.close();
  }
});
