import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { forwardSequences } from '../../src/model/forward/llama-model.js';
import { loadLlamaModel } from '../../src/model/forward/model-loader.js';
import { seededLoraA } from '../../src/federation/lora-init.js';
import { SafetensorsReader } from '../../src/model/formats/safetensors.js';
import { readPeftAdapter, uploadAdapter } from '../../src/model/lora/peft-adapter-reader.js';
import { eventually, startEraFederation, THREE_ERAS, type EraFederation } from '../helpers/federation-fixture.js';
import { useWasm } from '../helpers/tiny-models.js';

let fx: EraFederation;
let modelDir: string;
let server: EraFederation['server'];

before(async () => {
  await useWasm();
  fx = await startEraFederation('rounds', THREE_ERAS, 3000);
  ({ modelDir, server } = fx);
});

after(async () => fx?.stop());

const api = <T>(method: string, path: string, body?: unknown) => server.api<T>(method, path, body);

interface JobJson {
  id: string;
  state: string;
  versions: number[];
  history: { round: number; state: string; participants: string[]; published_version: number; aggregation_error?: number; rank: number; clients: { client: string; status: string }[] }[];
  error: unknown;
}

async function runJob(spec: Record<string, unknown>): Promise<JobJson> {
  const created = await api<JobJson>('POST', '/v1/federation/jobs', spec);
  assert.equal(created.status, 201, JSON.stringify(created.json));
  return eventually(async () => {
    const { json } = await api<JobJson>('GET', `/v1/federation/jobs/${created.json.id}`);
    if (json.state === 'failed' || json.state === 'cancelled') throw new Error(`job ${json.state}: ${JSON.stringify(json.error)}`);
    return json.state === 'completed' ? json : undefined;
  }, `job ${created.json.id} to complete`);
}

/** Echo logprobs of a fixed prompt under an adapter version: what the gateway serves. */
async function servedLogprobs(adapterId: string): Promise<number[]> {
  const { status, json } = await api<{ choices: { logprobs: { token_logprobs: (number | null)[] } }[] }>('POST', '/v1/completions', {
    model: adapterId,
    prompt: 'We the people of the United States',
    max_tokens: 1,
    echo: true,
    logprobs: 1,
    temperature: 0,
  });
  assert.equal(status, 200, JSON.stringify(json));
  return json.choices[0].logprobs.token_logprobs.slice(1, -1) as number[];
}

/** The same prompt scored from the version's downloaded files, outside the gateway. */
async function fileLogprobs(adapterId: string, version: number): Promise<number[]> {
  const [config, weights] = await Promise.all(
    ['adapter_config.json', 'adapter_model.safetensors'].map(async (f) => {
      const res = await fetch(`${server.url}/v1/adapters/${adapterId}/files/${f}?version=${version}`);
      assert.equal(res.status, 200);
      return new Uint8Array(await res.arrayBuffer());
    }),
  );
  const model = await loadLlamaModel(modelDir);
  const tok = await (await import('../../src/model/tokenizer/tokenizer.js')).TextTokenizer.load(modelDir);
  const host = await readPeftAdapter(`${adapterId}-v${version}`, model.config, 64, adapterId, { config, weights });
  const adapter = uploadAdapter(host, model.config);
  try {
    const ids = tok.encode('We the people of the United States', { addSpecialTokens: true });
    const logp = tf.tidy(() => tf.logSoftmax(forwardSequences(model, [{ tokens: ids, adapter, logits: 'all' }])));
    const rows = (await logp.array()) as number[][];
    logp.dispose();
    return ids.slice(1).map((t, i) => rows[i][t]);
  } finally {
    adapter.dispose();
    model.dispose();
  }
}

/** Every tensor of a safetensors file as float64, with its shape and the file's metadata. */
async function tensors(bytes: Uint8Array): Promise<{ t: Map<string, { shape: number[]; data: Float64Array }>; meta: Record<string, string> }> {
  const reader = await SafetensorsReader.fromBytes(bytes, 'download');
  const t = new Map<string, { shape: number[]; data: Float64Array }>();
  await reader.readTensors((e, data) => void t.set(e.name, { shape: e.shape, data: Float64Array.from(data) }));
  await reader.close();
  return { t, meta: reader.metadata };
}

async function download(path: string): Promise<Uint8Array> {
  const res = await fetch(`${server.url}${path}`);
  assert.equal(res.status, 200, path);
  return new Uint8Array(await res.arrayBuffer());
}

