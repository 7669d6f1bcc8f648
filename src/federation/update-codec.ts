/**
 * The bytes of federated LoRA messages, both safetensors files with PEFT key names
 * (`base_model.model.<modulePath>.lora_{A,B,R}.weight`), F32, and string metadata:
 *
 *   client update  what the client trained this round (fedavg/flora A+B, ffa B, fedsb R)
 *                  __metadata__ {format: pt, job, round, client, method, numExamples, trainLoss}
 *   global state   what the coordinator sends down each round (a, b, r as present; ranks
 *                  may differ per module; empty for flora round 1)
 *                  __metadata__ {format: pt, job, round, method, modules: JSON [[path, in, out, rank], …]}
 *
 * Decoding is synchronous (the callers decode inside their round bookkeeping) and strict: an
 * update is checked against the job's module shapes and every problem is an
 * UpdateRejectedError with a stable reason.
 */
import { FederationError, UpdateRejectedError } from '../errors.js';
import { PROJECTIONS, projectionModulePath, type ProjectionName } from '../model/architecture/llama-weights.js';
import { endianness } from 'node:os';
import { encodeSafetensors, type TensorToWrite } from '../model/formats/safetensors.js';
import { FED_METHODS, factorShape, peftTensorName, type FactorSet, type FedMethod, type ModuleFactors } from './lora-factors.js';

export interface UpdateMeta {
  job: string;
  round: number;
  client: string;
  method: FedMethod;
  /** training examples this round: a positive integer (the client's aggregation weight) */
  numExamples: number;
  /** mean training loss: finite, ≥ 0 */
  trainLoss: number;
}

export interface UpdateExpectation {
  job: string;
  round: number;
  client: string;
  method: FedMethod;
  /** the job's modules (shapes and rank; factors ignored), in the job's order */
  modules: readonly ModuleFactors[];
  /** flora: this client's rank (defaults to each module's rank) */
  clientRank?: number;
}

export interface GlobalStateMeta {
  job: string;
  round: number;
  method: FedMethod;
}

type Letter = 'A' | 'B' | 'R';
const KEY: Record<Letter, 'a' | 'b' | 'r'> = { A: 'a', B: 'b', R: 'r' };

/** What a client uploads, per method. */
export const UPDATE_FACTORS: Record<FedMethod, readonly Letter[]> = { fedavg: ['A', 'B'], ffa: ['B'], flora: ['A', 'B'], fedsb: ['R'] };

/** What a global state must hold per module (ffa's A is derived from the seed, so optional). */
const GLOBAL_REQUIRED: Record<FedMethod, readonly Letter[]> = { fedavg: ['A', 'B'], ffa: ['B'], flora: ['A', 'B'], fedsb: ['A', 'B', 'R'] };

function tensorsOf(factors: FactorSet, letters: readonly Letter[], onlyPresent: boolean, what: string): TensorToWrite[] {
  const out: TensorToWrite[] = [];
  for (const m of factors.values()) {
    for (const l of letters) {
      const data = m[KEY[l]];
      const shape = factorShape(m, l);
      if (!data) {
        if (onlyPresent) continue;
        throw new FederationError('FED_JOB_INVALID', `${what}: lora_${l} of ${m.modulePath} is missing`);
      }
      if (data.length !== shape[0] * shape[1]) throw new FederationError('FED_JOB_INVALID', `${what}: lora_${l} of ${m.modulePath} holds ${data.length} values, not [${shape.join(', ')}]`);
      out.push({ name: peftTensorName(m.modulePath, l), shape, dtype: 'F32', data });
    }
  }
  return out;
}

/** A client's update file: only the factors its method trains. */
export function encodeUpdate(meta: UpdateMeta, factors: FactorSet): Buffer {
  return encodeSafetensors(tensorsOf(factors, UPDATE_FACTORS[meta.method], false, `update of client '${meta.client}'`), {
    format: 'pt',
    job: meta.job,
    round: String(meta.round),
    client: meta.client,
    method: meta.method,
    numExamples: String(meta.numExamples),
    trainLoss: String(meta.trainLoss),
  });
}

