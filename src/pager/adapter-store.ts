import { createHash, randomBytes } from 'node:crypto';
import { mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import { join, resolve, sep } from 'node:path';
import { AdapterError, LoraGatewayError, RequestError } from '../errors.js';
import type { ModelConfig } from '../model/architecture/model-config.js';
import { readPeftAdapter, type HostLoraAdapter } from '../model/lora/peft-adapter-reader.js';
import type { ProjectionName } from '../model/architecture/llama-weights.js';
import { splitAdapterId } from '../tenants/tenant-ids.js';

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
  /**
   * Where this version came from, as its publisher described it (federation: job, round,
   * method, clients, examples, …), kept in manifest.json; absent for plain uploads.
   */
  provenance?: Record<string, unknown>;
  /** The owning tenant, for a tenant's adapter (`<tenant>~<name>`); absent for plain ids. */
  tenant?: string;
}

export interface PutOptions {
  /** A JSON object written into the version's manifest and shown on its record. */
  provenance?: Record<string, unknown>;
}

export interface AdapterStoreOptions {
  /**
   * Versions of each id kept on disk: after a put, `prune` removes older ones that no request
   * uses. Absent: every version is kept. @defaultValue keep all
   */
  keepVersions?: number;
}

export interface AdapterFiles {
  config: Buffer;
  weights: Buffer;
}

/** A plain id, or a tenant's `<tenant>~<id>` (src/tenants/tenant-ids.ts). */
const ID_RE = /^(?:[A-Za-z0-9][A-Za-z0-9_-]{0,63}~)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
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

/** The owner recorded in a tenant adapter's manifest. */
function tenantOf(id: string): { tenant?: string } {
  const { tenant } = splitAdapterId(id);
  return tenant === undefined ? {} : { tenant };
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

/** A full disk or quota (ENOSPC, EDQUOT) as STORAGE_FULL; other errors pass unchanged. */
function storageError(err: unknown, id: string): unknown {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code !== 'ENOSPC' && code !== 'EDQUOT') return err;
  // an HTTP answer: it names the adapter, not the server's folders
  return new LoraGatewayError('STORAGE_FULL', `cannot store adapter '${id}': the adapter store is out of space (${code}); nothing was changed`, { cause: err });
}

function isNotFound(err: unknown): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === 'ENOENT';
}

/** A plain JSON object, copied through JSON so the record holds exactly what the manifest will. */
function jsonObject(value: Record<string, unknown>): Record<string, unknown> {
  let copy: unknown;
  try {
    copy = JSON.parse(JSON.stringify(value)) as unknown;
  } catch (err) {
    throw new RequestError('REQUEST_INVALID', 'provenance must be JSON-serializable', { cause: err });
  }
  if (typeof copy !== 'object' || copy === null || Array.isArray(copy)) throw new RequestError('REQUEST_INVALID', 'provenance must be a JSON object');
  return copy as Record<string, unknown>;
}

/**
 * The disk tier: PEFT adapters under `<root>/<id>/v<version>/`, each version written into a
 * temporary folder (files fsynced, then a manifest with their checksums and provenance),
 * validated in full, and only then renamed into place, so a crash never leaves half an
 * adapter visible. Re-putting an id adds a version; readers holding an older version keep
 * reading it. Writes of one id (put, delete) run one at a time.
 */
export class AdapterStore {
  private readonly root: string;
  private readonly model: ModelConfig;
  private readonly maxRank: number;
  private readonly latest = new Map<string, AdapterRecord>();
  /** Highest version folder number on disk per id, readable or not: a new version never lands on an old folder. */
  private readonly highest = new Map<string, number>();
  /** The tail of each id's chain of writes. */
  private readonly writes = new Map<string, Promise<unknown>>();
  private readonly keepVersions: number | undefined;

  private constructor(root: string, model: ModelConfig, maxRank: number, options: AdapterStoreOptions) {
    this.root = root;
    this.model = model;
    this.maxRank = maxRank;
    this.keepVersions = options.keepVersions;
  }

  /**
   * Opens (creating) a store; leftovers of interrupted writes are removed, damaged versions
   * skipped, and with `keepVersions` the versions beyond it removed (nothing runs yet).
   */
  static async open(root: string, model: ModelConfig, maxRank: number, options: AdapterStoreOptions = {}): Promise<AdapterStore> {
    await mkdir(root, { recursive: true });
    const store = new AdapterStore(root, model, maxRank, options);
    for (const entry of await readdir(root, { withFileTypes: true })) {
      if (!entry.isDirectory()) continue;
      if (entry.name.startsWith('.tmp-')) {
        await rm(join(root, entry.name), { recursive: true, force: true });
        continue;
      }
      if (!ID_RE.test(entry.name)) continue;
      const versions = await store.versionsOf(entry.name);
      if (versions.length > 0) store.highest.set(entry.name, versions[0]);
      for (const v of versions) {
        const record = await store.readRecord(entry.name, v).catch(() => undefined);
        if (record) {
          store.latest.set(entry.name, record);
          break;
        }
      }
    }
    for (const id of store.latest.keys()) await store.prune(id, () => false);
    return store;
  }

