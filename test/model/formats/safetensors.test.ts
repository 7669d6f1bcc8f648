import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ErrorCode } from '../../../src/errors.js';
import {
  encodeSafetensors,
  SafetensorsReader,
  writeSafetensors,
  type TensorEntry,
} from '../../../src/model/formats/safetensors.js';
import { hasCode } from '../../helpers/error-matchers.js';

const dir = await mkdtemp(join(tmpdir(), 'safetensors-test-'));
after(() => rm(dir, { recursive: true, force: true }));
let fileCounter = 0;

function bitsOf(a: Float32Array): number[] {
  return [...new Uint32Array(a.buffer, a.byteOffset, a.length)];
}

function f32FromBits(bits: number[]): Float32Array {
  return new Float32Array(new Uint32Array(bits).buffer);
}

/** A file with a hand-written header: `header` is JSON text or an object, then `data` bytes. */
async function rawFile(header: string | object, data: Uint8Array | number = 0, headerLength?: bigint): Promise<string> {
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(headerLength ?? BigInt(json.length));
  const body = typeof data === 'number' ? new Uint8Array(data) : data;
  const path = join(dir, `raw-${fileCounter++}.safetensors`);
  await writeFile(path, Buffer.concat([len, json, body]));
  return path;
}

async function saved(tensors: Parameters<typeof encodeSafetensors>[0], metadata?: Record<string, string>): Promise<string> {
  const path = join(dir, `enc-${fileCounter++}.safetensors`);
  await writeFile(path, encodeSafetensors(tensors, metadata));
  return path;
}

async function readAll(path: string, names?: Set<string>): Promise<{ entry: TensorEntry; data: Float32Array }[]> {
  const reader = await SafetensorsReader.open(path);
  const out: { entry: TensorEntry; data: Float32Array }[] = [];
  try {
    await reader.readTensors((entry, data) => void out.push({ entry, data }), names);
  } finally {
    await reader.close();
  }
  return out;
}

async function rejectsOpen(path: string, code: ErrorCode, ...mentions: string[]): Promise<void> {
  await assert.rejects(SafetensorsReader.open(path), hasCode(code, path, ...mentions));
  // the same bytes already in memory (as the adapter store parses checksummed files) fail the same way
  const size = await stat(path).then((st) => st.size, () => -1);
  if (size >= 0 && size < 1 << 20) await assert.rejects(SafetensorsReader.fromBytes(await readFile(path), path), hasCode(code, path, ...mentions));
}

// ---- round trips -------------------------------------------------------------------------

test('F32, F16 and BF16 tensors with exactly representable values round-trip bit for bit, with metadata', async () => {
  const f32 = f32FromBits([0x00000000, 0x80000000, 0x3f800001, 0x00000001, 0x7f7fffff, 0xff800000, 0x7fc00123]);
  const f16 = new Float32Array([0, -0, 1, -2, 0.5, 65504, 2 ** -24, 1023 * 2 ** -24, 2 ** -14, 1.5, -1024, Infinity]);
  const bf16 = new Float32Array([0, -0, 1, -3.5, 2 ** 100, 2 ** -130, 255, -Infinity, 3.3895313892515355e38]);
  const path = await saved(
    [
      { name: 'a.f32', shape: [7], dtype: 'F32', data: f32 },
      { name: 'b.f16', shape: [3, 4], dtype: 'F16', data: f16 },
      { name: 'c.bf16', shape: [9, 1], dtype: 'BF16', data: bf16 },
      { name: 'd.scalar', shape: [], dtype: 'F16', data: new Float32Array([7]) },
      { name: 'e.empty', shape: [0, 3], dtype: 'F32', data: new Float32Array(0) },
    ],
    { format: 'pt', note: 'ünïcode' },
  );
  const reader = await SafetensorsReader.open(path);
  assert.deepEqual(reader.metadata, { format: 'pt', note: 'ünïcode' });
  assert.deepEqual(reader.entry('b.f16'), { name: 'b.f16', dtype: 'F16', shape: [3, 4], begin: 28, end: 52 });
  await reader.close();
  const got = await readAll(path);
  assert.deepEqual(got.map((g) => g.entry.name), ['a.f32', 'b.f16', 'c.bf16', 'd.scalar', 'e.empty']);
  assert.deepEqual(bitsOf(got[0].data), bitsOf(f32));
  assert.deepEqual(bitsOf(got[1].data), bitsOf(f16));
  assert.deepEqual(bitsOf(got[2].data), bitsOf(bf16));
  assert.deepEqual([...got[3].data], [7]);
  assert.equal(got[4].data.length, 0);
});

