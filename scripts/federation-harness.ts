/**
 * The parts of a federated run on one machine that the demo (scripts/demo-federation.ts) and the
 * benchmark (bench/federation.ts) share: CLI child processes, Redis checks and cleanup, the
 * gateway's HTTP API, and scoring a published version on held-out windows.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { Redis } from 'ioredis';
import { meanLoss } from '../src/federation/local-trainer.js';
import type { LlamaModel } from '../src/model/forward/llama-model.js';
import type { LoraAdapter } from '../src/model/lora/lora-adapter.js';
import { readPeftAdapter, uploadAdapter } from '../src/model/lora/peft-adapter-reader.js';
import type { DemoClient } from './demo-federation-data.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));

/** A failure a run explains in one message (no stack trace). */
export class HarnessError extends Error {}

// ---- child processes ------------------------------------------------------------------------

/** A CLI child process (`node --import tsx src/cli/main.ts …`, so no build is needed) whose output lines are kept. */
export class Child {
  readonly name: string;
  readonly proc: ChildProcess;
  private readonly lines: string[] = [];
  private readonly waiters = new Set<() => void>();
  private readonly done: Promise<void>;

  constructor(name: string, args: string[], onLine: (child: Child, line: string) => void) {
    this.name = name;
    this.proc = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    this.done = new Promise((r) => this.proc.once('exit', () => r()));
    for (const stream of [this.proc.stdout!, this.proc.stderr!]) {
      createInterface({ input: stream }).on('line', (line) => {
        this.lines.push(line);
        if (this.lines.length > 400) this.lines.shift();
        onLine(this, line);
        for (const w of [...this.waiters]) w();
      });
    }
    this.proc.once('exit', () => [...this.waiters].forEach((w) => w()));
  }

  get running(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  tail(n = 15): string {
    return this.lines.slice(-n).map((l) => `  [${this.name}] ${l}`).join('\n');
  }

  /** Resolves with the first output line matching `re`; rejects if the process exits or the time runs out first. */
  waitFor(re: RegExp, timeoutMs: number): Promise<RegExpExecArray> {
    return new Promise((resolveMatch, reject) => {
      const finish = (fn: () => void) => {
        clearTimeout(timer);
        this.waiters.delete(check);
        fn();
      };
      const check = () => {
        for (const line of this.lines) {
          const m = re.exec(line);
          if (m) return finish(() => resolveMatch(m));
        }
        if (!this.running) finish(() => reject(new HarnessError(`${this.name} exited (${this.proc.exitCode ?? this.proc.signalCode}) before it was ready:\n${this.tail()}`)));
      };
      const timer = setTimeout(() => finish(() => reject(new HarnessError(`${this.name} was not ready within ${timeoutMs / 1000} s:\n${this.tail()}`))), timeoutMs);
      this.waiters.add(check);
      check();
    });
  }

  /** SIGTERM (the CLI then closes cleanly), SIGKILL if it is still there after 10 s. */
  async stop(): Promise<void> {
    if (!this.running) return;
    this.proc.kill('SIGTERM');
    const killer = setTimeout(() => this.proc.kill('SIGKILL'), 10_000);
    await this.done;
    clearTimeout(killer);
  }
}

// ---- Redis ----------------------------------------------------------------------------------

export const redact = (url: string): string => url.replace(/\/\/([^@/]*)@/, '//***@');

export async function checkRedis(url: string): Promise<void> {
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, connectTimeout: 3000, enableOfflineQueue: false });
  let cause: string | undefined;
  redis.on('error', (err: Error) => void (cause ??= err.message));
  try {
    await redis.connect();
    await redis.ping();
  } catch (err) {
    throw new HarnessError(
      `Redis does not answer at ${redact(url)} (${cause ?? (err as Error).message}). Start one (redis-server, or docker run -p 6379:6379 redis:7) or point LORA_GATEWAY_REDIS_URL at yours.`,
    );
  } finally {
    redis.disconnect();
  }
}

/** Deletes every key of this run (job records, global states, updates, BullMQ queues). */
export async function deletePrefix(url: string, prefix: string): Promise<number> {
  const redis = new Redis(url, { maxRetriesPerRequest: 1, retryStrategy: () => null });
  redis.on('error', () => undefined);
  let deleted = 0;
  try {
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000);
      cursor = next;
      if (keys.length > 0) deleted += await redis.unlink(...keys);
    } while (cursor !== '0');
  } finally {
    redis.disconnect();
  }
  return deleted;
}

// ---- the gateway's HTTP API -----------------------------------------------------------------

export interface RoundJson {
  round: number;
  attempt: number;
  kind: string;
  state: string;
  participants: string[];
  dropped: { client: string; reason: string }[];
  examples: number | null;
  mean_train_loss: number | null;
  bytes_uploaded: number | null;
  published_version: number | null;
  rank: number | null;
  aggregation_error?: number;
  kept_fraction?: number;
  timings: { training_s: number; aggregation_s: number; publishing_s: number } | null;
}

export interface JobJson {
  id: string;
  state: string;
  versions: number[];
  history: RoundJson[];
  error: { code: string; message: string } | null;
}

export async function api<T>(base: string, method: string, path: string, body?: unknown): Promise<T> {
  const res = await fetch(`${base}${path}`, { method, headers: body === undefined ? {} : { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  if (!res.ok) throw new HarnessError(`${method} ${path} answered ${res.status}: ${text}`);
  return JSON.parse(text) as T;
}

export async function download(base: string, adapterId: string, file: string, version: number): Promise<Uint8Array> {
  const res = await fetch(`${base}/v1/adapters/${adapterId}/files/${file}?version=${version}`);
  if (!res.ok) throw new HarnessError(`downloading ${file} of '${adapterId}' v${version} answered ${res.status}: ${await res.text()}`);
  return new Uint8Array(await res.arrayBuffer());
}

// ---- held-out evaluation --------------------------------------------------------------------

/** Per-client held-out loss and the token-weighted overall loss (all windows have SEQ_LEN targets). */
export async function heldOutLosses(model: LlamaModel, clients: DemoClient[], adapter: LoraAdapter | null): Promise<{ overall: number; perClient: number[] }> {
  const perClient: number[] = [];
  for (const c of clients) perClient.push(await meanLoss(model, c.heldOut, adapter, 32));
  const windows = clients.reduce((s, c) => s + c.heldOut.length, 0);
  return { overall: clients.reduce((s, c, i) => s + perClient[i] * c.heldOut.length, 0) / windows, perClient };
}

export async function scoreVersion(base: string, model: LlamaModel, clients: DemoClient[], adapterId: string, version: number) {
  const [config, weights] = await Promise.all(['adapter_config.json', 'adapter_model.safetensors'].map((f) => download(base, adapterId, f, version)));
  const host = await readPeftAdapter(`${adapterId}@v${version}`, model.config, 4096, `${adapterId}-v${version}`, { config, weights });
  const adapter = uploadAdapter(host, model.config);
  try {
    return await heldOutLosses(model, clients, adapter);
  } finally {
    adapter.dispose();
  }
}
