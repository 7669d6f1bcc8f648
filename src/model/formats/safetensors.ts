/**
 * The safetensors format, read and written exactly as the reference Rust crate does:
 *
 *   [u64 LE: N] [N bytes: UTF-8 JSON header] [byte buffer]
 *   header = { name: { dtype, shape: [..], data_offsets: [begin, end] }, "__metadata__"?: {str: str} }
 *
 * Offsets are relative to the start of the byte buffer, and the tensors must tile the buffer
 * exactly: no holes, no overlaps, nothing after the last tensor. The reader checks all of that
 * at open, from the header alone, so a corrupt file fails before any tensor is read.
 */
import { open, rename, rm, writeFile, type FileHandle } from 'node:fs/promises';
import { endianness } from 'node:os';
import { ModelFormatError } from '../../errors.js';
import { decodeBf16Into, decodeF16Into, f32ToBf16Bits, f32ToF16Bits } from './float-formats.js';

export { bf16BitsToF32, f16BitsToF32, f32ToBf16Bits, f32ToF16Bits } from './float-formats.js';

/** Dtypes this project reads (converting to float32) and writes. */
export type StoredDtype = 'F32' | 'F16' | 'BF16';

/** begin/end are byte offsets relative to the start of the byte buffer, not of the file. */
export interface TensorEntry {
  name: string;
  dtype: string;
  shape: number[];
  begin: number;
  end: number;
}

export interface TensorToWrite {
  name: string;
  shape: number[];
  dtype: StoredDtype;
  data: Float32Array;
}

/** Bits per element of every dtype the Rust crate knows; sub-byte types pack several per byte. */
const DTYPE_BITS: ReadonlyMap<string, number> = new Map([
  ['BOOL', 8], ['F4', 4], ['F6_E2M3', 6], ['F6_E3M2', 6],
  ['U8', 8], ['I8', 8], ['F8_E5M2', 8], ['F8_E4M3', 8], ['F8_E8M0', 8],
  ['I16', 16], ['U16', 16], ['F16', 16], ['BF16', 16],
  ['I32', 32], ['U32', 32], ['F32', 32],
  ['C64', 64], ['F64', 64], ['I64', 64], ['U64', 64],
]);

const READABLE: ReadonlySet<string> = new Set<StoredDtype>(['F32', 'F16', 'BF16']);

/** The Rust crate's MAX_HEADER_SIZE: a bigger header is refused before it is allocated. */
const MAX_HEADER_BYTES = 100_000_000;

/** Bytes per positioned read: bounds the scratch buffer and single syscalls on 1 GB tensors. */
const CHUNK_BYTES = 16 * 1024 * 1024;

/** The format is little-endian; typed arrays use the host's order. */
const HOST_IS_LE = endianness() === 'LE';

/** Refuses a dtype the reader cannot convert to float32 (it is still listed by entries()). */
export function assertReadableDtype(entry: TensorEntry, file: string): void {
  if (!READABLE.has(entry.dtype)) {
    throw new ModelFormatError(
      'SAFETENSORS_UNSUPPORTED_DTYPE',
      file,
      `tensor '${entry.name}' has dtype ${entry.dtype}; only F32, F16 and BF16 can be loaded`,
    );
  }
}

/** What the reader needs of a file: its size and positioned reads (a file handle, or bytes already in memory). */
interface PositionedSource {
  size: number;
  read(target: Uint8Array, offset: number, length: number, position: number): Promise<{ bytesRead: number }>;
  close(): Promise<void>;
}

function bytesSource(bytes: Uint8Array): PositionedSource {
  return {
    size: bytes.length,
    async read(target, offset, length, position) {
      const n = Math.max(0, Math.min(length, bytes.length - position));
      target.set(bytes.subarray(position, position + n), offset);
      return { bytesRead: n };
    },
    async close() {},
  };
}

export class SafetensorsReader {
  readonly path: string;
  readonly metadata: Record<string, string>;
  private readonly fh: PositionedSource;
  /** File offset of the byte buffer: 8 + N. */
  private readonly dataStart: number;
  private readonly sorted: TensorEntry[];
  private readonly byName: Map<string, TensorEntry>;
  private closed = false;

  private constructor(path: string, fh: PositionedSource, dataStart: number, sorted: TensorEntry[], metadata: Record<string, string>) {
    this.path = path;
    this.fh = fh;
    this.dataStart = dataStart;
    this.sorted = sorted;
    this.byName = new Map(sorted.map((e) => [e.name, e]));
    this.metadata = metadata;
  }

