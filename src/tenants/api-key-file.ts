import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { open, readFile, rename } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { z } from 'zod';
import { ConfigError } from '../errors.js';
import { TENANT_RE } from './tenant-ids.js';

/**
 * The `--api-keys` file: one JSON document listing keys by their SHA-256, each with its tenant
 * and role. The keys themselves are never stored (printed once by `api-key create`); a key is
 * 32 random bytes, so an unsalted SHA-256 is enough to make the file useless to a reader.
 *
 *   {"version": 1, "keys": [{"id": "key_1a2b3c4d5e6f", "sha256": "<hex>", "tenant": "acme",
 *                             "role": "tenant", "created_at": "2026-12-01T14:00:00.000Z"}]}
 */
export type Role = 'admin' | 'tenant';

export interface ApiKeyEntry {
  /** Public handle for listing and revoking: `key_` + the first 12 hex digits of the hash. */
  id: string;
  sha256: string;
  tenant: string;
  role: Role;
  created_at: string;
}

/** Who a request comes from. */
export interface Principal {
  tenant: string;
  role: Role;
  keyId: string;
}

const entrySchema = z
  .object({
    id: z.string().regex(/^key_[0-9a-f]{12}$/),
    sha256: z.string().regex(/^[0-9a-f]{64}$/),
    tenant: z.string().regex(TENANT_RE, 'tenant names are 1–64 letters, digits, "_" or "-"'),
    role: z.enum(['admin', 'tenant']),
    created_at: z.string(),
  })
  .strict();
const fileSchema = z.object({ version: z.literal(1), keys: z.array(entrySchema) }).strict();

/** Keys look like OpenAI's (`sk-…`) so tools that check the prefix accept them. */
const KEY_PREFIX = 'sk-lgw-';

export function hashKey(key: string): string {
  return createHash('sha256').update(key, 'utf8').digest('hex');
}

/** Reads and validates the file; a missing file is an empty key list only when `allowMissing`. */
export async function readApiKeyFile(path: string, { allowMissing = false } = {}): Promise<ApiKeyEntry[]> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if (allowMissing && (err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new ConfigError('CONFIG_INVALID', `--api-keys ${basename(path)}: cannot read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, { cause: err });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new ConfigError('CONFIG_INVALID', `--api-keys ${basename(path)}: not JSON (${(err as Error).message})`, { cause: err });
  }
  const parsed = fileSchema.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new ConfigError('CONFIG_INVALID', `--api-keys ${basename(path)}: ${issue?.path.join('.') || '(root)'}: ${issue?.message}`);
  }
  return parsed.data.keys;
}

/** Replaces the file atomically (write a sibling, fsync, rename), readable by its owner only. */
async function writeApiKeyFile(path: string, keys: ApiKeyEntry[]): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
  const fh = await open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(`${JSON.stringify({ version: 1, keys }, null, 2)}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
}

/** Makes a key, appends its hash to the file (created when missing) and returns the key: shown once. */
export async function createApiKey(path: string, tenant: string, role: Role): Promise<{ key: string; entry: ApiKeyEntry }> {
  if (!TENANT_RE.test(tenant)) throw new ConfigError('CONFIG_INVALID', `--tenant '${tenant}' is invalid: use 1–64 letters, digits, '_' or '-', starting with a letter or digit`);
  const keys = await readApiKeyFile(path, { allowMissing: true });
  const key = KEY_PREFIX + randomBytes(32).toString('base64url');
  const sha256 = hashKey(key);
  const entry: ApiKeyEntry = { id: `key_${sha256.slice(0, 12)}`, sha256, tenant, role, created_at: new Date().toISOString() };
  await writeApiKeyFile(path, [...keys, entry]);
  return { key, entry };
}

/** Removes keys by id, by the key itself, or every key of a tenant; returns what was removed. */
export async function revokeApiKeys(path: string, which: { id?: string; key?: string; tenant?: string }): Promise<ApiKeyEntry[]> {
  const keys = await readApiKeyFile(path);
  const hash = which.key === undefined ? undefined : hashKey(which.key);
  const matches = (e: ApiKeyEntry) => e.id === which.id || e.sha256 === hash || e.tenant === which.tenant;
  const removed = keys.filter(matches);
  if (removed.length > 0) await writeApiKeyFile(path, keys.filter((e) => !matches(e)));
  return removed;
}

/**
 * The keys a server accepts. Lookup hashes the presented key and compares it with every
 * entry in constant time (no early exit, no map keyed by hash), so timing says nothing about
 * how much of a hash matched.
 */
export class ApiKeyRing {
  private entries: { hash: Buffer; principal: Principal }[];

  constructor(keys: ApiKeyEntry[]) {
    this.entries = keys.map((e) => ({ hash: Buffer.from(e.sha256, 'hex'), principal: { tenant: e.tenant, role: e.role, keyId: e.id } }));
  }

  static async load(path: string): Promise<ApiKeyRing> {
    return new ApiKeyRing(await readApiKeyFile(path));
  }

  get size(): number {
    return this.entries.length;
  }

  authenticate(key: string): Principal | undefined {
    const presented = Buffer.from(hashKey(key), 'hex');
    let found: Principal | undefined;
    for (const e of this.entries) {
      if (timingSafeEqual(presented, e.hash) && !found) found = e.principal;
    }
    return found;
  }
}

/**
 * The server's hold on the keys file: read at startup (a bad file stops startup), read again
 * on SIGHUP once `watch` is called (a bad file then keeps the keys in force and says why).
 */
export class ApiKeyFile {
  private onHup: (() => void) | undefined;

  private constructor(
    private readonly path: string,
    public ring: ApiKeyRing,
  ) {}

  static async open(path: string): Promise<ApiKeyFile> {
    return new ApiKeyFile(path, await ApiKeyRing.load(path));
  }

  /** Re-reads the file on every SIGHUP until `close`. */
  watch(log: (line: string) => void): void {
    this.close();
    this.onHup = () => void this.reload(log);
    process.on('SIGHUP', this.onHup);
  }

  private async reload(log: (line: string) => void): Promise<void> {
    try {
      this.ring = await ApiKeyRing.load(this.path);
      log(`SIGHUP: API keys re-read: ${this.ring.size} key(s)`);
    } catch (err) {
      log(`SIGHUP: API keys not re-read, the ${this.ring.size} key(s) in force stay: ${(err as Error).message}`);
    }
  }

  close(): void {
    if (this.onHup) process.off('SIGHUP', this.onHup);
    this.onHup = undefined;
  }
}