/** Dense ΔW = s·B·A of one module, float64 [out·in]. */
function dense(b: { shape: number[]; data: Float64Array }, a: { shape: number[]; data: Float64Array }, s: number, mid?: { data: Float64Array }): Float64Array {
  const [out, r] = b.shape;
  const inF = a.shape[1];
  let bb = b.data;
  if (mid) {
    bb = new Float64Array(out * r);
    for (let i = 0; i < out; i++) for (let k = 0; k < r; k++) for (let j = 0; j < r; j++) bb[i * r + j] += b.data[i * r + k] * mid.data[k * r + j];
  }
  const w = new Float64Array(out * inF);
  for (let i = 0; i < out; i++) for (let k = 0; k < r; k++) for (let j = 0; j < inF; j++) w[i * inF + j] += s * bb[i * r + k] * a.data[k * inF + j];
  return w;
}

/** ΔW per module of a served PEFT version, from its downloaded files. */
async function servedDelta(target: string, version: number): Promise<Map<string, Float64Array> & { tensors?: Map<string, { shape: number[]; data: Float64Array }> }> {
  const config = JSON.parse(new TextDecoder().decode(await download(`/v1/adapters/${target}/files/adapter_config.json?version=${version}`))) as { r: number; lora_alpha: number; use_rslora: boolean; rank_pattern: Record<string, number>; alpha_pattern: Record<string, number> };
  const { t } = await tensors(await download(`/v1/adapters/${target}/files/adapter_model.safetensors?version=${version}`));
  const out: Map<string, Float64Array> & { tensors?: typeof t } = new Map<string, Float64Array>();
  out.tensors = t;
  for (const [name, a] of t) {
    if (!name.endsWith('.lora_A.weight')) continue;
    const path = name.slice('base_model.model.'.length, -'.lora_A.weight'.length);
    const b = t.get(name.replace('lora_A', 'lora_B'))!;
    const key = Object.keys(config.rank_pattern).find((k) => path.endsWith(k));
    const r = a.shape[0];
    const alpha = (key !== undefined ? config.alpha_pattern[key] : undefined) ?? config.lora_alpha;
    assert.equal(r, key ? config.rank_pattern[key] : config.r);
    out.set(path, dense(b, a, config.use_rslora ? alpha / Math.sqrt(r) : alpha / r));
  }
  return out;
}

/**
 * Recomputes a published round from its public inputs (the clients' kept updates, the global
 * state the round started from, the previous version), independently of the aggregators, and
 * compares with the ΔW the gateway serves.
 */
async function recomputeRound(method: string, target: string, job: string, round: number, clientIds: string[]): Promise<void> {
  const ups = await Promise.all(clientIds.map(async (c) => tensors(await download(`/v1/federation/jobs/${job}/rounds/${round}/updates/${c}`))));
  const n = ups.map((u) => Number(u.meta.numExamples));
  const total = n.reduce((x, y) => x + y, 0);
  const p = n.map((x) => x / total);
  const { t: g } = await tensors(await download(`/v1/federation/jobs/${job}/rounds/${round}/global`));
  const served = await servedDelta(target, round);
  const spec = CASES.find((c) => c[1] === method && target.includes(c[0].split(' ')[0]))![2] as { lora: { r: number | Record<string, number>; alpha?: number } };
  const previous = method === 'flora' ? await servedDelta(target, round - 1) : undefined;
  for (const [path, got] of served) {
    const name = (f: string) => `base_model.model.${path}.lora_${f}.weight`;
    const want = new Float64Array(got.length);
    if (previous) want.set(previous.get(path)!);
    ups.forEach((u, k) => {
      let d: Float64Array;
      if (method === 'ffa') {
        // A is frozen at PEFT's init drawn from the job seed: served A must be exactly that
        const a = served.tensors!.get(name('A'))!;
        const [r, inF] = a.shape;
        const seeded = seededLoraA(7, { modulePath: path, rank: r, inFeatures: inF });
        assert.ok(a.data.every((x, i) => Math.abs(x - seeded[i]) < 1e-7), `${path}: ffa serves the seed-derived A`);
        d = dense(u.t.get(name('B'))!, a, (spec.lora.alpha ?? 16) / r);
      } else if (method === 'fedsb') d = dense(g.get(name('B'))!, g.get(name('A'))!, 1, u.t.get(name('R'))!);
      else {
        const rk = u.t.get(name('A'))!.shape[0];
        const alpha = spec.lora.alpha ?? 16;
        d = dense(u.t.get(name('B'))!, u.t.get(name('A'))!, alpha / rk);
      }
      for (let i = 0; i < want.length; i++) want[i] += p[k] * d[i];
    });
    let num = 0;
    let den = 0;
    for (let i = 0; i < want.length; i++) {
      num += (got[i] - want[i]) ** 2;
      den += want[i] ** 2;
    }
    const rel = Math.sqrt(num / den);
    if (method === 'fedavg') assert.ok(rel > 0, `${path}: fedavg's product of means differs from the mean of products`);
    else assert.ok(rel < 1e-5, `${method} ${path}: served ΔW differs from Σ p_k ΔW_k${previous ? ' + previous' : ''} by ${rel} relative`);
  }
}

