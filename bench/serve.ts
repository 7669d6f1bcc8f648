/**
 * bench:serve — end-to-end serving throughput and latency over real HTTP, following S-LoRA's
 * benchmarks/ (trace.py, run_exp.py): requests arrive as a Poisson process (gamma gaps with
 * cv = 1), request i uses adapter floor(power(α)·N) (numpy's power distribution, x = u^(1/α):
 * α = 1 is uniform, α < 1 skews towards the first adapters), and input and output lengths are
 * uniform. The same seeded trace goes to (a) this gateway, batching up to 32 adapters per
 * step, and (b) the baseline of serving one adapter at a time and switching between batches as
 * HF PEFT does: the same Gateway with limits.maxAdaptersPerBatch = 1.
 *
 *   npm run bench:serve [-- --requests 48 --adapters 1,10,100,1000 --alphas 1,0.3 --rate 6]
 *
 * The model is SmolLM2-135M-shaped with random weights, built once in memory and shared by
 * every gateway. Each cell (adapter count × α × system) starts a fresh gateway with every
 * adapter on disk, as S-LoRA restarts its server; the client runs in the same process, so
 * latency is measured from each request's scheduled arrival time, which is when an external
 * client would have sent it (the server reads sockets only between scheduler steps anyway).
 */
import * as tf from '@tensorflow/tfjs-core';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { buildApp } from '../src/api/app.js';
import { GatewayMetrics } from '../src/api/metrics.js';
import { resolveBackend } from '../src/model/backend/backend.js';
import { peftConfigJson, writePeftAdapter } from '../src/model/synthetic/hf-folder-writer.js';
import { LlamaModel } from '../src/model/forward/llama-model.js';
import { llamaWeightsFromArrays, projectionModulePath, type ProjectionName } from '../src/model/architecture/llama-weights.js';
import { parseModelConfig } from '../src/model/architecture/model-config.js';
import { randomLlamaWeights, randomLoraWeights } from '../src/model/synthetic/random-weights.js';
import { SMOLLM2_135M_SHAPE } from '../src/model/architecture/model-shapes.js';
import { SeededRandom } from '../src/model/synthetic/seeded-random.js';
import { TextTokenizer } from '../src/model/tokenizer/tokenizer.js';
import type { AdapterFiles } from '../src/pager/adapter-store.js';
import { pageBytes } from '../src/pager/page-sizes.js';
import { Gateway } from '../src/serving/gateway.js';
import { f2, printRow, printStepRow, quantile, summarize, verdict, type CellResult, type Outcome, type StepTimes, type Summary, type SystemName, type TraceRequest } from './serve-report.js';

const MODEL_ID = 'smollm2-135m-random';
const MiB = 1024 * 1024;

/** Adapter i has rank ADAPTER_RANKS[i mod 3] on ADAPTER_TARGETS of all 30 layers, stored as bf16. */
const ADAPTER_RANKS = [8, 16, 32];
const ADAPTER_TARGETS: ProjectionName[] = ['q_proj', 'v_proj'];
/** Distinct weight files per rank; adapter ids beyond that reuse the bytes (still separate adapters to the store and pager). */
const VARIANTS_PER_RANK = 2;

const { values: flags } = parseArgs({
  options: {
    requests: { type: 'string', default: '48' },
    adapters: { type: 'string', default: '1,10,100,1000' },
    alphas: { type: 'string', default: '1,0.3' },
    rate: { type: 'string', default: '6' },
    cv: { type: 'string', default: '1' },
    input: { type: 'string', default: '8-32' },
    output: { type: 'string', default: '8-32' },
    seed: { type: 'string', default: '42' },
    'max-adapters-per-batch': { type: 'string', default: '32' },
    'max-running-seqs': { type: 'string', default: '32' },
    'device-mib': { type: 'string', default: '512' },
    'host-mib': { type: 'string', default: '1024' },
    'slo-factor': { type: 'string', default: '5' },
    'slo-ttft': { type: 'string', default: '6' },
    backend: { type: 'string', default: 'auto' },
  },
});

function range(s: string): [number, number] {
  const [lo, hi] = s.split('-').map(Number);
  return [lo, hi ?? lo];
}

const opts = {
  requests: Number(flags.requests),
  adapterCounts: flags.adapters.split(',').map(Number),
  alphas: flags.alphas.split(',').map(Number),
  ratePerS: Number(flags.rate),
  cv: Number(flags.cv),
  input: range(flags.input),
  output: range(flags.output),
  seed: Number(flags.seed),
  maxAdaptersPerBatch: Number(flags['max-adapters-per-batch']),
  maxRunningSeqs: Number(flags['max-running-seqs']),
  deviceMemoryBytes: Number(flags['device-mib']) * MiB,
  hostMemoryBytes: Number(flags['host-mib']) * MiB,
  sloFactor: Number(flags['slo-factor']),
  sloTtftS: Number(flags['slo-ttft']),
};

