/**
 * bench:federation — quality and cost of the four federated methods, with and without
 * client-level DP, against central LoRA on the union of the data, on real processes: one
 * gateway (`serve --redis`) and four `fed-client`s holding the State of the Union addresses of
 * 1790–1860, 1861–1932, 1933–1980 and 1981–2021 (each holds out ~10% of its addresses).
 *
 * Every configuration trains the same rounds × local steps. Reported per configuration: held-out
 * loss per era and mean (token-weighted) and its ratio to central LoRA; upload bytes per client
 * per round; mean seconds per round in training / aggregation / publishing. During the first
 * configuration a steady request load runs against the gateway: failed requests, and throughput
 * and TTFT inside vs outside the windows in which a round aggregated and published.
 *
 *   npm run bench:federation [-- --rounds 5 --steps 30 --epsilon 8 --methods fedavg,ffa,flora,fedsb]
 *                            [--no-dp] [--load-streams 2]
 *
 * Central LoRA: one trainer (A and B trained, as fedavg's clients) on all four clients' windows,
 * rounds × steps Adam steps of batch 4 × batch_size (each step sees what the four clients see in
 * one local step together). Fed-SB starts from its random init (the gradient round 0 takes ~15 min
 * here, and a DP job refuses it). DP: `dp.level client`, a fixed client list (q = 1), σ chosen by
 * the job for ε ≤ --epsilon over the rounds at δ = 1e-5, clip norm = the median update norm of the
 * method's non-DP run (recorded by a norm bound that never binds).
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { writeDemoModel } from '../src/cli/demo-model-command.js';
import { trainLocal } from '../src/federation/local-trainer.js';
import type { FedMethod } from '../src/federation/lora-factors.js';
import { initialLoraFactors, loraScale, moduleSpecsFor } from '../src/federation/lora-init.js';
import { adapterFromFactors } from '../src/federation/trainable-lora.js';
import { readClientTexts, tokenWindows } from '../src/federation/training-data.js';
import { resolveBackend } from '../src/model/backend/backend.js';
import { loadLlamaModel } from '../src/model/forward/model-loader.js';
import { TextTokenizer } from '../src/model/tokenizer/tokenizer.js';
import { prepareClients, type DemoClient } from '../scripts/demo-federation-data.js';
import { api, checkRedis, Child, deletePrefix, heldOutLosses, scoreVersion, type JobJson, type RoundJson } from '../scripts/federation-harness.js';

const { values: flags } = parseArgs({
  options: {
    rounds: { type: 'string', default: '5' },
    steps: { type: 'string', default: '30' },
    lr: { type: 'string', default: '0.02' },
    epsilon: { type: 'string', default: '8' },
    methods: { type: 'string', default: 'fedavg,ffa,flora,fedsb' },
    'no-dp': { type: 'boolean', default: false },
    'load-streams': { type: 'string', default: '2' },
  },
});

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const DIR = resolve(ROOT, 'data/federation-bench');
const MODEL_DIR = join(DIR, 'model');
const REDIS_URL = process.env.LORA_GATEWAY_REDIS_URL ?? 'redis://127.0.0.1:6379';
const PREFIX = `bench-${randomBytes(4).toString('hex')}`;
const SEQ_LEN = 32;
const BATCH = 8;
const R = 8;
const ALPHA = 16;
const TARGETS = ['q_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj'];
const DELTA = 1e-5;
/** The issue's split. */
const ERAS = [
  { id: 'era-1790', from: 1790, to: 1860 },
  { id: 'era-1861', from: 1861, to: 1932 },
  { id: 'era-1933', from: 1933, to: 1980 },
  { id: 'era-1981', from: 1981, to: 2021 },
];
const rounds = Number(flags.rounds);
const steps = Number(flags.steps);
const lr = Number(flags.lr);
const progress = (line: string) => void process.stderr.write(`${line}\n`);
const out = (line = '') => void process.stdout.write(`${line}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Result {
  name: string;
  perEra: number[];
  mean: number;
  uploadPerClientRound?: number;
  timings?: { training: number; aggregation: number; publishing: number };
  note: string;
}

function spec(method: FedMethod, id: string, clients: DemoClient[], extra: Record<string, unknown> = {}) {
  return {
    target_adapter_id: id,
    method,
    rounds,
    clients: clients.map((c) => c.id),
    seed: 1,
    round_timeout_ms: 1_800_000,
    lora: { r: R, alpha: ALPHA, target_modules: TARGETS },
    local: { steps, batch_size: BATCH, lr, seq_len: SEQ_LEN },
    ...(method === 'fedsb' ? { fedsb: { init: 'random' } } : {}),
    ...extra,
  };
}

async function runJob(base: string, body: Record<string, unknown>): Promise<JobJson> {
  const job = await api<JobJson>(base, 'POST', '/v1/federation/jobs', body);
  for (;;) {
    const j = await api<JobJson>(base, 'GET', `/v1/federation/jobs/${job.id}`);
    if (j.state === 'completed') return j;
    if (j.state !== 'queued' && j.state !== 'running') throw new Error(`job ${j.id} ${j.state}: ${JSON.stringify(j.error)}`);
    await sleep(500);
  }
}

const mean = (xs: number[]) => xs.reduce((s, x) => s + x, 0) / xs.length;

function costs(j: JobJson, clients: number): Pick<Result, 'uploadPerClientRound' | 'timings'> {
  const h = j.history.filter((r) => r.state === 'published');
  return {
    uploadPerClientRound: mean(h.map((r) => r.bytes_uploaded! / clients)),
    timings: { training: mean(h.map((r) => r.timings!.training_s)), aggregation: mean(h.map((r) => r.timings!.aggregation_s)), publishing: mean(h.map((r) => r.timings!.publishing_s)) },
  };
}

/** Closed-loop streaming requests against the gateway while `until` is pending. */
async function steadyLoad(base: string, adapter: () => string, streams: number, until: Promise<unknown>) {
  const samples: { t0: number; ttft: number; end: number; ok: boolean; status: number }[] = [];
  let done = false;
  void until.finally(() => (done = true));
  const loop = async () => {
    while (!done) {
      const t0 = Date.now();
      let ttft = NaN;
      let status = 0;
      try {
        const res = await fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: adapter(), prompt: 'Fellow-Citizens of the Senate', max_tokens: 8, temperature: 0, stream: true }) });
        status = res.status;
        const reader = res.body!.getReader();
        for (;;) {
          const { done: end, value } = await reader.read();
          if (end) break;
          if (Number.isNaN(ttft) && new TextDecoder().decode(value).includes('"text"')) ttft = Date.now() - t0;
        }
      } catch {
        status = -1;
      }
      samples.push({ t0, ttft, end: Date.now(), ok: status === 200, status });
    }
  };
  await Promise.all(Array.from({ length: streams }, loop));
  return samples;
}

async function main(): Promise<void> {
  await checkRedis(REDIS_URL);
  if (!existsSync(join(MODEL_DIR, 'config.json'))) await writeDemoModel(MODEL_DIR, { adapters: 0 });
  const backend = await resolveBackend('wasm');
  const [model, tokenizer] = await Promise.all([loadLlamaModel(MODEL_DIR), TextTokenizer.load(MODEL_DIR)]);
  const clients = await prepareClients(join(DIR, 'clients'), tokenizer, { seqLen: SEQ_LEN, maxHeldOutWindows: 128, eras: ERAS });
  const storeDir = join(DIR, 'gateway');
  await rm(storeDir, { recursive: true, force: true });
  const common = ['--redis', REDIS_URL, '--federation-prefix', PREFIX, '--model', MODEL_DIR, '--backend', 'wasm'];
  const children: Child[] = [];
  const quiet = () => undefined;
  try {
    const gateway = new Child('gateway', ['serve', '--host', '127.0.0.1', '--port', '0', '--data', storeDir, ...common], quiet);
    children.push(gateway);
    for (const c of clients) children.push(new Child(c.id, ['fed-client', '--client-id', c.id, '--data', c.trainFile, ...common], quiet));
    const [served] = await Promise.all([gateway.waitFor(/serving .* at (http:\/\/\S+) \(/, 180_000), ...children.slice(1).map((c) => c.waitFor(/federation client '.*' ready/, 180_000))]);
    const base = served[1];
    const results: Result[] = [];
    const baseLoss = await heldOutLosses(model, clients, null);
    results.push({ name: 'base model (no adapter)', perEra: baseLoss.perClient, mean: baseLoss.overall, note: '' });

    // central LoRA on the union: rounds × steps steps of 4 × BATCH windows
    progress('bench: central LoRA on the union of the four clients');
    const union = (await Promise.all(clients.map(async (c) => tokenWindows(tokenizer, await readClientTexts(c.trainFile), SEQ_LEN)))).flat();
    const modules = moduleSpecsFor(model.config, { r: R, alpha: ALPHA, targetModules: TARGETS });
    const t0 = Date.now();
    const central = await trainLocal(model, union, { method: 'fedavg', modules, global: initialLoraFactors(modules, 1), alpha: ALPHA, seed: 1, steps: rounds * steps, batchSize: 4 * BATCH, lr });
    const centralSeconds = (Date.now() - t0) / 1000;
    const adapter = adapterFromFactors('central', central.factors.values(), loraScale(ALPHA, R));
    const c = await heldOutLosses(model, clients, adapter);
    adapter.dispose();
    results.push({ name: 'central LoRA (union)', perEra: c.perClient, mean: c.overall, note: `${rounds * steps} steps of ${4 * BATCH} windows, ${centralSeconds.toFixed(0)} s` });

    const methods = flags.methods.split(',') as FedMethod[];
    let loadReport = '';
    for (const [i, method] of methods.entries()) {
      progress(`bench: ${method}`);
      const id = `bench-${method}`;
      // a bound that never binds: the round records carry every update's norm, for DP's clip norm
      const jobDone = runJob(base, spec(method, id, clients, { robust: { norm_bound: 1e12 } }));
      let load: ReturnType<typeof steadyLoad> | undefined;
      if (i === 0) {
        // requests go to the base model until the adapter's first version exists, then to the
        // adapter itself, so every later version swap happens under load
        const baseName = (await api<{ data: { id: string }[] }>(base, 'GET', '/v1/models')).data[0].id;
        let target = baseName;
        void (async () => {
          while (target === baseName) {
            if ((await fetch(`${base}/v1/adapters/${id}`)).status === 200) target = id;
            else await sleep(200);
          }
        })();
        load = steadyLoad(base, () => target, Number(flags['load-streams']), jobDone);
      }
      const job = await jobDone;
      const s = await scoreVersion(base, model, clients, id, job.versions.at(-1)!);
      results.push({ name: method, perEra: s.perClient, mean: s.overall, ...costs(job, clients.length), note: '' });
      if (load) loadReport = describeLoad(await load, job.history);
      if (flags['no-dp']) continue;
      const norms = job.history.flatMap((r) => Object.values((r as RoundJson & { rules?: { norms: Record<string, number> } }).rules?.norms ?? {}));
      const clip = norms.sort((a, b) => a - b)[Math.floor(norms.length / 2)];
      const eps = Number(flags.epsilon);
      const dpJob = await runJob(base, spec(method, `${id}-dp`, clients, { dp: { level: 'client', clip_norm: clip, target_epsilon: eps, delta: DELTA } }));
      const d = await scoreVersion(base, model, clients, `${id}-dp`, dpJob.versions.at(-1)!);
      const priv = (dpJob as JobJson & { privacy: { epsilon: number; noise_multiplier: number } }).privacy;
      results.push({ name: `${method} + DP`, perEra: d.perClient, mean: d.overall, ...costs(dpJob, clients.length), note: `ε = ${priv.epsilon.toFixed(3)} (δ 1e-5), σ = ${priv.noise_multiplier.toFixed(3)}, C = ${clip.toPrecision(3)}` });
    }

    const central0 = results[1].mean;
    out(`# bench:federation — ${new Date().toISOString().slice(0, 10)}, ${os.cpus()[0].model}, ${os.cpus().length} cores, backend ${backend.name}`);
    out(`# model: the demo model (hidden ${model.config.hiddenSize}, ${model.config.numLayers} layers, vocabulary ${model.config.vocabSize}); LoRA r ${R}, alpha ${ALPHA}, ${TARGETS.join(' ')}`);
    out(`# ${rounds} rounds × ${steps} local steps of ${BATCH} windows of ${SEQ_LEN} tokens, lr ${lr}; 4 clients: ${clients.map((x) => `${x.id} (${x.from}–${x.to}, ${x.trainAddresses} train / ${x.heldOutAddresses} held-out addresses)`).join(', ')}`);
    out('');
    out(`| configuration | ${clients.map((x) => x.id).join(' | ')} | mean held-out loss | ÷ central | upload / client / round | training s / round | aggregation s | publishing s | note |`);
    out(`|---|${clients.map(() => '---|').join('')}---|---|---|---|---|---|---|`);
    for (const r of results) {
      const t = r.timings;
      out(`| ${r.name} | ${r.perEra.map((x) => x.toFixed(4)).join(' | ')} | ${r.mean.toFixed(4)} | ${(r.mean / central0).toFixed(3)} | ${r.uploadPerClientRound !== undefined ? `${(r.uploadPerClientRound / 1024).toFixed(1)} KiB` : '-'} | ${t ? t.training.toFixed(1) : '-'} | ${t ? t.aggregation.toFixed(2) : '-'} | ${t ? t.publishing.toFixed(2) : '-'} | ${r.note} |`);
    }
    out('');
    out(loadReport);
  } finally {
    await Promise.all(children.map((x) => x.stop()));
    await deletePrefix(REDIS_URL, PREFIX).catch(() => 0);
    model.dispose();
  }
}

