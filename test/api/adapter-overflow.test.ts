import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { demoModelConfigJson } from '../../src/cli/demo-model-command.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { encodeSafetensors } from '../../src/model/formats/safetensors.js';
import { loadLlamaModel } from '../../src/model/forward/model-loader.js';
import { resolvePeftConfig } from '../../src/model/lora/peft-config.js';
import { peftConfigJson, writeModelFolder } from '../../src/model/synthetic/hf-folder-writer.js';
import { randomLlamaWeights, randomLoraWeights } from '../../src/model/synthetic/random-weights.js';
import { buildDemoTokenizer } from '../../src/model/tokenizer/demo-tokenizer.js';
import { postJson, putAdapter, readAdapterFolder, type AdapterFileBytes } from '../helpers/adapter-upload.js';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';
import { useWasm } from '../helpers/tiny-models.js';

/**
 * The serving-side guard needs an adapter that passes every upload check and still overflows.
 * The base model here is the demo model with one edge: layer 0's input norm scales hidden
 * coordinate 0 by 1e30, only token T_BAD's embedding has that coordinate, and layer 0's q/k/v
 * ignore it, so the base model (and adapters that do not read it) serve finite output. The
 * adapter 'edge' reads it into q and k with gain exactly at the bound (s = 1, ‖A‖ = 1,
 * ‖B‖ = 1e4): q·k at T_BAD's position is ~1e68, +Inf in float32, and softmax gives NaN.
 */
const T_BAD = 20;
const H = 64;

let root: string;
let fx: GatewayFixture;
let good: AdapterFileBytes;
const configJson = demoModelConfigJson();

async function writeEdgeModel(dir: string): Promise<void> {
  const w = randomLlamaWeights(configJson, 77);
  const embed = w.get('model.embed_tokens.weight')!;
  for (let t = 0; t < embed.length / H; t++) embed[t * H] = t === T_BAD ? 1 : 0;
  w.get('model.layers.0.input_layernorm.weight')![0] = 1e30;
  for (const proj of ['q_proj', 'k_proj', 'v_proj']) {
    const m = w.get(`model.layers.0.self_attn.${proj}.weight`)!;
    for (let o = 0; o < m.length / H; o++) m[o * H] = 0;
  }
  const tok = buildDemoTokenizer();
  await writeModelFolder(dir, configJson, w, { tokenizerJson: tok.tokenizerJson, tokenizerConfig: tok.tokenizerConfig, generationConfig: tok.generationConfig });
}

function edgeAdapter(): AdapterFileBytes {
  const tensors = [];
  for (const [proj, out] of [['q_proj', 64], ['k_proj', 32]] as const) {
    const a = new Float32Array(H);
    a[0] = 1;
    const b = new Float32Array(out);
    b[0] = 1e4;
    const key = `base_model.model.model.layers.0.self_attn.${proj}`;
    tensors.push({ name: `${key}.lora_A.weight`, shape: [1, H], dtype: 'F32' as const, data: a }, { name: `${key}.lora_B.weight`, shape: [out, 1], dtype: 'F32' as const, data: b });
  }
  const config = peftConfigJson({ r: 1, loraAlpha: 1, targetModules: ['q_proj', 'k_proj'], layersToTransform: [0] });
  return { config: Buffer.from(JSON.stringify(config)), weights: encodeSafetensors(tensors) };
}

/** demo-1's config with `edit` applied to freshly drawn weights of its shapes. */
function demoWeights(config: Record<string, unknown>, edit: (w: Map<string, { shape: number[]; data: Float32Array }>) => void): Buffer {
  const w = randomLoraWeights(configJson, resolvePeftConfig(config, parseModelConfig(configJson), 64), 5, 0.2);
  edit(w);
  return encodeSafetensors([...w].map(([name, t]) => ({ name, shape: t.shape, dtype: 'F32' as const, data: t.data })));
}

before(async () => {
  await useWasm();
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-overflow-'));
  await writeEdgeModel(join(root, 'edge-model'));
  fx = await startGateway(2, { model: await loadLlamaModel(join(root, 'edge-model')) }, { loraPathRoot: root });
  good = await readAdapterFolder(join(fx.modelDir, 'adapters', 'demo-1'));
});
after(async () => {
  await fx.close();
  await rm(root, { recursive: true, force: true });
});

const complete = (model: string, extra: Record<string, unknown> = {}) =>
  postJson(fx.baseUrl, '/v1/completions', { model, prompt: [5, 6, 7], max_tokens: 4, temperature: 0, ignore_eos: true, logit_bias: { [T_BAD]: -100 }, ...extra });

async function versionsOf(id: string): Promise<number[]> {
  const body = (await (await fetch(`${fx.baseUrl}/v1/adapters/${id}/versions`)).json()) as { data: { version: number }[] };
  return body.data.map((v) => v.version);
}