// ---------------------------------------------------------------------------------------------
// Workload: S-LoRA's generate_requests, on SeededRandom


/** Gamma(shape k, scale θ) by Marsaglia–Tsang; k < 1 via the k+1 boost. */
function gamma(rng: SeededRandom, k: number, theta: number): number {
  if (k < 1) return gamma(rng, k + 1, theta) * Math.pow(1 - rng.next(), 1 / k);
  const d = k - 1 / 3;
  const c = 1 / Math.sqrt(9 * d);
  for (;;) {
    const x = rng.normal();
    const v = (1 + c * x) ** 3;
    if (v <= 0) continue;
    const u = 1 - rng.next();
    if (Math.log(u) < 0.5 * x * x + d - d * v + d * Math.log(v)) return d * v * theta;
  }
}

/**
 * Draws in S-LoRA's order (adapters, input lengths, output lengths, gaps) from one seed: the
 * number of draws does not depend on α or N, so lengths and arrival times are the same in
 * every cell and only the adapter choice changes. Lengths are uniform in [lo, hi], inclusive.
 */
function generateTrace(numAdapters: number, alpha: number): TraceRequest[] {
  const n = opts.requests;
  const rng = new SeededRandom(opts.seed);
  const adapters = Array.from({ length: n }, () => Math.min(numAdapters - 1, Math.floor(Math.pow(rng.next(), 1 / alpha) * numAdapters)));
  const uniform = ([lo, hi]: [number, number]) => lo + rng.int(hi - lo + 1);
  const inputs = Array.from({ length: n }, () => uniform(opts.input));
  const outputs = Array.from({ length: n }, () => uniform(opts.output));
  const shape = 1 / (opts.cv * opts.cv);
  const scale = (opts.cv * opts.cv) / opts.ratePerS;
  let t = 0;
  const prompts = new SeededRandom(opts.seed + 1);
  return adapters.map((adapter, i) => {
    t += gamma(rng, shape, scale);
    const promptIds = Array.from({ length: inputs[i] }, () => prompts.int(SMOLLM2_135M_SHAPE.vocab_size));
    return { arrivalS: t, adapter, promptIds, outputLen: outputs[i] };
  });
}

const adapterId = (i: number) => `bench-${i}`;

// ---------------------------------------------------------------------------------------------
// HTTP client: one streamed /v1/completions request

