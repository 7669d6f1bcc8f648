import { readdir, readFile, stat } from 'node:fs/promises';
import { extname, join } from 'node:path';
import { FederationError } from '../errors.js';
import type { TextTokenizer } from '../model/tokenizer/tokenizer.js';
import { SeededRandom } from '../model/synthetic/seeded-random.js';

/**
 * A client's local training data: documents read from disk, tokenized into one stream
 * (doc₁ EOS doc₂ EOS …) and cut into fixed windows, as Hugging Face's `run_clm.py`
 * `group_texts` does. A window holds seqLen+1 ids: inputs are w[0..seqLen), targets w[1..seqLen].
 */

function invalid(message: string, cause?: unknown): never {
  throw new FederationError('FED_DATA_INVALID', message, cause === undefined ? undefined : { cause });
}

async function readText(file: string): Promise<string> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    invalid(`${file}: cannot read: ${(err as Error).message}`, err);
  }
}

/** Each line of a JSONL file is `{"text": "..."}`; blank lines are skipped, anything else is refused. */
function jsonlTexts(file: string, content: string): string[] {
  const texts: string[] = [];
  content.split(/\r?\n/).forEach((line, i) => {
    if (line.trim() === '') return;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch (err) {
      invalid(`${file}:${i + 1}: not JSON: ${(err as Error).message}`, err);
    }
    const text = (value as { text?: unknown } | null)?.text;
    if (typeof value !== 'object' || value === null || Array.isArray(value) || typeof text !== 'string') {
      invalid(`${file}:${i + 1}: expected an object with a string "text" field`);
    }
    texts.push(text);
  });
  return texts;
}

/** Every .txt and .jsonl file under `dir`, recursively, sorted by path (code-unit order, locale-free). */
async function dataFiles(dir: string): Promise<string[]> {
  const found: string[] = [];
  const walk = async (d: string): Promise<void> => {
    let entries;
    try {
      entries = await readdir(d, { withFileTypes: true });
    } catch (err) {
      invalid(`${d}: cannot read folder: ${(err as Error).message}`, err);
    }
    for (const e of entries) {
      const p = join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else if (e.isFile() && (extname(e.name) === '.txt' || extname(e.name) === '.jsonl')) found.push(p);
    }
  };
  await walk(dir);
  return found.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
}

/**
 * Documents of a client: a `.txt` file (one document), a `.jsonl` file (one document per
 * line's `text`), or a folder of both (recursively, sorted by path). Empty documents are
 * dropped; no document at all is an error, as is any unreadable file or malformed line.
 */
export async function readClientTexts(path: string): Promise<string[]> {
  let info;
  try {
    info = await stat(path);
  } catch (err) {
    invalid(`${path}: cannot read: ${(err as Error).message}`, err);
  }
  let files: string[];
  if (info.isDirectory()) files = await dataFiles(path);
  else if (info.isFile() && (extname(path) === '.txt' || extname(path) === '.jsonl')) files = [path];
  else invalid(`${path}: expected a .txt file, a .jsonl file or a folder of them`);
  const texts: string[] = [];
  for (const f of files) {
    const content = await readText(f);
    texts.push(...(extname(f) === '.jsonl' ? jsonlTexts(f, content) : [content]));
  }
  const docs = texts.filter((t) => t.trim() !== '');
  if (docs.length === 0) invalid(`${path}: no training text (${files.length} .txt/.jsonl file(s), all empty)`);
  return docs;
}

/**
 * Non-overlapping windows of seqLen+1 ids cut from `ids`: window k = ids[k(seqLen+1) .. (k+1)(seqLen+1)).
 * The final partial window is dropped (no padding, so every target is a real next token).
 */
export function windowsFromIds(ids: ArrayLike<number>, seqLen: number): Int32Array[] {
  if (!Number.isInteger(seqLen) || seqLen < 1) invalid(`seqLen must be a positive integer, got ${seqLen}`);
  const w = seqLen + 1;
  const out: Int32Array[] = [];
  for (let start = 0; start + w <= ids.length; start += w) out.push(Int32Array.from({ length: w }, (_, i) => ids[start + i]));
  return out;
}

/** The part of TextTokenizer windows need (so tests can pass a stub). */
export type WindowTokenizer = Pick<TextTokenizer, 'encode' | 'eosTokenIds'>;

/**
 * Tokenizes each document with special tokens (BOS where the post-processor adds it),
 * appends the first EOS id after each (unless the post-processor already ended it with an
 * EOS), concatenates and cuts into windows (see windowsFromIds).
 */
export function tokenWindows(tokenizer: WindowTokenizer, texts: string[], seqLen: number): Int32Array[] {
  const eos = tokenizer.eosTokenIds[0];
  if (eos === undefined) invalid('the tokenizer has no EOS token to separate documents');
  const stream: number[] = [];
  for (const text of texts) {
    const ids = tokenizer.encode(text, { addSpecialTokens: true });
    for (const id of ids) stream.push(id);
    if (!tokenizer.eosTokenIds.includes(ids[ids.length - 1])) stream.push(eos);
  }
  const windows = windowsFromIds(stream, seqLen);
  if (windows.length === 0) invalid(`${texts.length} document(s) give ${stream.length} tokens, fewer than one window of seqLen+1 = ${seqLen + 1}`);
  return windows;
}

/**
 * Deterministic held-out split: a seeded Fisher–Yates permutation picks round(fraction·n)
 * windows (at least one when fraction > 0 and n ≥ 2, and never all of them); both parts keep
 * the original order.
 */
export function splitHeldOut(windows: Int32Array[], fraction: number, seed: number): { train: Int32Array[]; heldOut: Int32Array[] } {
  if (!(fraction >= 0 && fraction < 1)) invalid(`held-out fraction must be in [0, 1), got ${fraction}`);
  const n = windows.length;
  let k = Math.round(fraction * n);
  if (fraction > 0 && n >= 2) k = Math.min(Math.max(k, 1), n - 1);
  else if (n < 2) k = 0;
  const order = seededPermutation(n, seed);
  const held = new Set(order.slice(0, k));
  return { train: windows.filter((_, i) => !held.has(i)), heldOut: windows.filter((_, i) => held.has(i)) };
}

/** A uniformly random permutation of 0..n-1 (Fisher–Yates over SeededRandom). */
export function seededPermutation(n: number, seed: number | SeededRandom): number[] {
  const rng = typeof seed === 'number' ? new SeededRandom(seed) : seed;
  const p = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [p[i], p[j]] = [p[j], p[i]];
  }
  return p;
}
