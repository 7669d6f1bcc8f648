/**
 * A Hugging Face model folder's weights as one set of tensors, whether stored in one
 * `model.safetensors` or in shards listed by `model.safetensors.index.json`:
 *
 *   { "metadata": {...}, "weight_map": { tensorName: shardFileName } }
 *
 * The index is checked against the shards' own headers at open, so a tensor is never
 * silently taken from the wrong shard or missed.
 */
import { readFile, stat } from 'node:fs/promises';
import { isAbsolute, join } from 'node:path';
import { ModelFormatError } from '../../errors.js';
import { assertReadableDtype, SafetensorsReader, type TensorEntry } from './safetensors.js';

const SINGLE_FILE = 'model.safetensors';
const INDEX_FILE = 'model.safetensors.index.json';

/** `file` is the path of the shard holding the tensor. */
export type CheckpointEntry = TensorEntry & { file: string };

export interface Checkpoint {
  /** Paths of the safetensors files, in the order they are read. */
  files: string[];
  /** Every tensor name, shard by shard in file order. */
  tensorNames(): string[];
  entry(name: string): CheckpointEntry | undefined;
  /** Reads each file once, in order; every selected dtype is checked before anything is read. */
  readTensors(onTensor: (entry: CheckpointEntry, data: Float32Array) => void | Promise<void>, names?: Set<string>): Promise<void>;
  close(): Promise<void>;
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

export async function openCheckpoint(dir: string): Promise<Checkpoint> {
  // Same precedence as transformers: a single file wins over an index.
  const single = join(dir, SINGLE_FILE);
  if (await exists(single)) return new ShardedCheckpoint([await SafetensorsReader.open(single)]);
  const indexPath = join(dir, INDEX_FILE);
  if (!(await exists(indexPath))) {
    throw new ModelFormatError('MODEL_FILE_MISSING', dir, `neither ${SINGLE_FILE} nor ${INDEX_FILE} exists`);
  }
  const weightMap = await readIndex(indexPath);
  const shardNames = [...new Set(weightMap.values())].sort();
  const readers: SafetensorsReader[] = [];
  try {
    for (const shard of shardNames) {
      const path = join(dir, shard);
      if (!(await exists(path))) {
        throw new ModelFormatError('MODEL_FILE_MISSING', path, `shard named by ${INDEX_FILE} does not exist`);
      }
      readers.push(await SafetensorsReader.open(path));
    }
    checkIndexAgainstShards(weightMap, shardNames, readers, indexPath);
    return new ShardedCheckpoint(readers);
  } catch (err) {
    await Promise.all(readers.map((r) => r.close()));
    throw err;
  }
}

/** Parses the index into tensor name → shard file name, refusing names that leave the folder. */
async function readIndex(indexPath: string): Promise<Map<string, string>> {
  const invalid = (msg: string, cause?: unknown): ModelFormatError =>
    new ModelFormatError('SAFETENSORS_INDEX_INVALID', indexPath, msg, cause === undefined ? undefined : { cause });
  let json: unknown;
  try {
    json = JSON.parse(await readFile(indexPath, 'utf8'));
  } catch (err) {
    throw invalid(`not valid JSON: ${(err as Error).message}`, err);
  }
  const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
  if (!isObject(json)) throw invalid('not a JSON object');
  if (!isObject(json.weight_map)) throw invalid('"weight_map" is missing or not an object');
  const map = new Map<string, string>();
  for (const [tensor, file] of Object.entries(json.weight_map)) {
    if (typeof file !== 'string') throw invalid(`weight_map entry for '${tensor}' is not a file name`);
    if (!isInsideFolder(file)) throw invalid(`weight_map names file '${file}' for '${tensor}', which is not inside the model folder`);
    map.set(tensor, file);
  }
  if (map.size === 0) throw invalid('"weight_map" lists no tensors');
  return map;
}

/**
 * Judged on the name alone: shard files in the HF cache are symlinks into a blobs folder,
 * so resolving links would refuse every cached model.
 */
function isInsideFolder(file: string): boolean {
  if (file === '' || isAbsolute(file) || file.includes('\0')) return false;
  const parts = file.split(/[\\/]/);
  return parts.every((p) => p !== '' && p !== '.' && p !== '..');
}

function checkIndexAgainstShards(weightMap: Map<string, string>, shardNames: string[], readers: SafetensorsReader[], indexPath: string): void {
  const readerOf = new Map(shardNames.map((s, i) => [s, readers[i]]));
  for (const [tensor, shard] of weightMap) {
    if (!readerOf.get(shard)!.entry(tensor)) {
      throw new ModelFormatError('SAFETENSORS_INDEX_INVALID', indexPath, `lists tensor '${tensor}' in shard '${shard}', which does not hold it`);
    }
  }
  for (const [i, shard] of shardNames.entries()) {
    for (const e of readers[i].entries()) {
      const listed = weightMap.get(e.name);
      if (listed !== shard) {
        const where = listed === undefined ? 'does not list it' : `lists it in '${listed}'`;
        throw new ModelFormatError('SAFETENSORS_INDEX_INVALID', indexPath, `shard '${shard}' holds tensor '${e.name}' but the index ${where}`);
      }
    }
  }
}

class ShardedCheckpoint implements Checkpoint {
  readonly files: string[];
  private readonly readers: SafetensorsReader[];
  private readonly readerOf = new Map<string, SafetensorsReader>();

  constructor(readers: SafetensorsReader[]) {
    this.readers = readers;
    this.files = readers.map((r) => r.path);
    // Index validation guarantees each name is in exactly one shard.
    for (const r of readers) for (const e of r.entries()) this.readerOf.set(e.name, r);
  }

  tensorNames(): string[] {
    return [...this.readerOf.keys()];
  }

  entry(name: string): CheckpointEntry | undefined {
    const r = this.readerOf.get(name);
    const e = r?.entry(name);
    return e && { ...e, file: r!.path };
  }

  async readTensors(onTensor: (entry: CheckpointEntry, data: Float32Array) => void | Promise<void>, names?: Set<string>): Promise<void> {
    for (const r of this.readers) {
      for (const e of r.entries()) if (!names || names.has(e.name)) assertReadableDtype(e, r.path);
    }
    for (const r of this.readers) {
      await r.readTensors((e, data) => onTensor({ ...e, file: r.path }, data), names);
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.readers.map((r) => r.close()));
  }
}
