/**
 * bench:load — overload behaviour of `lora-gateway serve` over real HTTP. Starts a fresh serve
 * process (the demo model with its 4 adapters, in a temporary data folder), measures its
 * capacity closed-loop (C clients back to back for --capacity-duration: completed requests / s),
 * then offers open-loop Poisson arrivals at --factor × that capacity for --duration, with the
 * same mixed workload: `model` uniform over the base model and the adapters, max_tokens uniform
 * in --max-tokens (end-of-sequence ignored), half of the requests streaming.
 *
 * Reported: the share shed with 429, connection errors (must be 0), 5xx (must be 0), TTFT and
 * end-to-end latency of admitted requests, time to the first byte of the 429s (each within 1 s),
 * GET /health latency during the load, and the server's RSS (/proc) and live engine tensors
 * (lora_gateway_engine_tensors on /metrics) sampled every second: first third vs last third.
 *
 *   npm run bench:load [-- --duration 600s --factor 1.5 --max-waiting 32 --concurrency 64]
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { parseDuration } from '../src/config.js';

const { values: flags } = parseArgs({
  options: {
    duration: { type: 'string', default: '30s' },
    'capacity-duration': { type: 'string', default: '10s' },
    // as many clients as the server runs sequences (--max-running-seqs 64): fewer measure latency, not capacity
    concurrency: { type: 'string', default: '64' },
    factor: { type: 'string', default: '1.5' },
    'max-waiting': { type: 'string', default: '32' },
    'max-tokens': { type: 'string', default: '8-32' },
    backend: { type: 'string', default: 'wasm' },
    seed: { type: 'string', default: '7' },
  },
});
const DURATION_MS = parseDuration(flags.duration, 'duration')!;
const CAPACITY_MS = parseDuration(flags['capacity-duration'], 'capacity-duration')!;
const [TOK_LO, TOK_HI] = flags['max-tokens'].split('-').map(Number);
const MODELS = ['demo-model', 'demo-0', 'demo-1', 'demo-2', 'demo-3'];
const WORDS = ['the', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dog', 'river', 'stone', 'light', 'cloud'];

let state = Number(flags.seed) >>> 0;
/** mulberry32: the same workload every run. */
function rnd(): number {
  state = (state + 0x6d2b79f5) | 0;
  let t = Math.imul(state ^ (state >>> 15), 1 | state);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const pick = <T>(xs: T[]): T => xs[Math.floor(rnd() * xs.length)];

interface Outcome {
  status: number;
  /** Connection-level failure (ECONNRESET, ECONNREFUSED, …); status is 0 then. */
  error?: string;
  ttfbMs: number;
  ttftMs: number;
  e2eMs: number;
}

async function oneRequest(baseUrl: string): Promise<Outcome> {
  const stream = rnd() < 0.5;
  const body = {
    model: pick(MODELS),
    prompt: Array.from({ length: 4 + Math.floor(rnd() * 12) }, () => pick(WORDS)).join(' '),
    max_tokens: TOK_LO + Math.floor(rnd() * (TOK_HI - TOK_LO + 1)),
    ignore_eos: true,
    temperature: 0,
    stream,
  };
  const t0 = performance.now();
  try {
    const res = await fetch(`${baseUrl}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const ttfbMs = performance.now() - t0;
    let ttftMs = NaN;
    if (res.status === 200 && stream) {
      const reader = res.body!.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (Number.isNaN(ttftMs) && new TextDecoder().decode(value).includes('"text"')) ttftMs = performance.now() - t0;
      }
    } else if (res.status >= 500) {
      // say which: the table lists the codes of every 5xx
      const code = ((await res.json().catch(() => ({}))) as { error?: { code?: string } }).error?.code;
      return { status: res.status, error: `${res.status} ${code ?? '?'}`, ttfbMs, ttftMs: NaN, e2eMs: NaN };
    } else await res.arrayBuffer();
    const e2eMs = performance.now() - t0;
    return { status: res.status, ttfbMs, ttftMs: Number.isNaN(ttftMs) ? e2eMs : ttftMs, e2eMs };
  } catch (err) {
    const cause = (err as { cause?: { code?: string } }).cause;
    return { status: 0, error: cause?.code ?? (err as Error).message, ttfbMs: NaN, ttftMs: NaN, e2eMs: NaN };
  }
}

/** Error-level lines the server logged during the run, by message. */
const serverErrors = new Map<string, number>();
function serverErrorOf(line: string): void {
  if (!line.startsWith('{')) return;
  const e = JSON.parse(line) as { level?: number; msg?: string; err?: { message?: string; stack?: string } };
  if ((e.level ?? 0) < 50) return;
  const what = `${e.msg ?? ''}: ${e.err?.stack?.split('\n').slice(0, 3).join(' | ') ?? e.err?.message ?? ''}`;
  serverErrors.set(what, (serverErrors.get(what) ?? 0) + 1);
}

function pct(xs: number[], p: number): number {
  const a = xs.filter((x) => !Number.isNaN(x)).sort((x, y) => x - y);
  return a.length === 0 ? NaN : a[Math.min(a.length - 1, Math.max(0, Math.ceil((p / 100) * a.length) - 1))];
}
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

async function engineTensors(baseUrl: string): Promise<number> {
  const text = await (await fetch(`${baseUrl}/metrics`)).text();
  return Number(/^lora_gateway_engine_tensors (\d+)/m.exec(text)?.[1] ?? NaN);
}

async function main(): Promise<void> {
  const dataDir = await mkdtemp(join(os.tmpdir(), 'lora-gateway-load-'));
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'serve', '--data', dataDir, '--port', '0', '--backend', flags.backend, '--max-waiting', flags['max-waiting']], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  let listening = false;
  const baseUrl = await new Promise<string>((resolve, reject) => {
    // stdout is a pipe: serve writes JSON lines there (startup, then one per request), read to the end
    let partial = '';
    const onData = (d: Buffer) => {
      if (listening) {
        // after startup: keep what the server logged at error level, to name the cause of any 5xx
        const lines = (partial + d.toString()).split('\n');
        partial = lines.pop()!;
        for (const line of lines) serverErrorOf(line);
        return;
      }
      log += d.toString();
      const m = / at (http:\/\/\S+) \(device pool/.exec(log);
      if (m) {
        listening = true;
        resolve(m[1]);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.once('exit', (code) => reject(new Error(`serve exited with ${code}:\n${log}`)));
  });
  try {
    // warm-up: every adapter onto the device once
    await Promise.all(MODELS.map(() => oneRequest(baseUrl)));

    // 1. capacity, closed loop
    const c = Number(flags.concurrency);
    const capEnd = performance.now() + CAPACITY_MS;
    let completed = 0;
    await Promise.all(
      Array.from({ length: c }, async () => {
        while (performance.now() < capEnd) if ((await oneRequest(baseUrl)).status === 200) completed++;
      }),
    );
    const capacity = completed / (CAPACITY_MS / 1000);
    const rate = capacity * Number(flags.factor);
    process.stderr.write(`capacity ${capacity.toFixed(1)} req/s closed-loop with ${c} clients; offering ${rate.toFixed(1)} req/s for ${DURATION_MS / 1000} s\n`);

    // 2. open-loop Poisson arrivals at factor × capacity, with samplers alongside
    const outcomes: Promise<Outcome>[] = [];
    const health: number[] = [];
    const samples: { rss: number; tensors: number }[] = [];
    const start = performance.now();
    const end = start + DURATION_MS;
    const sampler = (async () => {
      while (performance.now() < end) {
        const t0 = performance.now();
        await fetch(`${baseUrl}/health`).then((r) => r.arrayBuffer());
        health.push(performance.now() - t0);
        samples.push({ rss: rssMiB(child.pid!), tensors: await engineTensors(baseUrl) });
        await sleep(1000 - (performance.now() - t0));
      }
    })();
    let next = start;
    while (next < end) {
      next += (-Math.log(1 - rnd()) / rate) * 1000;
      await sleep(next - performance.now());
      outcomes.push(oneRequest(baseUrl));
    }
    await sampler;
    const all = await Promise.all(outcomes);
    report({ capacity, rate, concurrency: c, all, health, samples });
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
    await rm(dataDir, { recursive: true, force: true });
  }
}

/** The mean of each tenth of a series. */
function tenths(xs: number[]): number[] {
  const n = Math.max(1, Math.floor(xs.length / 10));
  return Array.from({ length: Math.min(10, Math.floor(xs.length / n)) }, (_, i) => mean(xs.slice(i * n, (i + 1) * n)));
}

function report(r: { capacity: number; rate: number; concurrency: number; all: Outcome[]; health: number[]; samples: { rss: number; tensors: number }[] }): void {
  const ok = r.all.filter((o) => o.status === 200);
  const shed = r.all.filter((o) => o.status === 429);
  const fiveXx = r.all.filter((o) => o.status >= 500);
  const connErrors = r.all.filter((o) => o.status === 0);
  const other = r.all.length - ok.length - shed.length - fiveXx.length - connErrors.length;
  const third = Math.max(1, Math.floor(r.samples.length / 3));
  const first = r.samples.slice(0, third);
  const last = r.samples.slice(-third);
  const f = (x: number) => (Number.isNaN(x) ? '-' : x.toFixed(0));
  const rows: [string, string][] = [
    ['capacity (closed loop)', `${r.capacity.toFixed(1)} req/s (${r.concurrency} clients)`],
    ['offered (open loop, Poisson)', `${r.rate.toFixed(1)} req/s, ${r.all.length} requests in ${DURATION_MS / 1000} s`],
    ['admitted (200)', `${ok.length} (${((100 * ok.length) / r.all.length).toFixed(1)} %)`],
    ['shed (429)', `${shed.length} (${((100 * shed.length) / r.all.length).toFixed(1)} %)`],
    ['5xx / other statuses', `${fiveXx.length}${fiveXx.length ? ` (${[...new Set(fiveXx.map((o) => o.error))].join(', ')})` : ''} / ${other}`],
    ['connection errors', `${connErrors.length}${connErrors.length ? ` (${[...new Set(connErrors.map((o) => o.error))].join(', ')})` : ''}`],
    ['admitted TTFT p50 / p99 (ms)', `${f(pct(ok.map((o) => o.ttftMs), 50))} / ${f(pct(ok.map((o) => o.ttftMs), 99))}`],
    ['admitted e2e p50 / p99 (ms)', `${f(pct(ok.map((o) => o.e2eMs), 50))} / ${f(pct(ok.map((o) => o.e2eMs), 99))}`],
    ['429 time to first byte p50 / p99 / max (ms)', `${f(pct(shed.map((o) => o.ttfbMs), 50))} / ${f(pct(shed.map((o) => o.ttfbMs), 99))} / ${f(Math.max(0, ...shed.map((o) => o.ttfbMs)))}`],
    ['429s answered after 1 s', `${shed.filter((o) => o.ttfbMs > 1000).length}`],
    ['GET /health p50 / p99 / max (ms)', `${f(pct(r.health, 50))} / ${f(pct(r.health, 99))} / ${f(Math.max(...r.health))}`],
    ['RSS MiB, first third / last third', `${mean(first.map((s) => s.rss)).toFixed(0)} / ${mean(last.map((s) => s.rss)).toFixed(0)}`],
    // a leak climbs to the end; a heap settling to its working size levels off
    ['RSS MiB at each tenth of the run', tenths(r.samples.map((s) => s.rss)).map((x) => x.toFixed(0)).join(' ')],
    ['engine tensors, first third / last third', `${mean(first.map((s) => s.tensors)).toFixed(0)} / ${mean(last.map((s) => s.tensors)).toFixed(0)}`],
  ];
  const w = Math.max(...rows.map(([k]) => k.length));
  for (const [what, n] of serverErrors) process.stderr.write(`server logged ${n}× ${what}\n`);
  process.stdout.write(`\n| measure | value |\n|---|---|\n${rows.map(([k, v]) => `| ${k.padEnd(w)} | ${v} |`).join('\n')}\n`);
}

await main();