const POSITIVE_INT = /^[1-9][0-9]*$/;
const DECIMAL = /^[+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$/;

/**
 * Reads and checks a client's update against what the round expects, in this order:
 * not_safetensors (not a well-formed F32 safetensors file), metadata_mismatch (format, job,
 * round, client or method differ — the message names which), num_examples_invalid,
 * train_loss_invalid, unexpected_tensor, missing_tensor, shape_mismatch, not_finite.
 */
export function decodeUpdate(bytes: Uint8Array, expect: UpdateExpectation): { meta: UpdateMeta; factors: FactorSet } {
  const file = parse(bytes, (msg) => new UpdateRejectedError('not_safetensors', msg));
  const md = file.metadata;
  const who = `update of client '${expect.client}'`;
  const want: [string, string][] = [['format', 'pt'], ['job', expect.job], ['round', String(expect.round)], ['client', expect.client], ['method', expect.method]];
  const wrong = want.filter(([k, v]) => md[k] !== v);
  if (wrong.length > 0) {
    const list = wrong.map(([k, v]) => `${k} ${md[k] === undefined ? '(absent)' : JSON.stringify(md[k])}, expected ${JSON.stringify(v)}`).join('; ');
    throw new UpdateRejectedError('metadata_mismatch', `${who}: ${list}`);
  }
  const n = md.numExamples ?? '';
  if (!POSITIVE_INT.test(n) || !Number.isSafeInteger(Number(n))) throw new UpdateRejectedError('num_examples_invalid', `${who}: numExamples ${JSON.stringify(n)} is not a positive integer`);
  const loss = md.trainLoss ?? '';
  if (!DECIMAL.test(loss) || !Number.isFinite(Number(loss))) throw new UpdateRejectedError('train_loss_invalid', `${who}: trainLoss ${JSON.stringify(loss)} is not a finite number ≥ 0`);

  const skeletons = expect.modules.map((m) => ({ ...shapeOf(m), rank: expect.method === 'flora' ? (expect.clientRank ?? m.rank) : m.rank }));
  const factors = readFactors(file, skeletons, UPDATE_FACTORS[expect.method], UPDATE_FACTORS[expect.method], who, (reason, msg) => new UpdateRejectedError(reason, msg));
  const meta: UpdateMeta = { job: expect.job, round: expect.round, client: expect.client, method: expect.method, numExamples: Number(n), trainLoss: Number(loss) };
  return { meta, factors };
}

/** The global state file; factors are written as present, module shapes go in the metadata. */
export function encodeGlobalState(meta: GlobalStateMeta, factors: FactorSet): Buffer {
  const modules = [...factors.values()].map((m) => [m.modulePath, m.inFeatures, m.outFeatures, m.rank]);
  return encodeSafetensors(tensorsOf(factors, ['A', 'B', 'R'], true, `${meta.method} global state`), {
    format: 'pt',
    job: meta.job,
    round: String(meta.round),
    method: meta.method,
    modules: JSON.stringify(modules),
  });
}

/** Reads a global state; anything malformed is FED_DATA_INVALID naming the problem. */
export function decodeGlobalState(bytes: Uint8Array): { meta: GlobalStateMeta; factors: FactorSet } {
  const invalid = (msg: string) => new FederationError('FED_DATA_INVALID', `global state: ${msg}`);
  const file = parse(bytes, invalid);
  const md = file.metadata;
  if (md.format !== 'pt' || typeof md.job !== 'string' || !POSITIVE_INT.test(md.round ?? '') || !(FED_METHODS as readonly string[]).includes(md.method ?? '')) {
    throw invalid(`metadata ${JSON.stringify(md)} lacks format 'pt', job, a positive round or a known method`);
  }
  const method = md.method as FedMethod;
  let list: unknown;
  try {
    list = JSON.parse(md.modules ?? '');
  } catch {
    throw invalid('metadata "modules" is not JSON');
  }
  if (!Array.isArray(list)) throw invalid('metadata "modules" is not a list');
  const seen = new Set<string>();
  const skeletons = list.map((entry: unknown) => {
    const ok = Array.isArray(entry) && entry.length === 4 && typeof entry[0] === 'string' && entry.slice(1).every((d) => Number.isSafeInteger(d) && d > 0);
    const parsed = ok ? parseModulePath(entry[0] as string) : undefined;
    if (!ok || !parsed || seen.has(entry[0] as string)) throw invalid(`metadata "modules" entry ${JSON.stringify(entry)} is not a new [modulePath, in, out, rank]`);
    seen.add(entry[0] as string);
    const [modulePath, inFeatures, outFeatures, rank] = entry as [string, number, number, number];
    return { modulePath, ...parsed, inFeatures, outFeatures, rank };
  });
  const factors = readFactors(file, skeletons, ['A', 'B', 'R'], GLOBAL_REQUIRED[method], 'global state', (_reason, msg) => new FederationError('FED_DATA_INVALID', msg));
  return { meta: { job: md.job, round: Number(md.round), method }, factors };
}

function parse(bytes: Uint8Array, fail: (msg: string) => Error): ParsedSafetensors {
  try {
    return parseF32Safetensors(bytes);
  } catch (err) {
    const e = fail((err as Error).message);
    (e as { cause?: unknown }).cause = err;
    throw e;
  }
}

function shapeOf(m: ModuleFactors): ModuleFactors {
  return { modulePath: m.modulePath, layer: m.layer, proj: m.proj, inFeatures: m.inFeatures, outFeatures: m.outFeatures, rank: m.rank };
}

/** `model.layers.{layer}.{self_attn|mlp}.{proj}` → layer and proj, if it is such a path. */
function parseModulePath(path: string): { layer: number; proj: ProjectionName } | undefined {
  const m = /^model\.layers\.(0|[1-9][0-9]*)\.(?:self_attn|mlp)\.([a-z_]+)$/.exec(path);
  if (!m || !(PROJECTIONS as readonly string[]).includes(m[2])) return undefined;
  const layer = Number(m[1]);
  const proj = m[2] as ProjectionName;
  return projectionModulePath(layer, proj) === path ? { layer, proj } : undefined;
}

type Reason = 'unexpected_tensor' | 'missing_tensor' | 'shape_mismatch' | 'not_finite';

/**
 * Matches the file's tensors to the modules: each tensor must be an `allowed` factor of a
 * listed module with that factor's shape, every `required` factor must be there, and every
 * value finite.
 */
function readFactors(
  file: ParsedSafetensors,
  modules: ModuleFactors[],
  allowed: readonly Letter[],
  required: readonly Letter[],
  who: string,
  fail: (reason: Reason, msg: string) => Error,
): FactorSet {
  const byName = new Map<string, { m: ModuleFactors; l: Letter }>();
  for (const m of modules) for (const l of allowed) byName.set(peftTensorName(m.modulePath, l), { m, l });
  const out: FactorSet = new Map(modules.map((m) => [m.modulePath, { ...m }]));
  for (const e of file.entries) {
    const hit = byName.get(e.name);
    if (!hit) throw fail('unexpected_tensor', `${who}: tensor '${e.name}' is not a ${allowed.map((l) => `lora_${l}`).join('/')} of this job's modules`);
  }
  const present = new Set(file.entries.map((e) => e.name));
  for (const m of modules) {
    for (const l of required) {
      if (!present.has(peftTensorName(m.modulePath, l))) throw fail('missing_tensor', `${who}: tensor '${peftTensorName(m.modulePath, l)}' is missing`);
    }
  }
  for (const e of file.entries) {
    const { m, l } = byName.get(e.name)!;
    const shape = factorShape(m, l);
    if (e.shape.length !== 2 || e.shape[0] !== shape[0] || e.shape[1] !== shape[1]) {
      throw fail('shape_mismatch', `${who}: '${e.name}' has shape [${e.shape.join(', ')}], expected [${shape.join(', ')}] (rank ${m.rank}, ${m.inFeatures}→${m.outFeatures})`);
    }
    const data = file.read(e);
    for (let i = 0; i < data.length; i++) {
      if (!Number.isFinite(data[i])) throw fail('not_finite', `${who}: '${e.name}' holds ${data[i]} at index ${i}`);
    }
    out.get(m.modulePath)![KEY[l]] = data;
  }
  return out;
}

interface ParsedEntry {
  name: string;
  shape: number[];
  /** byte offsets in the data buffer */
  begin: number;
  end: number;
}

interface ParsedSafetensors {
  metadata: Record<string, string>;
  entries: ParsedEntry[];
  read(e: ParsedEntry): Float32Array;
}

const HOST_IS_LE = endianness() === 'LE';

/**
 * A synchronous safetensors reader for these F32-only messages, with SafetensorsReader's
 * checks (which is asynchronous): [u64 LE n][n bytes JSON header][data], header starting with
 * "{", __metadata__ a string map, every tensor F32 with byte size 4·Πshape, and the tensors
 * tiling the data exactly (no gaps, overlaps or trailing bytes).
 */
function parseF32Safetensors(bytes: Uint8Array): ParsedSafetensors {
  if (bytes.length < 8) throw new Error(`${bytes.length} bytes, too short for the 8-byte header length`);
  const n = Buffer.from(bytes.buffer, bytes.byteOffset, 8).readBigUInt64LE(0);
  if (n > BigInt(bytes.length - 8) || n > 100_000_000n) throw new Error(`header length ${n} does not fit the ${bytes.length}-byte file`);
  const headerEnd = 8 + Number(n);
  if (bytes[8] !== 0x7b) throw new Error('header does not start with "{"');
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(8, headerEnd)));
  } catch (err) {
    throw new Error(`header is not UTF-8 JSON: ${(err as Error).message}`);
  }
  if (!isObject(json)) throw new Error('header is not a JSON object');
  let metadata: Record<string, string> = {};
  const entries: ParsedEntry[] = [];
  for (const [name, value] of Object.entries(json)) {
    if (name === '__metadata__') {
      if (value === null) continue;
      if (!isObject(value) || !Object.values(value).every((v) => typeof v === 'string')) throw new Error('"__metadata__" is not a map of strings');
      metadata = Object.fromEntries(Object.entries(value)) as Record<string, string>;
      continue;
    }
    if (!isObject(value)) throw new Error(`entry '${name}' is not an object`);
    const { dtype, shape, data_offsets: offsets } = value;
    if (dtype !== 'F32') throw new Error(`tensor '${name}' has dtype ${JSON.stringify(dtype)}; federation files are F32`);
    const isDim = (d: unknown): d is number => Number.isSafeInteger(d) && (d as number) >= 0;
    if (!Array.isArray(shape) || !shape.every(isDim)) throw new Error(`tensor '${name}' "shape" is not a list of non-negative integers`);
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isDim) || offsets[1] < offsets[0]) {
      throw new Error(`tensor '${name}' "data_offsets" is not an ordered pair of non-negative integers`);
    }
    const size = shape.reduce((acc: bigint, d: number) => acc * BigInt(d), 4n);
    if (size !== BigInt(offsets[1] - offsets[0])) throw new Error(`tensor '${name}' is F32 [${shape.join(', ')}] but its data_offsets span ${offsets[1] - offsets[0]} bytes`);
    entries.push({ name, shape: shape as number[], begin: offsets[0], end: offsets[1] });
  }
  const dataLength = bytes.length - headerEnd;
  let cursor = 0;
  for (const e of [...entries].sort((x, y) => x.begin - y.begin)) {
    if (e.begin !== cursor) throw new Error(`tensor '${e.name}' starts at byte ${e.begin} of the data, expected ${cursor} (gap or overlap)`);
    cursor = e.end;
  }
  if (cursor !== dataLength) throw new Error(`the tensors cover ${cursor} bytes but the data is ${dataLength} bytes`);
  return {
    metadata,
    entries,
    read(e) {
      // a fresh, aligned copy (Buffer.prototype.slice would return an unaligned view)
      const copy = new Uint8Array(e.end - e.begin);
      copy.set(bytes.subarray(headerEnd + e.begin, headerEnd + e.end));
      if (!HOST_IS_LE) Buffer.from(copy.buffer).swap32();
      return new Float32Array(copy.buffer, 0, (e.end - e.begin) / 4);
    },
  };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