/** Failures, and throughput / TTFT inside the aggregate-and-publish windows vs the rest. */
function describeLoad(samples: { t0: number; ttft: number; end: number; ok: boolean; status: number }[], history: RoundJson[]): string {
  const windows = history
    .filter((r) => r.state === 'published')
    .map((r) => {
      const end = (r as RoundJson & { finished_at: number }).finished_at + 1000 * (r.timings!.aggregation_s + r.timings!.publishing_s);
      return [(r as RoundJson & { finished_at: number }).finished_at, end + 1000] as const;
    });
  const inside = (s: { end: number }) => windows.some(([a, b]) => s.end >= a && s.end <= b);
  const part = (xs: typeof samples, span: number) => {
    const ttft = xs.map((s) => s.ttft).filter(Number.isFinite).sort((a, b) => a - b);
    return `${xs.length} requests, ${(xs.length / (span / 1000)).toFixed(2)} req/s, TTFT p50 ${ttft[Math.floor(ttft.length / 2)] ?? NaN} ms, p99 ${ttft[Math.min(ttft.length - 1, Math.ceil(ttft.length * 0.99) - 1)] ?? NaN} ms`;
  };
  const total = samples.length ? samples[samples.length - 1].end - samples[0].t0 : 1;
  const inSpan = windows.reduce((s, [a, b]) => s + (b - a), 0);
  const failed = samples.filter((s) => !s.ok);
  return [
    `# serving during the first configuration's rounds: ${samples.length} streamed completions of 8 tokens (to the base model until v1, then to the adapter being published), ${failed.length} failed${failed.length ? ` (statuses ${[...new Set(failed.map((f) => f.status))].join(', ')})` : ''}`,
    `#   while a round aggregated and published (${windows.length} windows, ${(inSpan / 1000).toFixed(1)} s): ${part(samples.filter(inside), inSpan)}`,
    `#   the rest of the time (${((total - inSpan) / 1000).toFixed(1)} s): ${part(samples.filter((s) => !inside(s)), total - inSpan)}`,
  ].join('\n');
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    progress(`bench:federation failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    process.exit(1);
  },
);
