import type { SeededRandom } from '../../src/model/synthetic/seeded-random.js';

/**
 * Seeded mutations of the gateway's inputs for the fuzz test: safetensors files (bit flips,
 * truncations, header JSON edits of dtype / shape / offsets / names, header length, special
 * float values), adapter_config.json (field values, deletions, raw text damage) and request
 * bodies. Each returns what it did, so a failure names the mutation that caused it.
 */
export interface Mutated<T> {
  value: T;
  what: string;
}

const pick = <T>(rng: SeededRandom, xs: readonly T[]): T => xs[rng.int(xs.length)];

/** JSON values that break types, ranges and patterns; no mid-size numbers, so that accepted requests stay short. */
const ODD_VALUES: readonly unknown[] = [
  null, true, false, 0, -1, 1, 2, 1.5, -0.5, 3e9, 1e308, -1e308, 2049, 65, '', 'x', '8', 'NaN', '(', '.*', '[', 'all-linear',
  [], [1, 2], ['q_proj'], ['lm_head'], [-1], {}, { a: 1 }, { '(': 1 }, { 'q_proj': 1e308 }, 'q_proj', 'a'.repeat(300),
];

/** Raw damage to bytes: bit flips or a truncation. */
export function damageBytes(rng: SeededRandom, bytes: Buffer): Mutated<Buffer> {
  const out = Buffer.from(bytes);
  if (rng.next() < 0.3) {
    const n = rng.int(out.length);
    return { value: out.subarray(0, n), what: `truncated to ${n} bytes` };
  }
  const flips = 1 + rng.int(8);
  const at: number[] = [];
  for (let i = 0; i < flips; i++) {
    const p = rng.int(out.length);
    out[p] ^= 1 << rng.int(8);
    at.push(p);
  }
  return { value: out, what: `bits flipped at ${at.join(',')}` };
}

function splitSafetensors(bytes: Buffer): { header: Record<string, unknown>; data: Buffer } {
  const n = Number(bytes.readBigUInt64LE(0));
  return { header: JSON.parse(bytes.subarray(8, 8 + n).toString()) as Record<string, unknown>, data: bytes.subarray(8 + n) };
}

function joinSafetensors(header: unknown, data: Buffer): Buffer {
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([len, json, data]);
}

/** A mutation of a valid safetensors file. */
export function mutateSafetensors(rng: SeededRandom, bytes: Buffer): Mutated<Buffer> {
  const kind = rng.int(6);
  if (kind === 0) return damageBytes(rng, bytes);
  const { header, data } = splitSafetensors(bytes);
  const names = Object.keys(header).filter((k) => k !== '__metadata__');
  const name = pick(rng, names);
  const entry = header[name] as { dtype: unknown; shape: unknown[]; data_offsets: unknown[] };
  if (kind === 1) {
    entry.dtype = pick(rng, ['F16', 'BF16', 'F64', 'I32', 'U8', 'F8_E4M3', 'XX', 'f32', 7, null]);
    return { value: joinSafetensors(header, data), what: `${name} dtype → ${JSON.stringify(entry.dtype)}` };
  }
  if (kind === 2) {
    const i = rng.int(entry.shape.length + 1);
    entry.shape[i] = pick(rng, [0, 1, -1, 2 ** 53, 1.5, 'x', (Number(entry.shape[i]) || 0) + 1, (Number(entry.shape[i]) || 0) - 1]);
    if (rng.next() < 0.2) entry.shape = pick(rng, [[], [1], [1, 1, 1], 'x']) as unknown[];
    return { value: joinSafetensors(header, data), what: `${name} shape → ${JSON.stringify(entry.shape)}` };
  }
  if (kind === 3) {
    const i = rng.int(2);
    const v = Number(entry.data_offsets[i]);
    entry.data_offsets[i] = pick(rng, [v + 4, v - 4, v + 1, 0, -8, 2 ** 60, data.length, data.length + 4, 'x', null]);
    if (rng.next() < 0.2) entry.data_offsets = [entry.data_offsets[1], entry.data_offsets[0]];
    return { value: joinSafetensors(header, data), what: `${name} data_offsets → ${JSON.stringify(entry.data_offsets)}` };
  }
  if (kind === 4) {
    const edit = rng.int(4);
    if (edit === 0) delete header[name];
    else if (edit === 1) header[`${name}.extra`] = entry;
    else if (edit === 2) header.__metadata__ = pick(rng, [null, 1, { format: 2 }, 'pt', { a: 'b' }]);
    else {
      header[name.replace('lora_A', 'lora_B').replace('q_proj', 'k_proj')] = entry;
      delete header[name];
    }
    return { value: joinSafetensors(header, data), what: `header edit ${edit} on ${name}` };
  }
  // a special value in the data, or a wrong header length
  const out = Buffer.from(bytes);
  if (rng.next() < 0.3) {
    out.writeBigUInt64LE(BigInt(pick(rng, [0, 1, 7, out.length, out.length + 8, 2 ** 40, Number(out.readBigUInt64LE(0)) + pick(rng, [-1, 1, 8])])), 0);
    return { value: out, what: `header length → ${out.readBigUInt64LE(0)}` };
  }
  const start = bytes.length - data.length;
  const p = start + 4 * rng.int(data.length / 4);
  const v = pick(rng, [NaN, Infinity, -Infinity, 1e38, -3.4e38, 1e20, 1e-45, -0, 65504, 1e6]);
  out.writeFloatLE(v, p);
  return { value: out, what: `float at byte ${p} → ${v}` };
}

/** A mutation of a JSON object (a config or a request body): a field changed, deleted or added, or its text damaged. */
export function mutateJson(rng: SeededRandom, obj: Record<string, unknown>, extraKeys: readonly string[] = []): Mutated<string> {
  const text = JSON.stringify(obj);
  if (rng.next() < 0.2) {
    const d = damageBytes(rng, Buffer.from(text));
    return { value: d.value.toString('latin1'), what: `JSON text ${d.what}` };
  }
  const copy = structuredClone(obj);
  const key = pick(rng, [...Object.keys(copy), ...extraKeys]);
  const edits = 1 + rng.int(2);
  const done: string[] = [];
  for (let i = 0; i < edits; i++) {
    const k = i === 0 ? key : pick(rng, Object.keys(copy).concat(extraKeys));
    if (rng.next() < 0.15) {
      delete copy[k];
      done.push(`-${k}`);
    } else {
      copy[k] = pick(rng, ODD_VALUES);
      done.push(`${k}=${JSON.stringify(copy[k]).slice(0, 40)}`);
    }
  }
  return { value: JSON.stringify(copy), what: done.join(' ') };
}