  /** Opens the file and reads and validates its header; no tensor data is read. */
  static async open(path: string): Promise<SafetensorsReader> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        throw new ModelFormatError('MODEL_FILE_MISSING', path, 'file does not exist', { cause: err });
      }
      throw err;
    }
    const { size } = await fh.stat().catch(async (err: unknown) => {
      await fh.close();
      throw err;
    });
    return SafetensorsReader.fromSource({ size, read: (t, o, l, p) => fh.read(t, o, l, p), close: () => fh.close() }, path);
  }

  /**
   * Reads the header of a file already in memory (e.g. bytes just checked against a checksum),
   * so it is not read from disk a second time; `path` only names it in errors.
   */
  static async fromBytes(bytes: Uint8Array, path: string): Promise<SafetensorsReader> {
    return SafetensorsReader.fromSource(bytesSource(bytes), path);
  }

  private static async fromSource(fh: PositionedSource, path: string): Promise<SafetensorsReader> {
    const size = fh.size;
    try {
      if (size < 8) {
        throw new ModelFormatError('SAFETENSORS_TOO_SHORT', path, `file is ${size} bytes, too short for the 8-byte header length`);
      }
      const lengthBytes = new Uint8Array(8);
      await readFully(fh, lengthBytes, 0, path, 'the header length');
      const headerLength = Buffer.from(lengthBytes.buffer).readBigUInt64LE(0);
      if (headerLength > BigInt(size - 8)) {
        throw new ModelFormatError(
          'SAFETENSORS_HEADER_PAST_EOF',
          path,
          `header length is ${headerLength} bytes but only ${size - 8} bytes follow it (file is ${size} bytes)`,
        );
      }
      const n = Number(headerLength);
      if (n > MAX_HEADER_BYTES) {
        throw new ModelFormatError('SAFETENSORS_HEADER_INVALID', path, `header is ${n} bytes, more than the ${MAX_HEADER_BYTES}-byte limit`);
      }
      const headerBytes = new Uint8Array(n);
      await readFully(fh, headerBytes, 8, path, 'the header');
      const { entries, metadata } = parseHeader(headerBytes, path);
      const sorted = checkLayout(entries, size - 8 - n, path);
      return new SafetensorsReader(path, fh, 8 + n, sorted, metadata);
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  /** Every tensor, sorted by begin (file order). */
  entries(): TensorEntry[] {
    return this.sorted.map(copyEntry);
  }

  entry(name: string): TensorEntry | undefined {
    const e = this.byName.get(name);
    return e && copyEntry(e);
  }

  /**
   * Reads every tensor (or only those in `names`; names the file lacks are ignored) once, in
   * file order, as float32, and hands each to onTensor before reading the next, so at most one
   * tensor's host copy is alive here. Every selected dtype is checked before anything is read.
   */
  async readTensors(onTensor: (entry: TensorEntry, data: Float32Array) => void | Promise<void>, names?: Set<string>): Promise<void> {
    const selected = names ? this.sorted.filter((e) => names.has(e.name)) : this.sorted;
    for (const e of selected) assertReadableDtype(e, this.path);
    let scratch: Uint16Array | undefined;
    for (const e of selected) {
      let data: Float32Array;
      if (e.dtype === 'F32') {
        data = await this.readF32(e);
      } else {
        scratch ??= new Uint16Array(CHUNK_BYTES / 2);
        data = await this.read16(e, scratch, e.dtype === 'F16' ? decodeF16Into : decodeBf16Into);
      }
      await onTensor(copyEntry(e), data);
    }
  }

  /** F32 is read straight into the result, which is freshly allocated and so aligned. */
  private async readF32(e: TensorEntry): Promise<Float32Array> {
    const out = new Float32Array((e.end - e.begin) / 4);
    const bytes = new Uint8Array(out.buffer);
    for (let off = 0; off < bytes.length; off += CHUNK_BYTES) {
      const chunk = bytes.subarray(off, Math.min(off + CHUNK_BYTES, bytes.length));
      await readFully(this.fh, chunk, this.dataStart + e.begin + off, this.path, `tensor '${e.name}'`);
    }
    if (!HOST_IS_LE) Buffer.from(out.buffer).swap32();
    return out;
  }

  /** 16-bit floats go through an aligned scratch chunk, so no tensor-sized temporary is made. */
  private async read16(e: TensorEntry, scratch: Uint16Array, decode: (src: Uint16Array, dst: Float32Array) => void): Promise<Float32Array> {
    const count = (e.end - e.begin) / 2;
    const out = new Float32Array(count);
    for (let i = 0; i < count; i += scratch.length) {
      const k = Math.min(scratch.length, count - i);
      const bytes = new Uint8Array(scratch.buffer, 0, k * 2);
      await readFully(this.fh, bytes, this.dataStart + e.begin + i * 2, this.path, `tensor '${e.name}'`);
      if (!HOST_IS_LE) Buffer.from(bytes.buffer, 0, k * 2).swap16();
      decode(scratch.subarray(0, k), out.subarray(i, i + k));
    }
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close();
  }
}

function copyEntry(e: TensorEntry): TensorEntry {
  return { ...e, shape: [...e.shape] };
}

/** A positioned read that loops over short reads; running out of file means it was truncated. */
async function readFully(fh: PositionedSource, target: Uint8Array, position: number, path: string, what: string): Promise<void> {
  let filled = 0;
  while (filled < target.length) {
    const { bytesRead } = await fh.read(target, filled, target.length - filled, position + filled);
    if (bytesRead === 0) {
      throw new ModelFormatError('SAFETENSORS_OFFSETS_GAP', path, `file ended at byte ${position + filled} while reading ${what}`);
    }
    filled += bytesRead;
  }
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function isNonNegativeInt(v: unknown): v is number {
  // Safe integers only: JSON numbers past 2^53 have already lost precision in JSON.parse.
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function parseHeader(bytes: Uint8Array, path: string): { entries: TensorEntry[]; metadata: Record<string, string> } {
  const invalid = (msg: string, cause?: unknown): ModelFormatError =>
    new ModelFormatError('SAFETENSORS_HEADER_INVALID', path, msg, cause === undefined ? undefined : { cause });
  // The Rust crate insists on '{' first: leading whitespace is not valid even though JSON allows it.
  if (bytes[0] !== 0x7b) throw invalid('header does not start with "{"');
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (err) {
    throw invalid(`header is not valid UTF-8 JSON: ${(err as Error).message}`, err);
  }
  if (!isPlainObject(json)) throw invalid('header is not a JSON object');

  let metadata: Record<string, string> = {};
  const entries: TensorEntry[] = [];
  for (const [name, value] of Object.entries(json)) {
    if (name === '__metadata__') {
      if (value === null) continue; // serde reads null as an absent Option
      if (!isPlainObject(value)) throw invalid('"__metadata__" is not an object');
      for (const [k, v] of Object.entries(value)) {
        if (typeof v !== 'string') throw invalid(`"__metadata__" value for '${k}' is not a string`);
      }
      // fromEntries defines own properties, so even a "__proto__" key is kept as data.
      metadata = Object.fromEntries(Object.entries(value)) as Record<string, string>;
      continue;
    }
    if (!isPlainObject(value)) throw invalid(`entry '${name}' is not an object`);
    const { dtype, shape, data_offsets: offsets } = value;
    if (typeof dtype !== 'string') throw invalid(`tensor '${name}' has no string "dtype"`);
    if (!Array.isArray(shape) || !shape.every(isNonNegativeInt)) {
      throw invalid(`tensor '${name}' "shape" is not an array of non-negative integers`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegativeInt)) {
      throw invalid(`tensor '${name}' "data_offsets" is not a pair of non-negative integers`);
    }
    const [begin, end] = offsets as [number, number];
    if (end < begin) throw invalid(`tensor '${name}' "data_offsets" end ${end} is before begin ${begin}`);
    const bits = DTYPE_BITS.get(dtype);
    if (bits === undefined) {
      throw new ModelFormatError('SAFETENSORS_UNKNOWN_DTYPE', path, `tensor '${name}' has unknown dtype '${dtype}'`);
    }
    // BigInt because a hostile shape can overflow 2^53 long before the check would notice.
    const totalBits = shape.reduce((acc: bigint, d: number) => acc * BigInt(d), 1n) * BigInt(bits);
    if (totalBits % 8n !== 0n || totalBits / 8n !== BigInt(end - begin)) {
      throw new ModelFormatError(
        'SAFETENSORS_SIZE_MISMATCH',
        path,
        `tensor '${name}' is ${dtype} [${shape.join(', ')}], which needs ${Number(totalBits) / 8} bytes, but data_offsets span ${end - begin}`,
      );
    }
    entries.push({ name, dtype, shape: shape as number[], begin, end });
  }
  return { entries, metadata };
}

/** Sorts entries by offset and checks they tile [0, dataLength) exactly. */
function checkLayout(entries: TensorEntry[], dataLength: number, path: string): TensorEntry[] {
  const sorted = [...entries].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let cursor = 0;
  let previous: TensorEntry | undefined;
  for (const e of sorted) {
    if (e.begin < cursor) {
      throw new ModelFormatError(
        'SAFETENSORS_OFFSETS_OVERLAP',
        path,
        `tensor '${e.name}' [${e.begin}, ${e.end}) overlaps tensor '${previous!.name}' [${previous!.begin}, ${previous!.end})`,
      );
    }
    if (e.begin > cursor) {
      const after = previous ? `after tensor '${previous.name}'` : 'at the start of the data';
      throw new ModelFormatError('SAFETENSORS_OFFSETS_GAP', path, `bytes [${cursor}, ${e.begin}) ${after} belong to no tensor`);
    }
    cursor = e.end;
    previous = e;
  }
  if (cursor > dataLength) {
    throw new ModelFormatError(
      'SAFETENSORS_OFFSETS_GAP',
      path,
      `tensor '${previous!.name}' ends at byte ${cursor} of the data, but the file holds only ${dataLength} data bytes`,
    );
  }
  if (cursor < dataLength) {
    throw new ModelFormatError('SAFETENSORS_OFFSETS_GAP', path, `${dataLength - cursor} trailing bytes after offset ${cursor} belong to no tensor`);
  }
  return sorted;
}

/**
 * Serialises tensors in the given order. The header is padded with spaces to a multiple of
 * 8 bytes, as the Rust crate does, so the byte buffer starts 8-byte aligned in the file.
 */
export function encodeSafetensors(tensors: TensorToWrite[], metadata?: Record<string, string>): Buffer {
  return encode(tensors, metadata, '(memory)');
}

function encode(tensors: TensorToWrite[], metadata: Record<string, string> | undefined, label: string): Buffer {
  const parts: string[] = [];
  if (metadata && Object.keys(metadata).length > 0) parts.push(`"__metadata__":${JSON.stringify(metadata)}`);
  const payloads: Uint8Array[] = [];
  const seen = new Set<string>();
  let offset = 0;
  for (const t of tensors) {
    if (t.name === '__metadata__' || seen.has(t.name)) {
      throw new ModelFormatError('SAFETENSORS_HEADER_INVALID', label, `tensor name '${t.name}' is reserved or used twice`);
    }
    seen.add(t.name);
    if (t.shape.some((d) => !isNonNegativeInt(d))) {
      throw new ModelFormatError('SAFETENSORS_HEADER_INVALID', label, `tensor '${t.name}' shape [${t.shape.join(', ')}] is not non-negative integers`);
    }
    const count = t.shape.reduce((a, d) => a * d, 1);
    if (count !== t.data.length) {
      throw new ModelFormatError(
        'SAFETENSORS_SIZE_MISMATCH',
        label,
        `tensor '${t.name}' shape [${t.shape.join(', ')}] holds ${count} values but ${t.data.length} were given`,
      );
    }
    const bytes = encodeData(t);
    payloads.push(bytes);
    // Keys are written by hand: JSON.stringify on an object would move integer-like names first.
    const info = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes.length] };
    parts.push(`${JSON.stringify(t.name)}:${JSON.stringify(info)}`);
    offset += bytes.length;
  }
  const json = Buffer.from(`{${parts.join(',')}}`, 'utf8');
  const headerLength = Math.ceil(json.length / 8) * 8;
  const out = Buffer.alloc(8 + headerLength + offset);
  out.writeBigUInt64LE(BigInt(headerLength), 0);
  json.copy(out, 8);
  out.fill(0x20, 8 + json.length, 8 + headerLength);
  let pos = 8 + headerLength;
  for (const p of payloads) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

/** Little-endian bytes of one tensor in its stored dtype. */
function encodeData(t: TensorToWrite): Uint8Array {
  const raw = t.dtype === 'F32' ? t.data.slice() : t.dtype === 'F16' ? f32ToF16Bits(t.data) : f32ToBf16Bits(t.data);
  const bytes = new Uint8Array(raw.buffer, raw.byteOffset, raw.byteLength);
  if (!HOST_IS_LE) {
    const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (t.dtype === 'F32') b.swap32();
    else b.swap16();
  }
  return bytes;
}

/** Writes to a temporary file and renames it, so readers never see a half-written file. */
export async function writeSafetensors(path: string, tensors: TensorToWrite[], metadata?: Record<string, string>): Promise<void> {
  const buf = encode(tensors, metadata, path);
  const tmp = `${path}.${process.pid}.tmp`;
  try {
    await writeFile(tmp, buf);
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}
