import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { StopMatcher } from '../../src/api/generation-run.js';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

const ADAPTERS = 16;
const BASE = 'demo-model';
const PROMPTS = ['The gateway serves', 'A good tokenizer', 'In the morning we', 'Training with federated', 'Each adapter changes'];

// Response bodies are read loosely: each test asserts the fields it relies on.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = any;

let fixture: GatewayFixture;
/** Most sequences the engine ran in one step, and engine steps taken, since the last reset. */
let peakRunning = 0;
let steps = 0;

async function post(path: string, body: unknown, init: RequestInit = {}): Promise<Response> {
  return fetch(`${fixture.baseUrl}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), ...init });
}

async function postJson(path: string, body: unknown): Promise<{ status: number; json: Json }> {
  const res = await post(path, body);
  return { status: res.status, json: await res.json() };
}

/** A successful completion's body. */
async function complete(body: Record<string, unknown>): Promise<Json> {
  const { status, json } = await postJson('/v1/completions', body);
  assert.equal(status, 200, JSON.stringify(json));
  return json;
}

/** Every `data:` event of an SSE response, [DONE] excluded; asserts the stream ends with [DONE]. */
async function sseEvents(res: Response): Promise<Json[]> {
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /^text\/event-stream/);
  const frames = (await res.text()).split('\n\n').filter((f) => f !== '');
  assert.ok(frames.every((f) => f.startsWith('data: ')), 'every frame is a data event');
  assert.equal(frames.at(-1), 'data: [DONE]');
  return frames.slice(0, -1).map((f) => JSON.parse(f.slice('data: '.length)));
}

async function waitForKvPages(timeoutMs: number): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  while (fixture.gateway.stats().pages.kv > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  return fixture.gateway.stats().pages.kv;
}

describe('OpenAI-compatible completions over HTTP', () => {
  before(async () => {
    fixture = await startGateway(ADAPTERS, {
      onStep: (step) => {
        peakRunning = Math.max(peakRunning, step.running);
        steps++;
      },
    });
  });
  after(async () => {
    await fixture?.close();
  });

  test('64 concurrent greedy completions across 16 adapters and the base model return the same tokens as each request alone', async () => {
    const models = [...Array.from({ length: ADAPTERS }, (_, i) => `demo-${i}`), BASE];
    const bodies = Array.from({ length: 64 }, (_, i) => ({
      model: models[i % models.length],
      prompt: PROMPTS[i % PROMPTS.length],
      max_tokens: 6 + (i % 5),
      temperature: 0,
      ignore_eos: true,
      logprobs: 0,
    }));
    const alone: Json[] = [];
    for (const body of bodies) alone.push(await complete(body));
    // fetch opens its connections one at a time on this same event loop, which would let
    // the requests in one per engine step; open them all first so they arrive together
    await Promise.all(bodies.map(() => fetch(`${fixture.baseUrl}/v1/models`).then((r) => r.text())));
    peakRunning = 0;
    const together = await Promise.all(bodies.map((body) => complete(body)));
    assert.ok(peakRunning >= 16, `requests were batched together (at most ${peakRunning} running at once)`);
    together.forEach((res, i) => {
      assert.deepEqual(res.choices[0].logprobs.tokens, alone[i].choices[0].logprobs.tokens, `request ${i} (${bodies[i].model})`);
      assert.equal(res.choices[0].text, alone[i].choices[0].text, `request ${i} (${bodies[i].model})`);
      assert.equal(res.usage.completion_tokens, bodies[i].max_tokens);
      assert.equal(res.choices[0].finish_reason, 'length');
    });
    // the adapters really change the output, so a mix-up between them would show above
    const samePrompt = together.filter((_, i) => i % PROMPTS.length === 0).map((r) => r.choices[0].text);
    assert.ok(new Set(samePrompt).size > 1, 'different adapters give different text for one prompt');
  });

  test('streaming yields the same text, finish reason and usage as non-streaming for the same seed', async () => {
    for (const sampling of [{ temperature: 0 }, { temperature: 0.9, seed: 7 }]) {
      // a stop string that never matches still holds back a tail while streaming, sent at the end
      const body = { model: 'demo-3', prompt: PROMPTS[1], max_tokens: 12, ignore_eos: true, stop: 'NEVER-IN-THE-TEXT', ...sampling };
      const plain = await complete(body);
      const events = await sseEvents(await post('/v1/completions', { ...body, stream: true, stream_options: { include_usage: true } }));
      const usage = events.pop();
      assert.deepEqual(usage.choices, []);
      assert.deepEqual(usage.usage, plain.usage);
      assert.ok(events.length >= 2, 'text arrives in several chunks');
      assert.ok(events.every((e) => e.object === 'text_completion' && e.id === events[0].id && e.id.startsWith('cmpl-')));
      assert.deepEqual(events.slice(0, -1).map((e) => e.choices[0].finish_reason), Array(events.length - 1).fill(null));
      assert.equal(events.at(-1).choices[0].finish_reason, plain.choices[0].finish_reason);
      assert.equal(events.map((e) => e.choices[0].text).join(''), plain.choices[0].text, JSON.stringify(sampling));
    }
  });

  test('echo with logprobs returns the prompt then the completion, and scores every prompt token but the first', async () => {
    const prompt = 'The gateway serves';
    const body = { model: 'demo-5', prompt, max_tokens: 4, temperature: 0, ignore_eos: true };
    const plain = await complete(body);
    const echoed = await complete({ ...body, echo: true, logprobs: 2 });
    const choice = echoed.choices[0];
    assert.equal(choice.text, prompt + plain.choices[0].text);
    const lp = choice.logprobs;
    const n = echoed.usage.prompt_tokens + echoed.usage.completion_tokens;
    assert.equal(lp.tokens.length, n);
    assert.equal(lp.token_logprobs.length, n);
    assert.equal(lp.top_logprobs.length, n);
    assert.equal(lp.text_offset.length, n);
    assert.equal(lp.tokens[0], '<|begin_of_text|>');
    assert.equal(lp.token_logprobs[0], null);
    assert.equal(lp.top_logprobs[0], null);
    for (let i = 1; i < n; i++) {
      assert.ok(lp.token_logprobs[i] <= 0, `token ${i} has a logprob`);
      const top = Object.entries(lp.top_logprobs[i]);
      assert.ok(top.length >= 1 && top.length <= 3, 'the top 2 plus the chosen token');
      assert.equal(lp.top_logprobs[i][lp.tokens[i]], lp.token_logprobs[i], 'the chosen token is among the top entries');
    }
    // greedy: the generated tokens are the most likely ones
    for (let i = echoed.usage.prompt_tokens; i < n; i++) {
      assert.equal(lp.token_logprobs[i], Math.max(...(Object.values(lp.top_logprobs[i]) as number[])));
    }
    // the prompt is ASCII, so each prompt token's text sits at its offset
    for (let i = 1; i < echoed.usage.prompt_tokens; i++) assert.equal(choice.text.slice(lp.text_offset[i], lp.text_offset[i] + lp.tokens[i].length), lp.tokens[i]);
  });

  test('a stop string cuts the text before it, finishes with stop, and ends generation early', async () => {
    const body = { model: 'demo-7', prompt: PROMPTS[2], max_tokens: 30, temperature: 0, ignore_eos: true };
    const full = (await complete(body)).choices[0].text as string;
    let at = 3;
    while (at + 2 <= full.length && full.slice(at, at + 2).includes('\uFFFD')) at++;
    assert.ok(at + 2 <= full.length, `the full text '${full}' has a stop candidate`);
    const stop = full.slice(at, at + 2);
    const expected = full.slice(0, full.indexOf(stop));

    steps = 0;
    const cut = await complete({ ...body, stop: [stop, 'never appears'] });
    assert.equal(cut.choices[0].text, expected);
    assert.equal(cut.choices[0].finish_reason, 'stop');
    assert.ok(cut.usage.completion_tokens < body.max_tokens, `stopped after ${cut.usage.completion_tokens} tokens`);
    // the engine request was cancelled at the stop, not run on to max_tokens
    assert.ok(steps <= cut.usage.completion_tokens + 2, `${steps} engine steps for ${cut.usage.completion_tokens} tokens`);

    const events = await sseEvents(await post('/v1/completions', { ...body, stop, stream: true }));
    assert.equal(events.map((e) => e.choices[0].text).join(''), expected, 'no part of the stop string is streamed');
    assert.equal(events.at(-1).choices[0].finish_reason, 'stop');
    assert.equal(await waitForKvPages(5000), 0, 'the stopped requests released their KV pages');
  });

  test('an unknown model is a 404 with an OpenAI error body, also when streaming', async () => {
    for (const stream of [false, true]) {
      const res = await post('/v1/completions', { model: 'no-such-adapter', prompt: 'hi', stream });
      assert.equal(res.status, 404);
      assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
      const json = await res.json();
      assert.equal(json.error.code, 'adapter_not_found');
      assert.equal(json.error.type, 'invalid_request_error');
      assert.match(json.error.message, /no-such-adapter/);
    }
  });

  test('the adapter in the path of /v1/adapters/:id/completions selects it, and an unknown one is a 404', async () => {
    const body = { prompt: PROMPTS[0], max_tokens: 6, temperature: 0, ignore_eos: true };
    const viaPath = await postJson('/v1/adapters/demo-9/completions', body);
    assert.equal(viaPath.status, 200);
    assert.equal(viaPath.json.model, 'demo-9');
    assert.equal(viaPath.json.choices[0].text, (await complete({ ...body, model: 'demo-9' })).choices[0].text);
    const missing = await postJson('/v1/adapters/demo-99/completions', body);
    assert.equal(missing.status, 404);
    assert.equal(missing.json.error.code, 'adapter_not_found');
  });

  test('n other than 1 is a 400', async () => {
    const { status, json } = await postJson('/v1/completions', { model: BASE, prompt: 'hi', n: 2 });
    assert.equal(status, 400);
    assert.equal(json.error.code, 'request_invalid');
    assert.match(json.error.message, /n=1/);
  });

  test('an invalid body is a 400 JSON error naming the field', async () => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ model: BASE, prompt: 'hi', max_tokens: -1 }, /max_tokens/],
      [{ prompt: 'hi' }, /model/],
      [{ model: BASE, prompt: ['one', 'two'] }, /prompt/],
      [{ model: BASE, prompt: 'hi', stop: ['a', 'b', 'c', 'd', 'e'] }, /stop/],
      [{ model: BASE, prompt: 'hi', logprobs: 21 }, /logprobs/],
    ];
    for (const [body, field] of cases) {
      const { status, json } = await postJson('/v1/completions', body);
      assert.equal(status, 400, JSON.stringify(body));
      assert.equal(json.error.code, 'request_invalid');
      assert.match(json.error.message, field);
    }
  });

  test('a prompt that does not fit the context with max_tokens is a 400 context_length_exceeded', async () => {
    const context = fixture.gateway.model.maxPositionEmbeddings;
    for (const stream of [false, true]) {
      const { status, json } = await postJson('/v1/completions', { model: BASE, prompt: Array(context - 8).fill(20), max_tokens: 16, stream });
      assert.equal(status, 400, 'a stream that fails before its first token is a plain HTTP error');
      assert.equal(json.error.code, 'context_length_exceeded');
      assert.match(json.error.message, new RegExp(String(context)));
    }
  });

  test("chat completion renders the demo model's ChatML template and answers like the rendered prompt", async () => {
    const tokenizer = fixture.gateway.tokenizer!;
    const messages = [
      { role: 'system', content: 'You are terse.' },
      { role: 'user', content: 'What does the gateway serve?' },
    ];
    const rendered = '<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat does the gateway serve?<|im_end|>\n<|im_start|>assistant\n';
    const promptIds = tokenizer.encode(rendered, { addSpecialTokens: false });
    const { status, json } = await postJson('/v1/chat/completions', { model: 'demo-2', messages, max_tokens: 8, temperature: 0, logprobs: true, top_logprobs: 2 });
    assert.equal(status, 200, JSON.stringify(json));
    assert.equal(json.object, 'chat.completion');
    assert.match(json.id, /^chatcmpl-/);
    assert.equal(json.choices[0].message.role, 'assistant');
    assert.equal(json.usage.prompt_tokens, promptIds.length);
    const same = await complete({ model: 'demo-2', prompt: promptIds, max_tokens: 8, temperature: 0 });
    assert.equal(json.choices[0].message.content, same.choices[0].text);
    assert.equal(json.choices[0].finish_reason, same.choices[0].finish_reason);
    const content = json.choices[0].logprobs.content;
    assert.equal(content.length, json.usage.completion_tokens);
    for (const t of content) {
      assert.deepEqual(t.bytes, [...Buffer.from(t.token, 'utf8')]);
      assert.equal(t.top_logprobs.length, 2);
      assert.equal(t.top_logprobs[0].logprob, t.logprob, 'greedy picks the top token');
    }
  });

  test('GET /v1/models lists the base model and every adapter with the base as parent', async () => {
    const res = await fetch(`${fixture.baseUrl}/v1/models`);
    assert.equal(res.status, 200);
    const json = await res.json();
    assert.equal(json.object, 'list');
    assert.deepEqual(json.data[0], { ...json.data[0], id: BASE, object: 'model', owned_by: 'lora-gateway', root: BASE, parent: null });
    const adapters = json.data.slice(1);
    assert.deepEqual(adapters.map((m: Json) => m.id).sort(), Array.from({ length: ADAPTERS }, (_, i) => `demo-${i}`).sort());
    for (const m of adapters) assert.deepEqual([m.object, m.root, m.parent], ['model', BASE, BASE]);
  });

  test('a client that disconnects mid-stream cancels its request and frees its KV pages', async () => {
    const controller = new AbortController();
    const res = await post('/v1/completions', { model: 'demo-4', prompt: PROMPTS[3], max_tokens: 200, ignore_eos: true, temperature: 0, stream: true }, { signal: controller.signal });
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    const first = await reader.read();
    assert.equal(first.done, false);
    assert.ok(fixture.gateway.stats().pages.kv > 0, 'the running request holds KV pages');
    controller.abort();
    await reader.closed.catch(() => undefined);
    assert.equal(await waitForKvPages(5000), 0);
    const metrics = await (await fetch(`${fixture.baseUrl}/metrics`)).text();
    assert.match(metrics, /lora_gateway_requests_total\{route="completions",status="499"\} 1/, 'counted as cancelled by the client');
  });

  test('/metrics reports request counts by route and status, and the time-to-first-token histogram', async () => {
    await postJson('/v1/chat/completions', { model: BASE, messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 });
    const res = await fetch(`${fixture.baseUrl}/metrics`);
    assert.equal(res.status, 200);
    const text = await res.text();
    assert.match(text, /lora_gateway_requests_total\{route="completions",status="200"\} \d+/);
    assert.match(text, /lora_gateway_requests_total\{route="completions",status="404"\} \d+/);
    assert.match(text, /lora_gateway_requests_total\{route="completions",status="400"\} \d+/);
    assert.match(text, /lora_gateway_requests_total\{route="chat",status="200"\} \d+/);
    assert.match(text, /lora_gateway_time_to_first_token_seconds_bucket\{le="[^"]+"\} [1-9]/);
    assert.match(text, /lora_gateway_inter_token_latency_seconds_count [1-9]/);
    assert.match(text, /lora_gateway_generation_tokens_total [1-9]/);
  });
});

describe('StopMatcher', () => {
  /** Feeds the pieces; returns what was released along the way, the final text and whether a stop matched. */
  function run(stops: string[], pieces: string[]): { released: string[]; text: string; matched: boolean } {
    const m = new StopMatcher(stops);
    const released = pieces.map((p) => m.push(p));
    if (!m.matched) released.push(m.finish());
    return { released, text: m.fullText, matched: m.matched };
  }

  test('a stop string split across pieces is found and no part of it is released', () => {
    const r = run(['END'], ['abc E', 'N', 'Dxyz']);
    assert.equal(r.matched, true);
    assert.equal(r.text, 'abc ');
    assert.equal(r.released.join(''), 'abc ');
    assert.ok(r.released.every((p) => !p.includes('E')), JSON.stringify(r.released));
  });

  test('the earliest of several stop strings wins', () => {
    assert.equal(run(['zz', 'b'], ['a', 'bzz']).text, 'a');
  });

  test('without a match everything is released, the held-back tail at the end', () => {
    const r = run(['STOP'], ['hello', ' wor', 'ld']);
    assert.equal(r.matched, false);
    assert.deepEqual(r.released, ['he', 'llo ', 'wo', 'rld']);
  });

  test('held-back text never ends between the halves of a surrogate pair', () => {
    const released = run(['ab'], ['x😀y']).released;
    assert.deepEqual(released, ['x😀', 'y']);
  });
});