  /**
   * Removes the versions of `id` beyond the newest `keepVersions` (counted down from the
   * latest readable one), except those `inUse` says a request still reads: they go at a later
   * call, once it is over. Never touches the latest version, nor folders newer than it (an
   * interrupted or damaged write is no reason to drop the version that serves). Resolves to
   * the version numbers removed; none without `keepVersions`.
   */
  prune(id: string, inUse: (version: number) => boolean): Promise<number[]> {
    const keep = this.keepVersions;
    if (keep === undefined) return Promise.resolve([]);
    return this.serialized(id, async () => {
      const latest = this.latest.get(id);
      if (!latest) return [];
      const older = (await this.versionsOf(id)).filter((v) => v <= latest.version).slice(keep);
      const removed: number[] = [];
      for (const v of older) {
        // asked right before each removal: a request takes the latest record when it starts, so
        // no request can begin on a version this loop is past
        if (inUse(v)) continue;
        await rm(join(this.root, id, `v${v}`), { recursive: true, force: true });
        removed.push(v);
      }
      if (removed.length > 0) await syncDir(join(this.root, id));
      return removed;
    });
  }

  /** The latest version of an id. */
  get(id: string): AdapterRecord | undefined {
    return this.latest.get(id);
  }

  list(): AdapterRecord[] {
    return [...this.latest.values()].sort((a, b) => a.id.localeCompare(b.id));
  }

  /**
   * Validates the files completely, then stores them as the id's next version, with
   * `options.provenance` (a JSON object) in its manifest.
   */
  async put(id: string, files: AdapterFiles, options: PutOptions = {}): Promise<AdapterRecord> {
    validateAdapterId(id);
    const provenance = options.provenance === undefined ? undefined : jsonObject(options.provenance);
    // validated from memory before anything is written; errors name the files as '<id>/adapter_model.safetensors'
    const host = await readPeftAdapter(id, this.model, this.maxRank, id, files);
    return this.serialized(id, () => this.write(id, files, host, provenance));
  }

  /** Forgets an id (all versions) and removes its files. */
  async delete(id: string): Promise<AdapterRecord> {
    validateAdapterId(id);
    return this.serialized(id, async () => {
      const record = this.latest.get(id);
      if (!record) throw new AdapterError('ADAPTER_NOT_FOUND', `adapter '${id}' does not exist`);
      this.latest.delete(id);
      this.highest.delete(id);
      await rm(join(this.root, id), { recursive: true, force: true });
      return record;
    });
  }

  /**
   * The record of one version (the latest when `version` is omitted), read from its
   * manifest; undefined when the id or that version does not exist.
   */
  async readVersion(id: string, version?: number): Promise<AdapterRecord | undefined> {
    validateAdapterId(id);
    const latest = this.latest.get(id);
    if (!latest || version === undefined || version === latest.version) return latest;
    if (!Number.isInteger(version) || version < 1 || version > latest.version) return undefined;
    return this.readRecord(id, version);
  }

  /**
   * The newest version of an id whose record satisfies `predicate`, scanning manifests newest
   * first (damaged or incomplete versions are skipped); undefined when none does.
   */
  async findVersion(id: string, predicate: (record: AdapterRecord) => boolean): Promise<AdapterRecord | undefined> {
    validateAdapterId(id);
    for (const v of await this.versionsOf(id)) {
      const record = await this.readRecord(id, v).catch(() => undefined);
      if (record && predicate(record)) return record;
    }
    return undefined;
  }

  /**
   * The two files of a stored version, checked against the checksums in its manifest
   * (ADAPTER_WEIGHTS_INVALID when they differ). I/O errors are passed on as they are.
   */
  async readFiles(record: AdapterRecord): Promise<AdapterFiles> {
    return readCheckedFiles(record);
  }

  /** Reads a stored version back to host memory, checking it against its manifest. */
  async readHost(record: AdapterRecord): Promise<HostLoraAdapter> {
    return this.reader().readHost(record);
  }

  /** What the pager needs of a store, usable from another thread (it reads by record, holds no index). */
  reader(): StoredAdapterReader {
    return storedAdapterReader(this.root, this.model, this.maxRank);
  }

