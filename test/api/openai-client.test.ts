import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import OpenAI from 'openai';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

const BASE = 'demo-model';

let fixture: GatewayFixture;
let client: OpenAI;

describe('the official openai client against the gateway', () => {
  before(async () => {
    fixture = await startGateway(2);
    // no retries: a failure must show as a failure, not as a slow pass
    client = new OpenAI({ baseURL: `${fixture.baseUrl}/v1`, apiKey: 'unused', maxRetries: 0 });
  });
  after(async () => {
    await fixture?.close();
  });

  test('completions.create returns a text_completion whose text matches the raw HTTP answer', async () => {
    const body = { model: 'demo-1', prompt: 'The gateway serves', max_tokens: 6, temperature: 0 };
    const completion = await client.completions.create(body);
    assert.equal(completion.object, 'text_completion');
    assert.equal(completion.model, 'demo-1');
    assert.equal(completion.choices.length, 1);
    assert.ok(['stop', 'length'].includes(completion.choices[0].finish_reason));
    assert.ok(completion.usage!.completion_tokens >= 1 && completion.usage!.completion_tokens <= 6);
    assert.equal(completion.usage!.total_tokens, completion.usage!.prompt_tokens + completion.usage!.completion_tokens);
    const raw = await fetch(`${fixture.baseUrl}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    assert.equal(completion.choices[0].text, (await raw.json()).choices[0].text);
  });

  test('chat.completions.create returns an assistant message, and streaming it yields the same content at temperature 0', async () => {
    const params = { model: 'demo-0', messages: [{ role: 'user' as const, content: 'What does the gateway serve?' }], max_tokens: 10, temperature: 0 };
    const chat = await client.chat.completions.create(params);
    assert.equal(chat.object, 'chat.completion');
    assert.equal(chat.choices[0].message.role, 'assistant');
    assert.equal(typeof chat.choices[0].message.content, 'string');
    assert.ok(chat.usage!.prompt_tokens > 0);

    const stream = await client.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
    const deltas: string[] = [];
    const roles: (string | undefined)[] = [];
    let finishReason: string | null = null;
    let usage: OpenAI.CompletionUsage | null | undefined;
    for await (const chunk of stream) {
      assert.equal(chunk.object, 'chat.completion.chunk');
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        roles.push(choice.delta.role);
        if (choice.delta.content) deltas.push(choice.delta.content);
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
    assert.equal(roles[0], 'assistant', 'the first delta carries the role');
    assert.ok(deltas.length >= 2, `the content came in pieces: ${JSON.stringify(deltas)}`);
    assert.equal(deltas.join(''), chat.choices[0].message.content);
    assert.equal(finishReason, chat.choices[0].finish_reason);
    assert.deepEqual(usage, chat.usage);
  });

  test('models.list lists the base model and both adapters', async () => {
    const ids: string[] = [];
    for await (const model of client.models.list()) ids.push(model.id);
    assert.deepEqual(ids.sort(), [BASE, 'demo-0', 'demo-1'].sort());
  });

  test('an unknown model raises the client’s NotFoundError with the adapter_not_found code', async () => {
    await assert.rejects(
      client.completions.create({ model: 'missing', prompt: 'hi', max_tokens: 2 }),
      (err: unknown) => {
        assert.ok(err instanceof OpenAI.NotFoundError, String(err));
        assert.equal(err.status, 404);
        assert.equal(err.code, 'adapter_not_found');
        return true;
      },
    );
  });
});