test('writeSafetensors writes a readable file and leaves no temporary file behind', async () => {
  const sub = await mkdtemp(join(dir, 'write-'));
  const path = join(sub, 'adapter_model.safetensors');
  await writeSafetensors(path, [{ name: 'w', shape: [2], dtype: 'BF16', data: new Float32Array([1, -2]) }]);
  assert.deepEqual(await readdir(sub), ['adapter_model.safetensors']);
  const [t] = await readAll(path);
  assert.deepEqual([...t.data], [1, -2]);
});

test('tensors larger than one read chunk are read whole, for F32 and F16', async () => {
  const n = 5_000_000; // 20 MB as F32, 10 MB as F16: both span several 16 MiB chunks or cross one
  const big = new Float32Array(n);
  for (let i = 0; i < n; i++) big[i] = (i % 4096) - 2048; // integers |x| <= 2048 are exact in f16
  const f16n = 9_000_000;
  const big16 = new Float32Array(f16n);
  for (let i = 0; i < f16n; i++) big16[i] = (i % 4000) - 2000;
  const path = await saved([
    { name: 'big32', shape: [n], dtype: 'F32', data: big },
    { name: 'big16', shape: [f16n], dtype: 'F16', data: big16 },
  ]);
  const got = await readAll(path);
  assert.ok(got[0].data.every((v, i) => v === big[i]));
  assert.ok(got[1].data.every((v, i) => v === big16[i]));
});

test('tensors at file offsets that are not 4-byte aligned are read correctly', async () => {
  // 9-byte-aligned data start: the header is deliberately not padded.
  const header = '{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F16","shape":[1],"data_offsets":[8,10]}} ';
  assert.notEqual((8 + Buffer.byteLength(header)) % 4, 0);
  const data = Buffer.alloc(10);
  data.writeFloatLE(1.25, 0);
  data.writeFloatLE(-3, 4);
  data.writeUInt16LE(0x3c00, 8);
  const got = await readAll(await rawFile(header, data));
  assert.deepEqual([...got[0].data], [1.25, -3]);
  assert.deepEqual([...got[1].data], [1]);
});

test('readTensors reads only the named tensors, each once, in file order', async () => {
  const t = (name: string, v: number) => ({ name, shape: [1], dtype: 'F32' as const, data: new Float32Array([v]) });
  const path = await saved([t('z', 1), t('a', 2), t('m', 3), t('b', 4)]);
  const got = await readAll(path, new Set(['b', 'z', 'not-there']));
  assert.deepEqual(got.map((g) => [g.entry.name, g.data[0]]), [['z', 1], ['b', 4]]);
});

test('a reader over bytes in memory lists and reads exactly what the file reader does', async () => {
  const data = new Float32Array(3000).map((_, i) => Math.sin(i));
  const path = await saved([
    { name: 'x', shape: [3000], dtype: 'BF16', data },
    { name: 'y', shape: [10, 300], dtype: 'F32', data },
  ]);
  const fromFile = await readAll(path);
  const reader = await SafetensorsReader.fromBytes(await readFile(path), path);
  const fromBytes: { name: string; data: Float32Array }[] = [];
  await reader.readTensors((entry, d) => void fromBytes.push({ name: entry.name, data: d }));
  await reader.close();
  assert.deepEqual(fromBytes.map((t) => t.name), fromFile.map((t) => t.entry.name));
  fromBytes.forEach((t, i) => assert.deepEqual(t.data, fromFile[i].data));
});

// ---- header layout -----------------------------------------------------------------------

test('encoded header is the JSON the Rust crate writes, space-padded to 8 bytes, with contiguous offsets in given order', () => {
  const buf = encodeSafetensors(
    [
      { name: 'b', shape: [2], dtype: 'F32', data: new Float32Array([1, 2]) },
      { name: '10', shape: [1, 3], dtype: 'F16', data: new Float32Array([1, 2, 3]) },
      { name: 'a', shape: [1], dtype: 'BF16', data: new Float32Array([1]) },
    ],
    { format: 'pt' },
  );
  const n = Number(buf.readBigUInt64LE(0));
  assert.equal(n % 8, 0);
  const text = buf.subarray(8, 8 + n).toString('utf8');
  const json =
    '{"__metadata__":{"format":"pt"},' +
    '"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' +
    '"10":{"dtype":"F16","shape":[1,3],"data_offsets":[8,14]},' +
    '"a":{"dtype":"BF16","shape":[1],"data_offsets":[14,16]}}';
  assert.equal(text.trimEnd(), json);
  assert.match(text.slice(json.length), /^ {0,7}$/);
  assert.equal(buf.length, 8 + n + 16);
  assert.equal(buf.readFloatLE(8 + n + 4), 2);
  assert.equal(buf.readUInt16LE(8 + n + 14), 0x3f80);
});

