import { createHash, randomBytes } from 'node:crypto';
import { mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { AdapterError } from '../errors.js';
import type { ModelConfig } from '../model/architecture/model-config.js';
import { readPeftAdapter, type HostLoraAdapter } from '../model/lora/peft-adapter-reader.js';
import type { ProjectionName } from '../model/architecture/llama-weights.js';

/** What the store knows about one stored adapter version. */
export interface AdapterRecord {
  id: string;
  version: number;
  dir: string;
  rank: number;
  targets: ProjectionName[];
  /** Bytes of adapter_config.json + adapter_model.safetensors. */
  sizeBytes: number;
  /** sha256 of the two files, as written in manifest.json. */
  sha256: { config: string; weights: string };
}

export interface AdapterFiles {
  config: Buffer;
  weights: Buffer;
}

const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const CONFIG = 'adapter_config.json';
const WEIGHTS = 'adapter_model.safetensors';
const MANIFEST = 'manifest.json';

export function validateAdapterId(id: string): void {
  if (!ID_RE.test(id) || id.includes('..')) {
    throw new AdapterError(
      'ADAPTER_ID_INVALID',
      `adapter id ${JSON.stringify(id)} is invalid: use 1–128 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'`,
    );
  }
}

function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

async function writeDurably(path: string, data: Buffer | string): Promise<void> {
  const fh = await open(path, 'w');
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function syncDir(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * The disk tier: PEFT adapters under `<root>/<id>/v<version>/`, each version written into a
 * temporary folder (files fsynced, then a manifest with their checksums), validated in full,
 * and only then renamed into place, so a crash never leaves half an adapter visible.
 * Re-putting an id adds a version; readers holding an older version keep reading it.
 */
export class AdapterStore {
  private readonly root: string;
  private readonly model: ModelConfig;
  private readonly maxRank: number;
  private readonly latest = new Map<string, AdapterRecord>();

  private constructor(root: string, model: ModelConfig, maxRank: number) {
    this.root = root;
    this.model = model;
    this.maxRank = maxRank;
  }

  /** Opens (creating) a store; leftovers of interrupted writes are removed, damaged versions skipped. */
  static async open(root: string, model: ModelConfig, maxRank: number): Promise<AdapterStore> {
    await mkdir(root, { recursive: true });
    const store = new AdapterStore(root, model, maxRank);
    for (const entry of await readdir(root, { withFileTypes: true })) {
      if (!entry.isDirectory()) continue;
      if (entry.name.startsWith('.tmp-')) {
        await rm(join(root, entry.name), { recursive: true, force: true });
        continue;
      }
      if (!ID_RE.test(entry.name)) continue;
      const versions = (await readdir(join(root, entry.name)))
        .map((v) => /^v(\d+)$/.exec(v))
        .filter((m): m is RegExpExecArray => m !== null)
        .map((m) => Number(m[1]))
        .sort((a, b) => b - a);
      for (const v of versions) {
        const record = await store.readRecord(entry.name, v).catch(() => undefined);
        if (record) {
          store.latest.set(entry.name, record);
          break;
        }
      }
    }
    return store;
  }

  get(id: string): AdapterRecord | undefined {
    return this.latest.get(id);
  }

  list(): AdapterRecord[] {
    return [...this.latest.values()].sort((a, b) => a.id.localeCompare(b.id));
  }

  /** Validates the files completely, then stores them as the id's next version. */
  async put(id: string, files: AdapterFiles): Promise<AdapterRecord> {
    validateAdapterId(id);
    // validated from memory before anything is written; errors name the files as '<id>/adapter_model.safetensors'
    const host = await readPeftAdapter(id, this.model, this.maxRank, id, files);
    const tmp = join(this.root, `.tmp-${randomBytes(8).toString('hex')}`);
    await mkdir(tmp);
    try {
      await writeDurably(join(tmp, CONFIG), files.config);
      await writeDurably(join(tmp, WEIGHTS), files.weights);
      const version = (this.latest.get(id)?.version ?? 0) + 1;
      const idDir = join(this.root, id);
      const dir = join(idDir, `v${version}`);
      const record: AdapterRecord = {
        id,
        version,
        dir,
        rank: Math.max(...host.modules.map((m) => m.spec.rank)),
        targets: [...new Set(host.modules.map((m) => m.spec.proj))],
        sizeBytes: files.config.length + files.weights.length,
        sha256: { config: sha256(files.config), weights: sha256(files.weights) },
      };
      // the manifest is written last: a version folder without one is an interrupted write
      const { dir: _dir, ...manifest } = record;
      await writeDurably(join(tmp, MANIFEST), JSON.stringify(manifest));
      await mkdir(idDir, { recursive: true });
      await rename(tmp, dir);
      await syncDir(idDir);
      this.latest.set(id, record);
      return record;
    } catch (err) {
      await rm(tmp, { recursive: true, force: true });
      throw err;
    }
  }

  /** Forgets an id (all versions) and removes its files. */
  async delete(id: string): Promise<AdapterRecord> {
    validateAdapterId(id);
    const record = this.latest.get(id);
    if (!record) throw new AdapterError('ADAPTER_NOT_FOUND', `adapter '${id}' does not exist`);
    this.latest.delete(id);
    await rm(join(this.root, id), { recursive: true, force: true });
    return record;
  }

  /** Reads a stored version back to host memory, checking it against its manifest. */
  async readHost(record: AdapterRecord): Promise<HostLoraAdapter> {
    const { dir, sha256: want } = record;
    // each file is read once: the bytes that pass the checksum are the bytes parsed
    const [config, weights] = await Promise.all([readFile(join(dir, CONFIG)), readFile(join(dir, WEIGHTS))]);
    if (sha256(config) !== want.config || sha256(weights) !== want.weights) {
      throw new AdapterError('ADAPTER_WEIGHTS_INVALID', `${dir}: files do not match the checksums in ${MANIFEST}`);
    }
    return readPeftAdapter(dir, this.model, this.maxRank, record.id, { config, weights });
  }

  /** Reads a version's manifest only: opening a store of thousands of adapters reads no weights. */
  private async readRecord(id: string, version: number): Promise<AdapterRecord> {
    const dir = join(this.root, id, `v${version}`);
    const m = JSON.parse(await readFile(join(dir, MANIFEST), 'utf8')) as Omit<AdapterRecord, 'dir'>;
    if (m.id !== id || m.version !== version || typeof m.sha256?.config !== 'string') {
      throw new AdapterError('ADAPTER_WEIGHTS_INVALID', `${dir}: ${MANIFEST} does not describe this version`);
    }
    return { ...m, dir };
  }
}
