import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { SeededRandom } from '../../src/model/synthetic/seeded-random.js';
import { assertAdapterWhole, completionStatus } from '../helpers/adapter-integrity.js';
import { readAdapterFolder, type AdapterFileBytes } from '../helpers/adapter-upload.js';
import { mutateJson, mutateSafetensors, type Mutated } from '../helpers/fuzz-mutations.js';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

// LORA_GATEWAY_FUZZ_SEED reruns one run exactly; the budget bounds it in time and in cases
const SEED = Number(process.env.LORA_GATEWAY_FUZZ_SEED ?? Date.now() % 2 ** 31);
const MAX_CASES = Number(process.env.LORA_GATEWAY_FUZZ_CASES ?? 5000);
const BUDGET_MS = Number(process.env.LORA_GATEWAY_FUZZ_MS ?? 40_000);

let fx: GatewayFixture;
let files: AdapterFileBytes;
/** Every code src/errors.ts defines, as the API writes them (lowercase). */
let knownCodes: Set<string>;

before(async () => {
  fx = await startGateway(2);
  files = await readAdapterFolder(join(fx.modelDir, 'adapters', 'demo-1'));
  const source = await readFile(new URL('../../src/errors.ts', import.meta.url), 'utf8');
  const union = /export type ErrorCode =([\s\S]*?);/.exec(source)![1];
  knownCodes = new Set([...union.matchAll(/'([A-Z_]+)'/g)].map((m) => m[1].toLowerCase()));
});
after(() => fx.close());

interface Answer {
  status: number;
  /** error codes in the body: the JSON error's, or each SSE error event's */
  codes: string[];
}

async function answerOf(res: Response): Promise<Answer> {
  const text = await res.text();
  if ((res.headers.get('content-type') ?? '').startsWith('text/event-stream')) {
    const events = text.split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)) as { error?: { code: string } });
    return { status: res.status, codes: events.flatMap((e) => (e.error ? [e.error.code] : [])) };
  }
  const json = JSON.parse(text) as { error?: { code: string; message: string; type: string } };
  if (res.status >= 400) {
    assert.equal(typeof json.error?.message, 'string', `OpenAI-shaped error: ${text}`);
    assert.equal(typeof json.error?.type, 'string', `OpenAI-shaped error: ${text}`);
  }
  return { status: res.status, codes: json.error ? [json.error.code] : [] };
}

/** The request a case makes: an upload of mutated files, or a completions / chat body. */
function nextCase(rng: SeededRandom, ids: string[]): { what: string; send: () => Promise<Response> } {
  const u = rng.next();
  if (u < 0.6) {
    const id = `fuzz-${rng.int(6)}`;
    const mutation: Mutated<{ config: Buffer; weights: Buffer }> =
      u < 0.4
        ? ((m) => ({ value: { config: files.config, weights: m.value }, what: `weights: ${m.what}` }))(mutateSafetensors(rng, files.weights))
        : ((m) => ({ value: { config: Buffer.from(m.value, 'latin1'), weights: files.weights }, what: `config: ${m.what}` }))(
            mutateJson(rng, JSON.parse(files.config.toString()) as Record<string, unknown>, ['rank_pattern', 'alpha_pattern', 'layers_pattern', 'exclude_modules', 'use_dora', 'modules_to_save']),
          );
    const form = new FormData();
    form.append('adapter_config.json', new Blob([new Uint8Array(mutation.value.config)]), 'adapter_config.json');
    form.append('adapter_model.safetensors', new Blob([new Uint8Array(mutation.value.weights)]), 'adapter_model.safetensors');
    return { what: `PUT ${id} ${mutation.what}`, send: () => fetch(`${fx.baseUrl}/v1/adapters/${id}`, { method: 'PUT', body: form }) };
  }
  const model = ids[rng.int(ids.length)];
  const chat = u > 0.85;
  const body: Record<string, unknown> = chat
    ? { model, messages: [{ role: 'user', content: 'hi there' }], max_tokens: 3 }
    : { model, prompt: 'The quick brown fox', max_tokens: 3, logprobs: 2 };
  const extra = ['stream', 'echo', 'temperature', 'top_p', 'top_k', 'seed', 'stop', 'logit_bias', 'presence_penalty', 'n', 'best_of', 'suffix', 'ignore_eos', 'response_format', 'tools', 'stream_options'];
  const m = mutateJson(rng, body, extra);
  const path = chat ? '/v1/chat/completions' : '/v1/completions';
  return { what: `POST ${path} ${m.what}`, send: () => fetch(`${fx.baseUrl}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: m.value }) };
}

test('seeded mutations of adapter files and request bodies over a real socket: never a 5xx, only named 4xx codes, never a partial adapter', async () => {
  console.log(`input fuzz: seed ${SEED} (rerun with LORA_GATEWAY_FUZZ_SEED=${SEED}), at most ${MAX_CASES} cases or ${BUDGET_MS} ms`);
  const rng = new SeededRandom(SEED);
  const originals = ['demo-0', 'demo-1'];
  const originalSha = createHash('sha256').update(files.weights).digest('hex');
  const started = performance.now();
  const tally = new Map<string, number>();
  let cases = 0;
  for (; cases < MAX_CASES && performance.now() - started < BUDGET_MS; cases++) {
    const ids = [...originals, 'demo-model', ...fx.gateway.listAdapters().map((a) => a.id).filter((id) => id.startsWith('fuzz-'))];
    const c = nextCase(rng, ids);
    const a = await answerOf(await c.send());
    const context = `case ${cases} (seed ${SEED}): ${c.what} → ${a.status} ${a.codes.join(',')}`;
    assert.ok(a.status < 500, context);
    assert.ok(a.status < 300 || a.codes.length === 1, context);
    for (const code of a.codes) assert.ok(knownCodes.has(code), `unnamed error code: ${context}`);
    const key = `${a.status} ${a.codes.join(',')}`;
    tally.set(key, (tally.get(key) ?? 0) + 1);
  }
  console.log(`input fuzz: ${cases} cases in ${Math.round(performance.now() - started)} ms: ${JSON.stringify(Object.fromEntries([...tally].sort()))}`);
  assert.ok(cases >= 200, `only ${cases} cases ran`);
  // every stored version is whole, and the original adapters are untouched and serve
  for (const r of fx.gateway.listAdapters()) await assertAdapterWhole(fx.baseUrl, r.id);
  for (const id of originals) {
    assert.equal(fx.gateway.getAdapter(id)?.version, 1);
    assert.equal(await completionStatus(fx.baseUrl, id), 200);
  }
  assert.equal(fx.gateway.getAdapter('demo-1')?.sha256.weights, originalSha);
});