test('encoding refuses data whose length does not match the shape, and duplicate names', () => {
  assert.throws(
    () => encodeSafetensors([{ name: 'w', shape: [2, 2], dtype: 'F32', data: new Float32Array(3) }]),
    hasCode('SAFETENSORS_SIZE_MISMATCH', "'w'"),
  );
  const t = { name: 'w', shape: [1], dtype: 'F32' as const, data: new Float32Array(1) };
  assert.throws(() => encodeSafetensors([t, t]), hasCode('SAFETENSORS_HEADER_INVALID', "'w'"));
});

// ---- corrupt files -----------------------------------------------------------------------

const okEntry = { dtype: 'F32', shape: [2], data_offsets: [0, 8] };

test('a file shorter than 8 bytes is refused as SAFETENSORS_TOO_SHORT', async () => {
  const path = join(dir, 'short.safetensors');
  await writeFile(path, Buffer.from([1, 2, 3, 4, 5]));
  await rejectsOpen(path, 'SAFETENSORS_TOO_SHORT', '5 bytes');
});

test('a header length past the end of the file is refused with both numbers', async () => {
  await rejectsOpen(await rawFile('{}', 10, 1000n), 'SAFETENSORS_HEADER_PAST_EOF', '1000', '12');
  await rejectsOpen(await rawFile('{}', 0, 2n ** 63n), 'SAFETENSORS_HEADER_PAST_EOF', String(2n ** 63n));
});

test('a header over 100 MB is refused before it is read, even if the file is that long', async () => {
  const path = join(dir, 'huge-header.safetensors');
  const fh = await open(path, 'w');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(150_000_000n);
  await fh.write(len, 0, 8, 0);
  await fh.truncate(150_000_100); // sparse: costs no disk
  await fh.close();
  await rejectsOpen(path, 'SAFETENSORS_HEADER_INVALID', '150000000');
});

test('headers that are not a JSON object, or whose entries are malformed, are SAFETENSORS_HEADER_INVALID', async () => {
  const bad: [string | object, string][] = [
    ['{"a": ', 'JSON'],
    ['[1, 2]', '{'],
    ['  {}', '{'],
    [Buffer.from([0x7b, 0xff, 0x7d]).toString('latin1'), 'UTF-8'],
    [{ a: 3 }, "'a'"],
    [{ a: { shape: [2], data_offsets: [0, 8] } }, 'dtype'],
    [{ a: { dtype: 'F32', data_offsets: [0, 8] } }, 'shape'],
    [{ a: { dtype: 'F32', shape: [2] } }, 'data_offsets'],
    [{ a: { dtype: 'F32', shape: [-2], data_offsets: [0, 8] } }, 'shape'],
    [{ a: { dtype: 'F32', shape: [2.5], data_offsets: [0, 8] } }, 'shape'],
    [{ a: { dtype: 'F32', shape: [2], data_offsets: [0, 8.5] } }, 'data_offsets'],
    [{ a: { dtype: 'F32', shape: [2], data_offsets: [-8, 0] } }, 'data_offsets'],
    [{ a: { dtype: 'F32', shape: [2], data_offsets: [0, 8, 16] } }, 'data_offsets'],
    [{ a: { dtype: 'F32', shape: [2], data_offsets: [8, 0] } }, 'before'],
    [{ a: { dtype: 'F32', shape: [2], data_offsets: [0, 2 ** 60] } }, 'data_offsets'],
    [{ __metadata__: { k: 1 }, a: okEntry }, '__metadata__'],
    [{ __metadata__: [], a: okEntry }, '__metadata__'],
  ];
  for (const [header, mention] of bad) {
    const path = typeof header === 'string' ? await rawFileLatin1(header, 8) : await rawFile(header, 8);
    await rejectsOpen(path, 'SAFETENSORS_HEADER_INVALID', mention);
  }
});