  private async write(id: string, files: AdapterFiles, host: HostLoraAdapter, provenance: Record<string, unknown> | undefined): Promise<AdapterRecord> {
    const tmp = join(this.root, `.tmp-${randomBytes(8).toString('hex')}`);
    try {
      await mkdir(tmp);
      await writeDurably(join(tmp, CONFIG), files.config);
      await writeDurably(join(tmp, WEIGHTS), files.weights);
      const version = Math.max(this.highest.get(id) ?? 0, this.latest.get(id)?.version ?? 0) + 1;
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
        ...(provenance ? { provenance } : {}),
        ...tenantOf(id),
      };
      // the manifest is written last: a version folder without one is an interrupted write
      const { dir: _dir, ...manifest } = record;
      await writeDurably(join(tmp, MANIFEST), JSON.stringify(manifest));
      await mkdir(idDir, { recursive: true });
      await rename(tmp, dir);
      await syncDir(idDir);
      this.highest.set(id, version);
      this.latest.set(id, record);
      return record;
    } catch (err) {
      // nothing of a failed write stays behind: the temporary folder goes, the index is untouched
      await rm(tmp, { recursive: true, force: true });
      throw storageError(err, id);
    }
  }

  /** Runs `task` after every earlier write of the same id has settled. */
  private serialized<T>(id: string, task: () => Promise<T>): Promise<T> {
    const run = (this.writes.get(id) ?? Promise.resolve()).then(task);
    const tail = run.catch(() => undefined);
    this.writes.set(id, tail);
    void tail.then(() => {
      if (this.writes.get(id) === tail) this.writes.delete(id);
    });
    return run;
  }

  /** Version numbers with a folder on disk, newest first. */
  private async versionsOf(id: string): Promise<number[]> {
    let names: string[];
    try {
      names = await readdir(join(this.root, id));
    } catch (err) {
      if (isNotFound(err)) return [];
      throw err;
    }
    return names
      .map((v) => /^v(\d+)$/.exec(v))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => Number(m[1]))
      .sort((a, b) => b - a);
  }

  /**
   * Reads a version's manifest only (opening a store of thousands of adapters reads no
   * weights): undefined when the version has no manifest, ADAPTER_WEIGHTS_INVALID when it
   * does not describe this version.
   */
  private async readRecord(id: string, version: number): Promise<AdapterRecord | undefined> {
    const dir = join(this.root, id, `v${version}`);
    let text: string;
    try {
      text = await readFile(join(dir, MANIFEST), 'utf8');
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
    let m: Omit<AdapterRecord, 'dir'> | undefined;
    try {
      m = JSON.parse(text) as Omit<AdapterRecord, 'dir'>;
    } catch {
      m = undefined;
    }
    const provenanceOk = m?.provenance === undefined || (typeof m.provenance === 'object' && m.provenance !== null && !Array.isArray(m.provenance));
    if (!m || m.id !== id || m.version !== version || typeof m.sha256?.config !== 'string' || typeof m.sha256?.weights !== 'string' || !provenanceOk) {
      throw new AdapterError('ADAPTER_WEIGHTS_INVALID', `adapter '${id}' v${version}: ${MANIFEST} does not describe this version`);
    }
    return { ...m, dir };
  }
}

/** Reads stored versions back to host memory: all the pager needs of the store. */
export interface StoredAdapterReader {
  readHost(record: AdapterRecord): Promise<HostLoraAdapter>;
}

/**
 * A reader for the store at `root` that keeps no index, for the engine thread: the store that
 * writes lives on the API's thread, and records travel with each request.
 */
export function storedAdapterReader(root: string, model: ModelConfig, maxRank: number): StoredAdapterReader {
  return {
    async readHost(record) {
      // records come from another thread's messages: never read outside the store
      if (!resolve(record.dir).startsWith(resolve(root) + sep)) throw new AdapterError('ADAPTER_WEIGHTS_INVALID', `adapter '${record.id}' v${record.version}: its folder is not inside the adapter store`);
      return readPeftAdapter(record.dir, model, maxRank, record.id, await readCheckedFiles(record));
    },
  };
}

/**
 * The two files of a stored version, checked against the checksums in its manifest
 * (ADAPTER_WEIGHTS_INVALID when they differ). I/O errors are passed on as they are.
 */
async function readCheckedFiles(record: AdapterRecord): Promise<AdapterFiles> {
  const { dir, sha256: want } = record;
  // messages name the adapter, never the server's folders
  // each file is read once: the bytes that pass the checksum are the bytes handed out
  const [config, weights] = await Promise.all([readFile(join(dir, CONFIG)), readFile(join(dir, WEIGHTS))]);
  if (sha256(config) !== want.config || sha256(weights) !== want.weights) {
    throw new AdapterError('ADAPTER_WEIGHTS_INVALID', `adapter '${record.id}' v${record.version}: files do not match the checksums in ${MANIFEST}`);
  }
  return { config, weights };
}