async function sendCompletion(baseUrl: string, req: TraceRequest, scheduledAt: number): Promise<Outcome> {
  const fail = (error: string): Outcome => ({ ok: false, e2eS: (performance.now() - scheduledAt) / 1000, completionTokens: 0, error });
  let res: Response;
  try {
    res = await fetch(`${baseUrl}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({
        model: adapterId(req.adapter),
        prompt: req.promptIds,
        max_tokens: req.outputLen,
        temperature: 0,
        ignore_eos: true,
        stream: true,
        stream_options: { include_usage: true },
      }),
    });
  } catch (err) {
    return fail(String(err));
  }
  if (!res.ok || !res.body) return fail(`HTTP ${res.status}: ${(await res.text()).slice(0, 200)}`);
  const reader = res.body.getReader();
  const utf8 = new TextDecoder();
  let buffered = '';
  let ttftS: number | undefined;
  let completionTokens = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffered += utf8.decode(value, { stream: true });
    for (let end = buffered.indexOf('\n\n'); end >= 0; end = buffered.indexOf('\n\n')) {
      const event = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      if (!event.startsWith('data: ') || event === 'data: [DONE]') continue;
      const chunk = JSON.parse(event.slice(6)) as { error?: { message?: string }; choices?: { text?: string }[]; usage?: { completion_tokens: number } | null };
      if (chunk.error) return fail(chunk.error.message ?? 'error event');
      if (ttftS === undefined && chunk.choices?.some((c) => (c.text ?? '') !== '')) ttftS = (performance.now() - scheduledAt) / 1000;
      if (chunk.usage) completionTokens = chunk.usage.completion_tokens;
    }
  }
  const e2eS = (performance.now() - scheduledAt) / 1000;
  if (completionTokens !== req.outputLen) return { ...fail(`${completionTokens} tokens generated, ${req.outputLen} asked`), e2eS };
  return { ok: true, e2eS, ttftS, completionTokens };
}

// ---------------------------------------------------------------------------------------------
// Serving one cell

interface Served {
  baseUrl: string;
  gateway: Gateway;
  close(): Promise<void>;
}

interface Shared {
  model: LlamaModel;
  tokenizer: TextTokenizer;
  storeDir: string;
}

/** Gateway.close() disposes its model; the cells share one, so each gateway gets a view whose dispose() does nothing. */
class SharedModel extends LlamaModel {
  override dispose(): void {}
}

async function serve(shared: Shared, system: SystemName): Promise<Served> {
  const gateway = await Gateway.create({
    modelId: MODEL_ID,
    model: new SharedModel(shared.model.config, shared.model.weights),
    tokenizer: shared.tokenizer,
    storeDir: shared.storeDir,
    deviceMemoryBytes: opts.deviceMemoryBytes,
    hostMemoryBytes: opts.hostMemoryBytes,
    maxLoraRank: 64,
    limits: {
      maxRunningSeqs: opts.maxRunningSeqs,
      maxBatchTokens: 2048,
      maxAdaptersPerBatch: system === 'gateway' ? opts.maxAdaptersPerBatch : 1,
      maxWaiting: 100_000,
    },
  });
  const app = await buildApp({ engine: gateway, metrics: new GatewayMetrics(gateway) });
  const baseUrl = await app.listen({ host: '127.0.0.1', port: 0 });
  return {
    baseUrl,
    gateway,
    async close() {
      await app.close();
      await gateway.close();
    },
  };
}

function wasmHeapBytes(): number {
  return (tf.backend() as unknown as { wasm?: { HEAPU8?: Uint8Array } }).wasm?.HEAPU8?.length ?? 0;
}

async function runCell(shared: Shared, adapters: number, alpha: number, system: SystemName, label = ''): Promise<CellResult> {
  const trace = generateTrace(adapters, alpha);
  const served = await serve(shared, system);
  let steps = 0;
  let rowsDecoded = 0;
  let peakPages = 0;
  const times: StepTimes = { decodeSteps: 0, decodeMs: 0, decodeRows: 0, prefillSteps: 0, prefillMs: 0, adapterLoadS: 0 };
  served.gateway.onAdapterLoad((s) => (times.adapterLoadS += s));
  let lastStepAt = performance.now();
  let busy = false;
  served.gateway.onStep((info) => {
    const now = performance.now();
    // sequences that finished in this step were decoded in it too
    const rows = info.running + info.finished;
    if (rows > 0) {
      steps++;
      rowsDecoded += rows;
    }
    if (busy && info.prefilled > 0) {
      times.prefillSteps++;
      times.prefillMs += now - lastStepAt;
    } else if (busy && rows > 0) {
      times.decodeSteps++;
      times.decodeMs += now - lastStepAt;
      times.decodeRows += rows;
    }
    busy = info.running > 0 || info.waiting > 0;
    lastStepAt = now;
    const p = served.gateway.stats().pages;
    peakPages = Math.max(peakPages, p.kv + p.adapter);
  });
  let rssPeak = process.memoryUsage().rss;
  const sampler = setInterval(() => (rssPeak = Math.max(rssPeak, process.memoryUsage().rss)), 50);
  const start = performance.now();
  const pending: Promise<Outcome>[] = [];
  for (const req of trace) {
    const at = start + req.arrivalS * 1000;
    const wait = at - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    pending.push(sendCompletion(served.baseUrl, req, at));
  }
  const outcomes = await Promise.all(pending);
  const durationS = (performance.now() - start) / 1000;
  clearInterval(sampler);
  const pager = served.gateway.stats().pager;
  await served.close();
  return {
    adapters,
    alpha,
    system,
    label,
    outcomes,
    trace,
    durationS,
    meanBatch: steps > 0 ? rowsDecoded / steps : 0,
    steps: times,
    devicePeakMiB: (peakPages * pageBytes(shared.model.config)) / MiB,
    rssPeakMiB: Math.max(rssPeak, process.memoryUsage().rss) / MiB,
    wasmHeapMiB: wasmHeapBytes() / MiB,
    deviceLoads: pager.deviceLoads,
    diskReads: pager.hostMisses,
  };
}

// ---------------------------------------------------------------------------------------------
// Setup: model, tokenizer, adapter store

/**
 * A tokenizer whose token i is the text "<i>": requests send token ids, but the streaming
 * route emits a chunk only when decoded text grows, so without a tokenizer nothing would
 * stream before the end and time-to-first-token could not be seen.
 */
function syntheticTokenizer(): TextTokenizer {
  const vocab: Record<string, number> = {};
  for (let i = 0; i < SMOLLM2_135M_SHAPE.vocab_size; i++) vocab[`<${i}>`] = i;
  return TextTokenizer.fromJson({ version: '1.0', model: { type: 'BPE', vocab, merges: [], unk_token: null } });
}

/** Writes RANKS × VARIANTS real PEFT folders and registers `count` ids over them with putAdapter. */
async function buildStore(model: LlamaModel, tokenizer: TextTokenizer, root: string, count: number): Promise<{ storeDir: string; bytes: number }> {
  const files: AdapterFiles[] = [];
  for (let v = 0; v < VARIANTS_PER_RANK; v++) {
    for (const r of ADAPTER_RANKS) {
      const dir = join(root, 'sources', `r${r}-v${v}`);
      const mods = [];
      for (let l = 0; l < model.config.numLayers; l++) for (const proj of ADAPTER_TARGETS) mods.push({ modulePath: projectionModulePath(l, proj), proj, rank: r });
      const config = peftConfigJson({ r, loraAlpha: 2 * r, targetModules: ADAPTER_TARGETS, baseModelName: MODEL_ID });
      await writePeftAdapter(dir, config, randomLoraWeights(SMOLLM2_135M_SHAPE, mods, 100 * r + v), 'BF16');
      files.push({ config: await readFile(join(dir, 'adapter_config.json')), weights: await readFile(join(dir, 'adapter_model.safetensors')) });
    }
  }
  const storeDir = join(root, 'store');
  const setup = await Gateway.create({
    modelId: MODEL_ID,
    model: new SharedModel(model.config, model.weights),
    tokenizer,
    storeDir,
    deviceMemoryBytes: opts.deviceMemoryBytes,
    hostMemoryBytes: opts.hostMemoryBytes,
    maxLoraRank: 64,
    limits: { maxRunningSeqs: 1, maxBatchTokens: 1, maxAdaptersPerBatch: 1, maxWaiting: 1 },
  });
  let bytes = 0;
  // adapter i: rank ADAPTER_RANKS[i mod 3], so every count ≥ 3 has the same rank mix
  for (let i = 0; i < count; i++) {
    const f = files[(i % ADAPTER_RANKS.length) + ADAPTER_RANKS.length * (Math.floor(i / ADAPTER_RANKS.length) % VARIANTS_PER_RANK)];
    bytes += (await setup.putAdapter(adapterId(i), f)).sizeBytes;
  }
  await setup.close();
  return { storeDir, bytes };
}

/** Single-request latency per output token: the median of 3 lone requests (after one warm-up) with mid-range lengths. */
async function perTokenLatencyS(shared: Shared): Promise<number> {
  const served = await serve(shared, 'gateway');
  const rng = new SeededRandom(opts.seed + 2);
  const promptLen = Math.round((opts.input[0] + opts.input[1]) / 2);
  const outputLen = Math.round((opts.output[0] + opts.output[1]) / 2);
  const times: number[] = [];
  for (let k = 0; k < 4; k++) {
    const req = { arrivalS: 0, adapter: 0, outputLen, promptIds: Array.from({ length: promptLen }, () => rng.int(SMOLLM2_135M_SHAPE.vocab_size)) };
    const o = await sendCompletion(served.baseUrl, req, performance.now());
    if (!o.ok) throw new Error(`latency probe failed: ${o.error}`);
    if (k > 0) times.push(o.e2eS / outputLen);
  }
  await served.close();
  return quantile(times, 0.5);
}

async function main(): Promise<void> {
  const backend = await resolveBackend(flags.backend as 'auto', (l) => console.log(l));
  console.log(`machine: ${os.cpus()[0]?.model ?? 'unknown cpu'}, ${os.cpus().length} cores, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB; node ${process.version}; backend ${backend.name}; ${new Date().toISOString()}`);
  const t0 = performance.now();
  const config = parseModelConfig(SMOLLM2_135M_SHAPE);
  const model = new LlamaModel(config, llamaWeightsFromArrays(config, randomLlamaWeights(SMOLLM2_135M_SHAPE, 7)));
  const tokenizer = syntheticTokenizer();
  const root = await mkdtemp(join(os.tmpdir(), 'lora-gateway-bench-serve-'));
  try {
    const maxAdapters = Math.max(...opts.adapterCounts);
    const { storeDir, bytes } = await buildStore(model, tokenizer, root, maxAdapters);
    const shared: Shared = { model, tokenizer, storeDir };
    console.log(
      `setup ${((performance.now() - t0) / 1000).toFixed(0)} s: SmolLM2-135M-shaped random model; ${maxAdapters} adapters (ranks ${ADAPTER_RANKS.join('/')} cycled on ` +
        `${ADAPTER_TARGETS.join(',')}, bf16, ${ADAPTER_RANKS.length * VARIANTS_PER_RANK} distinct files) = ${(bytes / 2 ** 30).toFixed(2)} GiB in the store`,
    );
    const perTokenS = await perTokenLatencyS(shared);
    console.log(
      `workload: ${opts.requests} requests per cell, Poisson arrivals at ${opts.ratePerS} req/s (gamma gaps, cv ${opts.cv}), input ${opts.input.join('–')} and output ` +
        `${opts.output.join('–')} tokens (uniform), adapter = floor(power(α)·N), seed ${opts.seed}; device pool ${opts.deviceMemoryBytes / MiB} MiB, host cache ${opts.hostMemoryBytes / MiB} MiB`,
    );
    console.log(
      `SLO (S-LoRA's attainment): first token within ${opts.sloTtftS} s of arrival; e2e SLO: ends within ${opts.sloFactor} × its output tokens × ` +
        `the single-request latency of ${(perTokenS * 1000).toFixed(1)} ms per output token\n`,
    );
    console.log(
      `| adapters | α | distinct used | system | req/s | out tok/s | e2e p50 / p90 / p99 (s) | TTFT p50 / p90 (s) | SLO: TTFT < ${opts.sloTtftS} s | e2e SLO | mean batch | device loads / disk reads | pool peak MiB | RSS peak MiB | wall s |`,
    );
    console.log('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|');
    const cells: { cell: CellResult; summary: Summary }[] = [];
    const record = (cell: CellResult) => {
      const summary = summarize(cell, perTokenS, opts.sloFactor, opts.sloTtftS);
      cells.push({ cell, summary });
      printRow(cell, summary, opts.maxAdaptersPerBatch);
    };
    // gateway and baseline back to back in alternating order, so drift over the run does not favour one
    let flip = false;
    for (const n of opts.adapterCounts) {
      // with one adapter every α gives the same trace (floor(x·1) = 0): measured once
      for (const alpha of n === 1 ? opts.alphas.slice(0, 1) : opts.alphas) {
        const order: SystemName[] = flip ? ['baseline', 'gateway'] : ['gateway', 'baseline'];
        flip = !flip;
        for (const system of order) record(await runCell(shared, n, alpha, system));
      }
    }
    const fewest = Math.min(...opts.adapterCounts);
    if (opts.adapterCounts.length > 1) record(await runCell(shared, fewest, opts.alphas[0], 'gateway', ', rerun at the end'));

    console.log('\nwhere the time went (wall time between scheduler steps while busy; "prefill" steps prefill prompts (new or part-way) and join them to the decode batch):');
    console.log(
      '| adapters | α | system | decode-only steps | ms each | rows each | tok/s in them | prefill steps | ms each | share of busy time | prompt+output tok/s | adapter loads s | wasm heap MiB |',
    );
    console.log('|---|---|---|---|---|---|---|---|---|---|---|---|---|');
    for (const { cell } of cells) printStepRow(cell);

    const throughput = (n: number, alpha: number | undefined, system: SystemName) =>
      cells.filter(({ cell: c }) => c.adapters === n && (alpha === undefined || c.alpha === alpha) && c.system === system).map(({ summary }) => summary.reqPerS);
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    console.log('\nacceptance ratios (request throughput):');
    for (const alpha of opts.alphas) {
      const n = opts.adapterCounts.includes(100) ? 100 : Math.max(...opts.adapterCounts);
      if (n === 1 && alpha !== opts.alphas[0]) continue;
      console.log(`  α=${alpha}: gateway / baseline at ${n} adapters: ${verdict(mean(throughput(n, alpha, 'gateway')) / mean(throughput(n, alpha, 'baseline')), 3)}`);
    }
    for (const alpha of opts.alphas) {
      const most = Math.max(...opts.adapterCounts);
      if (most === 1 && alpha !== opts.alphas[0]) continue;
      // with one adapter every α gives the same trace, so every gateway cell at 1 adapter measures the same thing
      const ref = throughput(fewest, fewest === 1 ? undefined : alpha, 'gateway');
      console.log(
        `  α=${alpha}: gateway at ${most} adapters / at ${fewest} (mean of ${ref.map(f2).join(', ')} req/s): ${verdict(mean(throughput(most, alpha, 'gateway')) / mean(ref), 0.8)}`,
      );
    }
  } finally {
    model.dispose();
    await rm(root, { recursive: true, force: true });
  }
  console.log(`\ntotal ${((performance.now() - t0) / 1000).toFixed(0)} s; tensors alive after disposing the model: ${tf.memory().numTensors}`);
}

await main();