/** Like rawFile but keeps the header's bytes as given (for invalid UTF-8). */
async function rawFileLatin1(header: string, data: number): Promise<string> {
  const json = Buffer.from(header, 'latin1');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  const path = join(dir, `raw-${fileCounter++}.safetensors`);
  await writeFile(path, Buffer.concat([len, json, Buffer.alloc(data)]));
  return path;
}

test('an unknown dtype string is refused at open as SAFETENSORS_UNKNOWN_DTYPE', async () => {
  await rejectsOpen(await rawFile({ a: { dtype: 'F128', shape: [1], data_offsets: [0, 16] } }, 16), 'SAFETENSORS_UNKNOWN_DTYPE', 'F128', "'a'");
});

test('known dtypes other than F32/F16/BF16 open and are listed, but reading them is SAFETENSORS_UNSUPPORTED_DTYPE before any tensor is read', async () => {
  for (const [dtype, bytes] of [['I32', 8], ['F64', 16], ['I64', 16], ['U8', 2], ['BOOL', 2], ['F8_E4M3', 2], ['F8_E5M2', 2], ['U16', 4]] as const) {
    const path = await rawFile({ first: okEntry, odd: { dtype, shape: [2], data_offsets: [8, 8 + bytes] } }, 8 + bytes);
    const reader = await SafetensorsReader.open(path);
    try {
      assert.deepEqual(reader.entries().map((e) => [e.name, e.dtype]), [['first', 'F32'], ['odd', dtype]]);
      let calls = 0;
      await assert.rejects(reader.readTensors(() => void calls++), hasCode('SAFETENSORS_UNSUPPORTED_DTYPE', path, dtype, "'odd'"));
      assert.equal(calls, 0);
      await reader.readTensors(() => void calls++, new Set(['first']));
      assert.equal(calls, 1);
    } finally {
      await reader.close();
    }
  }
});

test('a byte length that disagrees with shape times dtype size is SAFETENSORS_SIZE_MISMATCH naming the tensor', async () => {
  await rejectsOpen(await rawFile({ w: { dtype: 'F32', shape: [3], data_offsets: [0, 8] } }, 8), 'SAFETENSORS_SIZE_MISMATCH', "'w'", '12', '8');
  await rejectsOpen(await rawFile({ h: { dtype: 'BF16', shape: [2, 2], data_offsets: [0, 16] } }, 16), 'SAFETENSORS_SIZE_MISMATCH', "'h'");
  // A shape whose element count overflows 2^53 must not wrap around to a matching size.
  const huge = { dtype: 'F32', shape: [2 ** 52, 2 ** 52, 0x10], data_offsets: [0, 0] };
  await rejectsOpen(await rawFile({ x: huge }, 0), 'SAFETENSORS_SIZE_MISMATCH', "'x'");
});

test('overlapping tensors are SAFETENSORS_OFFSETS_OVERLAP naming both tensors', async () => {
  const header = { a: okEntry, b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } };
  await rejectsOpen(await rawFile(header, 12), 'SAFETENSORS_OFFSETS_OVERLAP', "'a'", "'b'");
});

test('holes, trailing bytes and a data region shorter than the last tensor are SAFETENSORS_OFFSETS_GAP', async () => {
  const b = (begin: number) => ({ dtype: 'F32', shape: [2], data_offsets: [begin, begin + 8] });
  await rejectsOpen(await rawFile({ a: okEntry, b: b(12) }, 20), 'SAFETENSORS_OFFSETS_GAP', '[8, 12)', "'a'");
  await rejectsOpen(await rawFile({ b: b(4) }, 12), 'SAFETENSORS_OFFSETS_GAP', 'start');
  await rejectsOpen(await rawFile({ a: okEntry }, 12), 'SAFETENSORS_OFFSETS_GAP', '4 trailing bytes');
  await rejectsOpen(await rawFile({ a: okEntry, b: b(8) }, 12), 'SAFETENSORS_OFFSETS_GAP', "'b'", '16', '12');
  await rejectsOpen(await rawFile({}, 3), 'SAFETENSORS_OFFSETS_GAP', '3 trailing bytes');
});

test('an empty header with no data is a valid file with no tensors', async () => {
  const reader = await SafetensorsReader.open(await rawFile('{}', 0));
  assert.deepEqual(reader.entries(), []);
  assert.deepEqual(reader.metadata, {});
  await reader.close();
});

test('a missing file is MODEL_FILE_MISSING with its path', async () => {
  await rejectsOpen(join(dir, 'nope.safetensors'), 'MODEL_FILE_MISSING');
});