describe('adapters whose numbers overflow float32', () => {
  test('uploads with lora_alpha 1e308 or one 1e38 weight are refused with 422 adapter_weights_overflow naming the module; nothing changes', async () => {
    assert.equal((await putAdapter(fx.baseUrl, 'keep', good)).status, 201);
    assert.equal((await putAdapter(fx.baseUrl, 'keep', good)).status, 200);
    const demoConfig = JSON.parse(good.config.toString()) as Record<string, unknown>;
    const hugeAlpha = Buffer.from(JSON.stringify({ ...demoConfig, lora_alpha: 1e308 }));
    const hugeWeight = demoWeights(demoConfig, (w) => {
      w.get('base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight')!.data[7] = 1e38;
    });
    const cases: [string, AdapterFileBytes, string][] = [
      ['keep', { ...good, config: hugeAlpha }, 'scale s = 1.25e+307'],
      ['keep', { ...good, weights: hugeWeight }, 'model.layers.2.self_attn.v_proj: ‖lora_A‖_F = 1.000e+38'],
      ['fresh', { ...good, config: hugeAlpha }, 'not a finite float32'],
    ];
    for (const [id, files, mention] of cases) {
      const res = await putAdapter(fx.baseUrl, id, files);
      assert.equal(res.status, 422, JSON.stringify(res.json));
      assert.equal(res.json.error?.code, 'adapter_weights_overflow');
      assert.equal(res.json.error?.type, 'invalid_request_error');
      assert.ok(res.json.error?.message.includes(mention), `${res.json.error?.message} should mention ${mention}`);
    }
    // vLLM's load_lora_adapter reads a folder through the same validation
    const dir = join(root, 'huge-folder');
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, 'adapter_config.json'), good.config);
    await writeFile(join(dir, 'adapter_model.safetensors'), hugeWeight);
    const load = await postJson(fx.baseUrl, '/v1/load_lora_adapter', { lora_name: 'keep', lora_path: dir, load_inplace: true });
    assert.equal(load.status, 422);
    assert.equal(load.json.error?.code, 'adapter_weights_overflow');

    assert.deepEqual(await versionsOf('keep'), [1, 2]);
    assert.equal((await fetch(`${fx.baseUrl}/v1/adapters/fresh`)).status, 404);
    assert.equal((await complete('keep')).status, 200);
    assert.equal((await complete('demo-1')).status, 200);
  });

  test('non-finite logits fail only their request (JSON 422, or an SSE error event once streaming) and mark the version errored', async () => {
    const up = await putAdapter(fx.baseUrl, 'edge', edgeAdapter());
    assert.equal(up.status, 201, JSON.stringify(up.json));
    // prompts without T_BAD never read the edge: the adapter serves like any other
    assert.equal((await complete('edge')).status, 200);

    // forcing T_BAD as the first token: it streams, then the next step's logits are NaN
    const streamed = fetch(`${fx.baseUrl}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'edge', prompt: [5, 6, 7], max_tokens: 6, temperature: 0, ignore_eos: true, stream: true, logit_bias: { [T_BAD]: 100 } }),
    }).then(async (res) => ({ status: res.status, text: await res.text() }));
    const others = [complete('demo-0', { max_tokens: 12 }), complete('demo-model', { max_tokens: 12 }), complete('demo-1', { max_tokens: 12 })];
    const stream = await streamed;
    assert.equal(stream.status, 200);
    const events = stream.text.split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)) as { choices?: { text: string }[]; error?: { code: string; message: string } });
    assert.ok(events[0].choices, 'the first token went out as an ordinary chunk');
    const error = events.find((e) => e.error)?.error;
    assert.equal(error?.code, 'adapter_output_not_finite', stream.text);
    assert.match(error?.message ?? '', /adapter 'edge' version 1 produced a non-finite logit \(NaN at token id \d+\)/);
    assert.match(stream.text, /data: \[DONE\]\n\n$/);
    for (const other of await Promise.all(others)) {
      assert.equal(other.status, 200, JSON.stringify(other.json));
      const choice = (other.json.choices as { text: string; finish_reason: string }[])[0];
      assert.equal(choice.finish_reason, 'length');
    }

    const shown = (await (await fetch(`${fx.baseUrl}/v1/adapters/edge`)).json()) as { residence: string; error?: string };
    assert.equal(shown.residence, 'errored');
    assert.match(shown.error ?? '', /non-finite logit/);
    // later requests fail fast with the same named error, even those that would not reach the edge
    const again = await complete('edge');
    assert.equal(again.status, 422);
    assert.equal(again.json.error?.code, 'adapter_output_not_finite');
    const forced = await complete('edge', { logit_bias: { [T_BAD]: 100 } });
    assert.equal(forced.json.error?.code, 'adapter_output_not_finite');
    // a new version clears it
    const healed = await putAdapter(fx.baseUrl, 'edge', good);
    assert.equal(healed.json.residence === 'errored', false);
    assert.equal((await complete('edge')).status, 200);
  });

  test('a prompt holding the edge token fails at prefill as a plain JSON 422, never a 200 with null logprobs', async () => {
    assert.equal((await putAdapter(fx.baseUrl, 'edge2', edgeAdapter())).status, 201);
    const res = await postJson(fx.baseUrl, '/v1/completions', { model: 'edge2', prompt: [5, T_BAD, 7], max_tokens: 3, logprobs: 2, echo: true });
    assert.equal(res.status, 422, JSON.stringify(res.json));
    assert.equal(res.json.error?.code, 'adapter_output_not_finite');
    assert.equal((await complete('demo-0')).status, 200);
  });
});
