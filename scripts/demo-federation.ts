/**
 * demo:federation — federated LoRA training end to end on one machine, with real processes:
 * a gateway (`serve --redis`) and four `fed-client` processes, each holding the State of the
 * Union addresses of one era (see demo-federation-data.ts). It submits one job over HTTP and,
 * before round 1 and after every published round, downloads the new adapter version from the
 * gateway and scores it on each client's held-out addresses (token-weighted mean
 * cross-entropy, `meanLoss`), then asks the final version for one completion.
 *
 *   npm run demo:federation [-- --method fedavg|ffa|flora|fedsb] [--rounds N] [--steps N] [--lr X]
 *                            [--fedsb-init random|gradient] [--backend auto|tensorflow|wasm|cpu] [--verbose]
 *
 * Needs Redis (LORA_GATEWAY_REDIS_URL, default redis://127.0.0.1:6379). stdout is the results
 * table; stderr is progress. Every key it makes lives under a fresh prefix `demo-<random>` and
 * is deleted at the end; the model and data stay under data/federation-demo/.
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { writeDemoModel } from '../src/cli/demo-model-command.js';
import { FED_METHODS, type FedMethod } from '../src/federation/lora-factors.js';
import { resolveBackend, type BackendChoice } from '../src/model/backend/backend.js';
import { loadLlamaModel } from '../src/model/forward/model-loader.js';
import { TextTokenizer } from '../src/model/tokenizer/tokenizer.js';
import { prepareClients, type DemoClient } from './demo-federation-data.js';
import { api, checkRedis, Child, deletePrefix, HarnessError as DemoError, heldOutLosses, redact, scoreVersion, type JobJson, type RoundJson } from './federation-harness.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const DEMO_DIR = resolve(ROOT, 'data/federation-demo');
const MODEL_DIR = join(DEMO_DIR, 'model');
const SEQ_LEN = 32;
const BATCH_SIZE = 8;
const TARGET_MODULES = ['q_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj'];
/** Held-out windows scored per client and version (a fixed seeded sample of the held-out addresses' windows). */
const HELD_OUT_WINDOWS = 128;
const PROMPT = 'Fellow-Citizens of the Senate and House of Representatives:';