const LOCAL = { steps: 3, batch_size: 2, seq_len: 16, lr: 5e-3 };
const CASES: [string, string, Record<string, unknown>][] = [
  ['fedavg', 'fedavg', { lora: { r: 4, alpha: 8, target_modules: ['q_proj', 'v_proj'] } }],
  ['ffa', 'ffa', { lora: { r: 4, alpha: 8, target_modules: ['q_proj', 'v_proj'] } }],
  ['flora (client ranks 4, 8, 16)', 'flora', { lora: { r: { founders: 4, industrial: 8, modern: 16 }, alpha: 16, target_modules: ['q_proj', 'v_proj'] } }],
  ['fedsb (random orthonormal init)', 'fedsb', { lora: { r: 4, target_modules: ['q_proj', 'v_proj', 'o_proj'] }, fedsb: { init: 'random' } }],
  ['fedsb (LoRA-SB gradient init round)', 'fedsb', { lora: { r: 4, target_modules: ['q_proj', 'v_proj'] } }],
];

describe('federated rounds with three fed-client processes on different text', () => {
  for (const [name, method, extra] of CASES) {
    test(`${name}: two rounds each publish a version that /v1/completions serves (equal to its downloaded files, different from the previous version, and equal to the aggregate recomputed from the downloaded updates)`, async () => {
      const target = `fed-${name.replace(/[^a-z0-9]+/g, '-').replace(/-$/, '')}`;
      const job = await runJob({ target_adapter_id: target, method, rounds: 2, clients: THREE_ERAS.map((c) => c[0]), round_timeout_ms: 120_000, local: LOCAL, seed: 7, ...extra });
      assert.deepEqual(job.versions, [1, 2]);
      const published = job.history.filter((h) => h.state === 'published');
      if (!('fedsb' in extra) && method === 'fedsb') {
        const init = job.history.find((h) => h.round === 0)!;
        assert.equal(init.state, 'initialized', 'round 0 initialises Fed-SB from the clients\' gradients');
        assert.equal(init.participants.length, 3);
      }
      assert.deepEqual(
        published.map((h) => h.round),
        [1, 2],
      );
      for (const h of published) assert.deepEqual([...h.participants].sort(), THREE_ERAS.map((c) => c[0]).sort());
      if (method === 'fedavg') for (const h of published) assert.ok(h.aggregation_error! > 0, `fedavg reports its aggregation error (${h.aggregation_error})`);
      if (method === 'flora') assert.equal(published[1].rank, 56, 'flora stacks 4 + 8 + 16 per round (28, then 56)');

      const v2 = await servedLogprobs(target);
      const direct = await fileLogprobs(target, 2);
      assert.equal(v2.length, direct.length);
      v2.forEach((x, i) => assert.ok(Math.abs(x - direct[i]) < 1e-4, `token ${i}: served ${x}, from the files ${direct[i]}`));
      const v1 = await fileLogprobs(target, 1);
      assert.ok(
        v1.some((x, i) => Math.abs(x - v2[i]) > 1e-4),
        'version 2 scores the prompt differently from version 1',
      );
      const base = await servedLogprobs('model');
      assert.ok(
        base.some((x, i) => Math.abs(x - v2[i]) > 1e-4),
        'the trained adapter differs from the base model',
      );
      await recomputeRound(method, target, job.id, 2, THREE_ERAS.map((c) => c[0]));
      const { json: adapter } = await api<{ version: number; provenance: { job: string; round: number; method: string } }>('GET', `/v1/adapters/${target}`);
      assert.equal(adapter.version, 2);
      assert.deepEqual([adapter.provenance.job, adapter.provenance.round, adapter.provenance.method], [job.id, 2, method]);
    });
  }
});
