import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = any;

let fx: GatewayFixture;
before(async () => {
  fx = await startGateway(2, {}, { loraPathRootIsModelDir: true });
});
after(async () => fx?.close());

async function call(method: string, path: string, body?: unknown): Promise<{ status: number; json: Json }> {
  const res = await fetch(`${fx.baseUrl}${path}`, { method, headers: body === undefined ? {} : { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
  return { status: res.status, json: await res.json() };
}

const base = { model: 'demo-0', prompt: 'Hello', max_tokens: 2, temperature: 0 };

test('OpenAI parameters this server does not apply answer 400 unsupported_parameter naming the field, not a silent 200', async () => {
  for (const [field, value] of [
    ['best_of', 2],
    ['suffix', ' and then'],
    ['response_format', { type: 'json_object' }],
    ['tools', [{ type: 'function', function: { name: 'f' } }]],
    ['tool_choice', 'auto'],
  ] as const) {
    const { status, json } = await call('POST', '/v1/completions', { ...base, [field]: value });
    assert.equal(status, 400, `${field}: ${JSON.stringify(json)}`);
    assert.equal(json.error.code, 'unsupported_parameter');
    assert.ok(json.error.message.startsWith(`${field}:`), json.error.message);
  }
  // their neutral values are accepted, as OpenAI's clients send them
  const ok = await call('POST', '/v1/completions', { ...base, best_of: 1, presence_penalty: 0, frequency_penalty: 0, logit_bias: {}, response_format: { type: 'text' }, tools: [] });
  assert.equal(ok.status, 200, JSON.stringify(ok.json));
});

test('logit_bias and frequency_penalty are applied over HTTP; out-of-range values are 400', async () => {
  const greedy = { model: 'demo-0', prompt: 'The quick brown fox', max_tokens: 12, temperature: 0, ignore_eos: true, logprobs: 0 };
  const ids = (json: Json) => json.choices[0].logprobs.tokens as string[];
  const forced = await call('POST', '/v1/completions', { ...greedy, logit_bias: { '42': 100 } });
  assert.equal(forced.status, 200, JSON.stringify(forced.json));
  const plain = await call('POST', '/v1/completions', greedy);
  const tokens = ids(forced.json);
  assert.ok(tokens.every((t) => t === tokens[0]), `every token is the biased one: ${JSON.stringify(tokens)}`);
  assert.notDeepEqual(tokens, ids(plain.json));
  // a strong frequency penalty: no token can win twice in a row of 12 greedy steps as easily
  const repeats = (xs: string[]) => xs.length - new Set(xs).size;
  const penalized = await call('POST', '/v1/completions', { ...greedy, frequency_penalty: 2, presence_penalty: 2 });
  assert.equal(penalized.status, 200);
  assert.ok(repeats(ids(plain.json)) > 0, "greedy decoding on the demo model repeats itself");
  assert.ok(repeats(ids(penalized.json)) < repeats(ids(plain.json)), `${JSON.stringify(ids(penalized.json))} vs ${JSON.stringify(ids(plain.json))}`);
  for (const body of [{ presence_penalty: 3 }, { logit_bias: { '5': 101 } }, { logit_bias: { x: 1 } }, { logit_bias: { '99999999': 1 } }]) {
    const { status, json } = await call('POST', '/v1/completions', { ...greedy, ...body });
    assert.equal(status, 400, `${JSON.stringify(body)}: ${JSON.stringify(json)}`);
  }
});

test('chat messages whose content is a list of text parts are accepted and mean their joined text; other parts are refused', async () => {
  const parts = await call('POST', '/v1/chat/completions', { model: 'demo-model', max_tokens: 3, temperature: 0, messages: [{ role: 'user', content: [{ type: 'text', text: 'Hello' }, { type: 'text', text: 'there' }] }] });
  const plain = await call('POST', '/v1/chat/completions', { model: 'demo-model', max_tokens: 3, temperature: 0, messages: [{ role: 'user', content: 'Hello\nthere' }] });
  assert.equal(parts.status, 200, JSON.stringify(parts.json));
  assert.equal(parts.json.usage.prompt_tokens, plain.json.usage.prompt_tokens);
  assert.equal(parts.json.choices[0].message.content, plain.json.choices[0].message.content);
  const image = await call('POST', '/v1/chat/completions', { model: 'demo-model', messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }] });
  assert.equal(image.status, 400);
  assert.equal(image.json.error.code, 'unsupported_parameter');
  assert.match(image.json.error.message, /messages\[0\]\.content\[0\]\.type/);
});

test('GET /v1/models/{id} returns the base model and each adapter, 404 for others', async () => {
  const b = await call('GET', '/v1/models/demo-model');
  assert.equal(b.status, 200);
  assert.equal(b.json.id, 'demo-model');
  assert.equal(b.json.parent, null);
  const a = await call('GET', '/v1/models/demo-1');
  assert.equal(a.json.parent, 'demo-model');
  const missing = await call('GET', '/v1/models/nope');
  assert.equal(missing.status, 404);
  assert.equal(missing.json.error.code, 'adapter_not_found');
});

test("an adapter may not take the served model's name (409 adapter_id_reserved), through load_lora_adapter as through PUT", async () => {
  const res = await call('POST', '/v1/load_lora_adapter', { lora_name: 'demo-model', lora_path: `${fx.modelDir}/adapters/demo-0` });
  assert.equal(res.status, 409, JSON.stringify(res.json));
  assert.equal(res.json.error.code, 'adapter_id_reserved');
  const form = new FormData();
  form.append('adapter_config.json', new Blob(['{}']), 'adapter_config.json');
  form.append('adapter_model.safetensors', new Blob([new Uint8Array(8)]), 'adapter_model.safetensors');
  const put = await fetch(`${fx.baseUrl}/v1/adapters/demo-model`, { method: 'PUT', body: form });
  assert.equal(put.status, 409);
  assert.equal(((await put.json()) as Json).error.code, 'adapter_id_reserved');
  assert.equal(fx.gateway.getAdapter('demo-model'), undefined);
});

test('vLLM load_lora_adapter refuses a name already loaded with 400, unless load_inplace: true makes a new version', async () => {
  const again = await call('POST', '/v1/load_lora_adapter', { lora_name: 'demo-0', lora_path: `${fx.modelDir}/adapters/demo-1` });
  assert.equal(again.status, 400);
  assert.equal(again.json.error.code, 'adapter_already_loaded');
  assert.equal(fx.gateway.getAdapter('demo-0')!.version, 1, 'the stored adapter is untouched');
  const inplace = await fetch(`${fx.baseUrl}/v1/load_lora_adapter`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ lora_name: 'demo-0', lora_path: `${fx.modelDir}/adapters/demo-1`, load_inplace: true }) });
  assert.equal(inplace.status, 200);
  assert.equal(fx.gateway.getAdapter('demo-0')!.version, 2);
});

test('GET /v1/adapters/{id}/versions lists every stored version, oldest first, with its source', async () => {
  // demo-0 has two versions by now: the registration, and the load_inplace above
  const { status, json } = await call('GET', '/v1/adapters/demo-0/versions');
  assert.equal(status, 200);
  assert.deepEqual(json.data.map((v: Json) => v.version), [1, 2]);
  for (const v of json.data) {
    assert.deepEqual(v.source, { kind: 'upload' });
    assert.match(v.sha256.weights, /^[0-9a-f]{64}$/);
  }
  assert.notEqual(json.data[0].sha256.weights, json.data[1].sha256.weights, 'the versions hold different files');
  const missing = await call('GET', '/v1/adapters/nope/versions');
  assert.equal(missing.status, 404);
});