const { values: flags } = parseArgs({
  options: {
    method: { type: 'string', default: 'ffa' },
    rounds: { type: 'string', default: '5' },
    steps: { type: 'string', default: '30' },
    lr: { type: 'string', default: '0.02' },
    // gradient init's round 0 goes over every training window of each client: ~15 min here on wasm
    'fedsb-init': { type: 'string', default: 'gradient' },
    backend: { type: 'string', default: process.env.LORA_GATEWAY_BACKEND ?? 'auto' },
    verbose: { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
  },
});

const USAGE = `npm run demo:federation [-- --method fedavg|ffa|flora|fedsb] [--rounds N] [--steps N] [--lr X]
                         [--fedsb-init random|gradient] [--backend auto|tensorflow|wasm|cpu] [--verbose]
  --fedsb-init gradient (default) adds Fed-SB's round 0: full-weight gradients over steps·batch_size windows per client
  Redis: LORA_GATEWAY_REDIS_URL (default redis://127.0.0.1:6379)\n`;

function positiveInt(v: string, name: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new DemoError(`--${name} must be a positive integer, got '${v}'`);
  return n;
}

const progress = (line: string): void => void process.stderr.write(`${line}\n`);
const out = (line = ''): void => void process.stdout.write(`${line}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** A path as the user would type it from where they ran the demo. */
const shown = (path: string): string => relative(process.cwd(), path) || '.';

const REDIS_URL = process.env.LORA_GATEWAY_REDIS_URL ?? 'redis://127.0.0.1:6379';
/** Every key and queue of this run lives under it; deleted at the end. */
const PREFIX = `demo-${randomBytes(4).toString('hex')}`;

const children: Child[] = [];
let shuttingDown = false;

/** Progress lines worth showing from the children (all of them with --verbose). */
function relay(child: Child, line: string): void {
  if (flags.verbose || /federation job|uploaded|failed|error|refus/i.test(line)) progress(`[${child.name}] ${line}`);
}

// ---- the results table ----------------------------------------------------------------------

function table(clients: DemoClient[]) {
  const cols = ['round', 'version', 'clients', 'examples', 'train loss', 'held-out', ...clients.map((c) => c.id), 'upload KiB', 'note'];
  const widths = cols.map((c) => Math.max(c.length, 8));
  const row = (cells: string[]) => out(cells.map((c, i) => (i < cols.length - 1 ? c.padEnd(widths[i]) : c)).join('  ').trimEnd());
  return { header: () => row(cols), row };
}

function note(r: RoundJson): string {
  const parts = [`rank ${r.rank}`];
  if (r.aggregation_error !== undefined) parts.push(`aggregation_error ${r.aggregation_error.toFixed(4)}`);
  if (r.kept_fraction !== undefined) parts.push(`kept_fraction ${r.kept_fraction.toFixed(6)}`);
  if (r.timings) parts.push(`${r.timings.training_s.toFixed(1)} s training`);
  return parts.join(', ');
}

// ---- the demo -------------------------------------------------------------------------------

function jobSpec(method: FedMethod, rounds: number, steps: number, lr: number, fedsbInit: string, clients: DemoClient[]): Record<string, unknown> {
  const ids = clients.map((c) => c.id);
  // FLoRA lets every client pick its rank; the stacked adapter grows by their sum each round
  const r = method === 'flora' ? Object.fromEntries(ids.map((id, i) => [id, [4, 8, 8, 16][i % 4]])) : 8;
  return {
    target_adapter_id: `sotu-${method}`,
    method,
    rounds,
    clients: ids,
    round_timeout_ms: 600_000,
    seed: 1,
    lora: { r, alpha: 16, target_modules: TARGET_MODULES },
    local: { steps, batch_size: BATCH_SIZE, lr, seq_len: SEQ_LEN },
    // random: orthonormal B, A from the seed, R = 0. gradient: a round 0 in which the clients upload
    // full-weight gradients and the coordinator sets B, R, A from them (LoRA-SB)
    ...(method === 'fedsb' ? { fedsb: { init: fedsbInit } } : {}),
  };
}

async function main(): Promise<void> {
  if (flags.help) {
    process.stdout.write(USAGE);
    return;
  }
  const method = flags.method as FedMethod;
  if (!FED_METHODS.includes(method)) throw new DemoError(`--method must be one of ${FED_METHODS.join(', ')}, got '${flags.method}'`);
  const rounds = positiveInt(flags.rounds, 'rounds');
  const steps = positiveInt(flags.steps, 'steps');
  const lr = Number(flags.lr);
  if (!(lr > 0)) throw new DemoError(`--lr must be a positive number, got '${flags.lr}'`);
  const fedsbInit = flags['fedsb-init'];
  if (fedsbInit !== 'gradient' && fedsbInit !== 'random') throw new DemoError(`--fedsb-init must be gradient or random, got '${fedsbInit}'`);
  const backendChoice = flags.backend as BackendChoice;
  const started = Date.now();

  await checkRedis(REDIS_URL);
  if (!existsSync(join(MODEL_DIR, 'config.json'))) {
    progress(`demo: creating the demo model (random weights) in ${shown(MODEL_DIR)}`);
    await writeDemoModel(MODEL_DIR, { adapters: 0 });
  }
  const backend = await resolveBackend(backendChoice);
  const [model, tokenizer] = await Promise.all([loadLlamaModel(MODEL_DIR), TextTokenizer.load(MODEL_DIR)]);
  const clients = await prepareClients(join(DEMO_DIR, 'clients'), tokenizer, { seqLen: SEQ_LEN, maxHeldOutWindows: HELD_OUT_WINDOWS });
  for (const c of clients) {
    progress(`demo: ${c.id} (${c.from}–${c.to}): trains on ${c.trainAddresses} addresses (${shown(c.trainFile)}); holds out ${c.heldOutAddresses} (${c.heldOutYears.join(', ')}), ${c.heldOutWindowsTotal} windows, scores ${c.heldOut.length}`);
  }

  const storeDir = join(DEMO_DIR, 'gateway');
  await rm(storeDir, { recursive: true, force: true }); // a fresh adapter store each run: versions start at 1
  progress(`demo: starting the gateway and ${clients.length} fed-client processes (Redis ${redact(REDIS_URL)}, prefix ${PREFIX}, --backend ${backendChoice})`);
  const common = ['--redis', REDIS_URL, '--federation-prefix', PREFIX, '--model', MODEL_DIR, '--backend', backendChoice];
  const gateway = new Child('gateway', ['serve', '--host', '127.0.0.1', '--port', '0', '--data', storeDir, ...common], relay);
  children.push(gateway);
  for (const c of clients) children.push(new Child(c.id, ['fed-client', '--client-id', c.id, '--data', c.trainFile, ...common], relay));
  const [served] = await Promise.all([gateway.waitFor(/serving .* at (http:\/\/\S+) \(/, 180_000), ...children.slice(1).map((c) => c.waitFor(/federation client '.*' ready/, 180_000))]);
  const base = served[1];
  const live = await api<{ data: { id: string; compatible: boolean }[] }>(base, 'GET', '/v1/federation/clients');
  progress(`demo: gateway at ${base}; live clients: ${live.data.map((c) => `${c.id}${c.compatible ? '' : ' (incompatible)'}`).join(', ')}`);

  const spec = jobSpec(method, rounds, steps, lr, fedsbInit, clients);
  const adapterId = spec.target_adapter_id as string;
  const { header, row } = table(clients);
  out(`# federation demo: ${method}, ${rounds} rounds, ${clients.length} clients (State of the Union by era), backend ${backend.name}`);
  out(`# lora ${JSON.stringify(spec.lora)}, local ${JSON.stringify(spec.local)}`);
  out(`# held-out: ~10% of each era's addresses, ${HELD_OUT_WINDOWS} windows of ${SEQ_LEN} predicted tokens per client; loss = mean cross-entropy (nats/token)`);
  out(`# examples = Σ training windows of the clients (their aggregation weights); upload = all clients' update bytes in the round`);
  out();
  header();
  const before = await heldOutLosses(model, clients, null);
  row(['base', '-', '-', '-', '-', before.overall.toFixed(4), ...before.perClient.map((l) => l.toFixed(4)), '-', 'before round 1 (no adapter)']);

  const job = await api<JobJson>(base, 'POST', '/v1/federation/jobs', spec);
  progress(`demo: submitted job ${job.id} (${method} → adapter '${adapterId}')`);
  const scored = new Set<number>();
  const reported = new Set<string>();
  let final: JobJson | undefined;
  while (!final) {
    const dead = children.find((c) => !c.running);
    if (dead) throw new DemoError(`${dead.name} exited (${dead.proc.exitCode ?? dead.proc.signalCode}) during the job:\n${dead.tail()}`);
    const j = await api<JobJson>(base, 'GET', `/v1/federation/jobs/${job.id}`);
    for (const h of j.history) {
      const key = `${h.round}.${h.attempt}.${h.state}`;
      if (h.state === 'initialized' && !reported.has(key)) {
        // Fed-SB's round 0: gradients in, B, R, A out; nothing is published, so there is no version to score
        reported.add(key);
        row(['0 (init)', '-', String(h.participants.length), String(h.examples), h.mean_train_loss!.toFixed(4), '-', ...clients.map(() => '-'), (h.bytes_uploaded! / 1024).toFixed(1), 'Fed-SB init: full-weight gradients up, B, R, A set (train loss = base loss)']);
      } else if (h.state !== 'published' && !reported.has(key)) {
        reported.add(key);
        progress(`demo: round ${h.round} ${h.state}: ${h.dropped.map((d) => `${d.client}: ${d.reason}`).join('; ') || 'no reason given'}`);
      }
      if (h.state !== 'published' || h.kind !== 'train' || scored.has(h.round)) continue;
      scored.add(h.round);
      const v = h.published_version!;
      const after = await scoreVersion(base, model, clients, adapterId, v);
      row([String(h.round), `v${v}`, String(h.participants.length), String(h.examples), h.mean_train_loss!.toFixed(4), after.overall.toFixed(4), ...after.perClient.map((l) => l.toFixed(4)), (h.bytes_uploaded! / 1024).toFixed(1), note(h)]);
    }
    if (j.state === 'failed' || j.state === 'cancelled') throw new DemoError(`job ${j.id} ${j.state}: ${j.error ? `${j.error.code}: ${j.error.message}` : 'no error recorded'}`);
    if (j.state === 'completed' && j.history.filter((h) => h.state === 'published' && h.kind === 'train').every((h) => scored.has(h.round))) final = j;
    else await sleep(500);
  }

  const completion = await api<{ choices: { text: string }[] }>(base, 'POST', '/v1/completions', { model: adapterId, prompt: PROMPT, max_tokens: 24, temperature: 0 });
  out();
  out(`# completion from '${adapterId}' v${final.versions[final.versions.length - 1]} (random base model: gibberish is expected)`);
  out(`${JSON.stringify(PROMPT)} → ${JSON.stringify(completion.choices[0].text)}`);
  out(`# ${final.versions.length} rounds published in ${((Date.now() - started) / 1000).toFixed(0)} s (startup included)`);
  model.dispose();
}

/** Stops every child, then deletes this run's Redis keys. Runs once. */
let cleaning: Promise<void> | undefined;
function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    shuttingDown = true;
    await Promise.all(children.map((c) => c.stop()));
    if (children.length > 0) {
      const n = await deletePrefix(REDIS_URL, PREFIX).catch(() => 0);
      progress(`demo: stopped ${children.length} processes, deleted ${n} Redis keys under ${PREFIX}:*`);
    }
  })();
  return cleaning;
}

/** First Ctrl-C (or SIGTERM): stop the children and delete the keys; a second one kills them outright. */
let signals = 0;
function onSignal(signal: NodeJS.Signals, code: number): void {
  process.on(signal, () => {
    if (++signals > 1) {
      progress('demo: interrupted again, killing the processes');
      process.exit(code); // the 'exit' handler SIGKILLs what is left
    }
    progress(`demo: ${signal}, stopping the processes`);
    void cleanup().finally(() => process.exit(code));
  });
}
onSignal('SIGINT', 130);
onSignal('SIGTERM', 143);
// last resort (an uncaught error): no child outlives the demo
process.on('exit', () => children.forEach((c) => c.running && c.proc.kill('SIGKILL')));

main()
  .then(() => cleanup())
  .then(() => process.exit(0))
  .catch(async (err: unknown) => {
    if (shuttingDown) return; // interrupted: the signal handler exits
    progress(`demo failed: ${err instanceof DemoError ? err.message : err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    await cleanup();
    process.exit(1);
  });
