/**
 * bench:peer-workload — the llama.cpp peer's multi-adapter workload (../shared/peer, run_peer.mjs
 * `bench`) against lora-gateway over HTTP, both systems interleaved in one run on one machine.
 *
 * Workload (reproduced from run_peer.mjs exactly): M = 64 requests at t = 0; prompts of P = 64
 * token ids `256 + floor(rnd() * 49000)` from mulberry32(seed 1), drawn after the adapter
 * assignment (zipf draws M adapters first; uniform = round-robin i mod N draws none); O = 32
 * tokens each, greedy, end-of-sequence ignored. gen tok/s = M·O / makespan; TTFT from t = 0 to
 * a request's first streamed token (p99 nearest rank); e2e = mean completion time; peak RSS =
 * VmHWM of the serving process. Adapters are loaded onto the device before t = 0 (the peer
 * loads its adapters and warms its contexts before t = 0 too).
 *
 * Each configuration runs in a fresh `lora-gateway serve` process (and the peer's in a fresh
 * llama.cpp process); a pass runs every configuration of both systems, alternating; medians
 * over passes. Also measured in the same run: the machine's 1024³ sgemm rate (the ceiling).
 *
 *   npm run build && npm run bench:peer-workload -- --peer /tmp/peer [--passes 3] [--adapters 1,64]
 *        [--dist uniform,zipf] [--strategies dedicated,pool2] [--skip-peer]
 *
 * The peer folder must hold work/m75 as its README makes it (model, adapters, GGUF files).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const { values: flags } = parseArgs({
  options: {
    peer: { type: 'string', default: '/tmp/peer' },
    passes: { type: 'string', default: '3' },
    adapters: { type: 'string', default: '1,64' },
    dist: { type: 'string', default: 'uniform,zipf' },
    strategies: { type: 'string', default: 'dedicated,pool2' },
    requests: { type: 'string', default: '64' },
    'prompt-len': { type: 'string', default: '64' },
    'out-len': { type: 'string', default: '32' },
    threads: { type: 'string', default: '2' },
    'skip-peer': { type: 'boolean', default: false },
    'gateway-args': { type: 'string', default: '' },
    'max-batch-tokens': { type: 'string', default: '2048' },
    'host-memory': { type: 'string', default: '128MiB' },
  },
});
const M = Number(flags.requests);
const P = Number(flags['prompt-len']);
const O = Number(flags['out-len']);
const PEER = resolve(flags.peer);
const MODEL = join(PEER, 'work/m75/model');
const ADAPTERS = join(PEER, 'work/m75/adapters');

// ---- the peer's workload generator, verbatim in behaviour (run_peer.mjs) ----
function mulberry32(a: number): () => number {
  return function () {
    a |= 0;
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function assignAdapters(m: number, n: number, dist: string, s: number, rnd: () => number): number[] {
  if (n <= 0) return new Array(m).fill(-1);
  if (dist === 'uniform') return Array.from({ length: m }, (_, i) => i % n);
  const w = Array.from({ length: n }, (_, k) => 1 / Math.pow(k + 1, s));
  const tot = w.reduce((x, y) => x + y, 0);
  const cdf: number[] = [];
  let c = 0;
  for (const x of w) {
    c += x / tot;
    cdf.push(c);
  }
  return Array.from({ length: m }, () => {
    const u = rnd();
    const k = cdf.findIndex((x) => u <= x);
    return k < 0 ? n - 1 : k;
  });
}

function pct(arr: number[], p: number): number {
  const a = [...arr].sort((x, y) => x - y);
  return a[Math.min(a.length - 1, Math.max(0, Math.ceil((p / 100) * a.length) - 1))];
}

const med = (a: number[]): number => {
  const b = [...a].sort((x, y) => x - y);
  const m = b.length >> 1;
  return b.length % 2 ? b[m] : (b[m - 1] + b[m]) / 2;
};

interface Row {
  system: 'lora-gateway' | 'llama.cpp';
  strategy: string;
  nAdapters: number;
  dist: string;
  genTokPerS: number;
  ttftMeanMs: number;
  ttftP99Ms: number;
  e2eMeanMs: number;
  peakRssMiB: number;
}

async function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => res(port));
    });
    srv.on('error', rej);
  });
}

function vmHwmMiB(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

/** One streamed completion; resolves with the times (from t0) of its first token and of its end. */
async function streamOne(url: string, model: string, prompt: number[], t0: number): Promise<{ first: number; done: number; tokens: number }> {
  const res = await fetch(`${url}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model, prompt, max_tokens: O, temperature: 0, ignore_eos: true, stream: true, stream_options: { include_usage: true } }),
  });
  if (res.status !== 200) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  let first = 0;
  let tokens = 0;
  let buf = '';
  const decoder = new TextDecoder();
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    buf += decoder.decode(chunk, { stream: true });
    let i: number;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const frame = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (!frame.startsWith('data: ') || frame === 'data: [DONE]') continue;
      const ev = JSON.parse(frame.slice(6)) as { choices?: { text?: string }[]; usage?: { completion_tokens: number } };
      if (ev.choices?.length && !first) first = performance.now() - t0;
      if (ev.usage) tokens = ev.usage.completion_tokens;
    }
  }
  return { first, done: performance.now() - t0, tokens };
}

async function gatewayRun(nAdapters: number, dist: string, dataDir: string): Promise<Row> {
  const port = await freePort();
  const args = [
    'dist/cli/main.js', 'serve', '--model', MODEL, '--adapter-dir', ADAPTERS, '--data', dataDir, '--port', String(port),
    '--max-running-seqs', String(M), '--max-batch-tokens', flags['max-batch-tokens'], '--max-adapters-per-batch', String(Math.max(1, nAdapters)),
    '--device-memory', '1GiB', '--host-memory', flags['host-memory'],
    ...flags['gateway-args'].split(' ').filter(Boolean),
  ];
  const child: ChildProcess = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  child.stdout!.on('data', (d) => (log += d));
  child.stderr!.on('data', (d) => (log += d));
  const url = `http://127.0.0.1:${port}`;
  try {
    for (let i = 0; ; i++) {
      if (child.exitCode !== null) throw new Error(`gateway exited: ${log}`);
      if (await fetch(`${url}/health`).then((r) => r.ok, () => false)) break;
      if (i > 600) throw new Error(`gateway did not start: ${log}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    const hwmStart = vmHwmMiB(child.pid!);
    const ids = readdirSync(ADAPTERS).sort();
    const rnd = mulberry32(1);
    const assign = assignAdapters(M, nAdapters, dist, 1, rnd);
    const prompts = assign.map(() => Array.from({ length: P }, () => 256 + Math.floor(rnd() * 49000)));
    const modelOf = (a: number) => (a < 0 ? 'model' : ids[a]);
    // warm-up before t0: every adapter the run uses goes onto the device, and the kernels run once
    const used = [...new Set(assign)];
    await Promise.all(used.map((a) => streamOne(url, modelOf(a), [464, 2068], performance.now())));
    const hwmWarm = vmHwmMiB(child.pid!);
    const t0 = performance.now();
    const results = await Promise.all(prompts.map((p, i) => streamOne(url, modelOf(assign[i]), p, t0)));
    const makespan = Math.max(...results.map((r) => r.done));
    const genTokens = results.reduce((s, r) => s + r.tokens, 0);
    if (genTokens !== M * O) throw new Error(`generated ${genTokens} tokens, expected ${M * O}`);
    const ttft = results.map((r) => r.first);
    process.stderr.write(`  peak RSS after startup ${hwmStart.toFixed(0)} MiB, after warm-up ${hwmWarm.toFixed(0)} MiB, after the run ${vmHwmMiB(child.pid!).toFixed(0)} MiB\n`);
    return {
      system: 'lora-gateway',
      strategy: 'heterogeneous batch',
      nAdapters,
      dist: nAdapters <= 1 ? '-' : dist,
      genTokPerS: genTokens / (makespan / 1000),
      ttftMeanMs: ttft.reduce((a, b) => a + b, 0) / M,
      ttftP99Ms: pct(ttft, 99),
      e2eMeanMs: results.reduce((a, r) => a + r.done, 0) / M,
      peakRssMiB: vmHwmMiB(child.pid!),
    };
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
  }
}

function peerRun(nAdapters: number, dists: string[], strategies: string[], out: string): Row[] {
  execFileSync(
    process.execPath,
    [
      'run_peer.mjs', 'bench', '--model', 'work/m75/model-f32.gguf', '--adapter-glob', 'work/m75/gguf_adapters',
      '--n-adapters', String(nAdapters), '--dist', dists.join(','), '--strategies', strategies.join(','),
      '--requests', String(M), '--prompt-len', String(P), '--out-len', String(O), '--threads', flags.threads, '--out', out,
    ],
    { cwd: PEER, stdio: ['ignore', 'ignore', 'inherit'] },
  );
  const rows = JSON.parse(readFileSync(out, 'utf8')) as (Row & { error?: string })[];
  return rows.filter((r) => !r.error).map((r) => ({ ...r, system: 'llama.cpp' as const, dist: r.nAdapters <= 1 ? '-' : r.dist, strategy: `${r.strategy}, ${flags.threads} threads` }));
}

/** The machine's single-precision GEMM at 1024³: numpy's OpenBLAS and this project's addon, whichever is faster. */
function gemmCeiling(): { gflops: number; detail: string } {
  const found: { gflops: number; detail: string }[] = [];
  try {
    const py = `import numpy as np, time\na=np.random.rand(1024,1024).astype(np.float32);b=np.random.rand(1024,1024).astype(np.float32)\na@b\nt=time.perf_counter()\nfor _ in range(20): a@b\nprint(2*1024**3*20/(time.perf_counter()-t)/1e9)`;
    found.push({ gflops: Number(execFileSync('python3', ['-c', py], { encoding: 'utf8' }).trim()), detail: 'numpy' });
  } catch {
    // numpy missing: the addon's figure stands alone
  }
  const js = `import('./src/model/backend/native-matmul.ts').then(async (m) => { const tf = await import('@tensorflow/tfjs-core'); await import('@tensorflow/tfjs-backend-wasm'); await tf.setBackend('wasm'); m.installNativeMatMul(); const a = tf.randomNormal([1024,1024]); const b = tf.randomNormal([1024,1024]); const once = () => { const c = tf.matMul(a,b); c.dataSync(); c.dispose(); }; once(); const t = performance.now(); for (let i = 0; i < 20; i++) once(); console.log(JSON.stringify({ g: 2*1024**3*20/((performance.now()-t)/1000)/1e9, d: m.matMulPath().detail })); })`;
  try {
    const r = JSON.parse(execFileSync(process.execPath, ['--import', 'tsx', '-e', js], { encoding: 'utf8' }).trim().split('\n').pop()!) as { g: number; d: string };
    found.push({ gflops: r.g, detail: `lora-gateway's sgemm (${r.d})` });
  } catch (err) {
    process.stderr.write(`addon GEMM not measured: ${(err as Error).message.split('\n')[0]}\n`);
  }
  const best = found.reduce((a, b) => (b.gflops > a.gflops ? b : a), { gflops: 0, detail: 'none' });
  return { gflops: best.gflops, detail: found.map((f) => `${f.detail} ${f.gflops.toFixed(0)}`).join('; ') };
}

async function main(): Promise<void> {
  if (!existsSync(join(MODEL, 'config.json')) || !existsSync(ADAPTERS)) {
    throw new Error(`${MODEL} or ${ADAPTERS} is missing: make them as ${PEER}/README.md says (gen_tiny.py, hf2gguf.py, lora2gguf.py)`);
  }
  if (!existsSync('dist/cli/main.js')) throw new Error('run npm run build first');
  const counts = flags.adapters.split(',').map(Number);
  const dists = flags.dist.split(',');
  const strategies = flags.strategies.split(',');
  const passes = Number(flags.passes);
  const work = await mkdtemp(join(os.tmpdir(), 'lora-gateway-peer-workload-'));
  const rows: Row[] = [];
  const gemm: number[] = [];
  let gemmDetail = '';
  try {
    for (let pass = 1; pass <= passes; pass++) {
      const g = gemmCeiling();
      gemm.push(g.gflops);
      gemmDetail = g.detail;
      for (const n of counts) {
        for (const dist of n <= 1 ? [dists[0]] : dists) {
          rows.push(await gatewayRun(n, dist, join(work, 'data')));
          process.stderr.write(`pass ${pass}: gateway N=${n} ${dist}: ${rows.at(-1)!.genTokPerS.toFixed(1)} tok/s, TTFT p99 ${rows.at(-1)!.ttftP99Ms.toFixed(0)} ms\n`);
        }
        if (!flags['skip-peer']) {
          const out = join(work, `peer-${pass}-${n}.json`);
          for (const r of peerRun(n, n <= 1 ? [dists[0]] : dists, n <= 1 ? [strategies[0]] : strategies, out)) rows.push(r);
          process.stderr.write(`pass ${pass}: llama.cpp N=${n} done\n`);
        }
      }
    }
    await writeFile(join(work, 'rows.json'), JSON.stringify(rows, null, 1));
    const ceiling = med(gemm);
    console.log(`machine: ${os.cpus()[0].model}, ${os.cpus().length} cores; ${new Date().toISOString().slice(0, 10)}; ${passes} interleaved passes, medians`);
    console.log(`workload: ${M} requests at t=0, prompts of ${P} random token ids, ${O} generated tokens each (greedy, EOS ignored)`);
    console.log(`machine GEMM (1024³ sgemm, the ceiling): ${ceiling.toFixed(0)} GFLOP/s (${gemmDetail})`);
    console.log('');
    console.log('| system | strategy | adapters | dist | gen tok/s | TTFT mean | TTFT p99 | e2e mean | peak RSS |');
    console.log('|---|---|---|---|---|---|---|---|---|');
    const groups = new Map<string, Row[]>();
    for (const r of rows) {
      const k = `${r.nAdapters}|${r.dist}|${r.system}|${r.strategy}`;
      groups.set(k, [...(groups.get(k) ?? []), r]);
    }
    const best = new Map<string, number>();
    for (const [, rs] of [...groups].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
      const r = rs[0];
      const tok = med(rs.map((x) => x.genTokPerS));
      if (r.system === 'llama.cpp') best.set(`${r.nAdapters}|${r.dist}`, Math.max(best.get(`${r.nAdapters}|${r.dist}`) ?? 0, tok));
      console.log(
        `| ${r.system} | ${r.strategy} | ${r.nAdapters} | ${r.dist} | ${tok.toFixed(1)} (${Math.min(...rs.map((x) => x.genTokPerS)).toFixed(0)}–${Math.max(...rs.map((x) => x.genTokPerS)).toFixed(0)}) | ` +
          `${(med(rs.map((x) => x.ttftMeanMs)) / 1000).toFixed(2)} s | ${(med(rs.map((x) => x.ttftP99Ms)) / 1000).toFixed(2)} s | ${(med(rs.map((x) => x.e2eMeanMs)) / 1000).toFixed(2)} s | ${(med(rs.map((x) => x.peakRssMiB)) / 1024).toFixed(2)} GB |`,
      );
    }
    console.log('');
    console.log('| adapters | dist | gateway gen tok/s | llama.cpp best | gateway / llama.cpp best |');
    console.log('|---|---|---|---|---|');
    for (const rs of groups.values()) {
      if (rs[0].system !== 'lora-gateway') continue;
      const key = `${rs[0].nAdapters}|${rs[0].dist}`;
      const peer = best.get(key);
      const tok = med(rs.map((x) => x.genTokPerS));
      console.log(`| ${rs[0].nAdapters} | ${rs[0].dist} | ${tok.toFixed(1)} | ${peer?.toFixed(1) ?? '-'} | ${peer ? (tok / peer).toFixed(2) + '×' : '-'} |`);
    }
    console.log(`\nrows: ${join(work, 'rows.json')}`);
  } finally {
    await rm(join(work, 'data'), { recursive: true, force: true });
  }
}

await main();
