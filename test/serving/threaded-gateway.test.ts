import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { buildApp } from '../../src/api/app.js';
import { GatewayMetrics } from '../../src/api/metrics.js';
import { writeDemoModel } from '../../src/cli/demo-model-command.js';
import { loadLlamaModel } from '../../src/model/forward/model-loader.js';
import { TextTokenizer } from '../../src/model/tokenizer/tokenizer.js';
import type { StepInfo } from '../../src/serving/batcher-options.js';
import { Gateway } from '../../src/serving/gateway.js';
import type { CompletionRequest } from '../../src/serving/serving-engine.js';
import { ThreadedGateway } from '../../src/serving/threaded-gateway.js';
import { withCode } from '../helpers/error-matchers.js';
import { startThreaded } from '../helpers/threaded-fixture.js';
import { useWasm } from '../helpers/tiny-models.js';

const GREEDY = { temperature: 0, topP: 1, topK: 0 };
const LIMITS = { maxRunningSeqs: 16, maxBatchTokens: 700, maxAdaptersPerBatch: 16, maxWaiting: 64 };

let root: string;
let modelDir: string;
let engine: ThreadedGateway;
let app: FastifyInstance;
let baseUrl: string;
/** Every step the engine thread reported, in order. */
const steps: StepInfo[] = [];
/** What happened on this thread, in order: 'step N' when step N's report arrived, and the test's own marks. */
const events: string[] = [];

async function threaded(): Promise<ThreadedGateway> {
  return startThreaded(root, modelDir, LIMITS);
}

function request(promptIds: number[], maxTokens: number, over: Partial<CompletionRequest> = {}): CompletionRequest {
  return { adapterId: null, promptIds, maxTokens, sampling: GREEDY, ignoreEos: true, logprobs: 2, ...over };
}

/** A long prompt: prefilled in three chunks of at most maxBatchTokens, one step each. */
const LONG_PROMPT = Array.from({ length: 2040 }, (_, i) => 5 + ((i * 7) % 200));

describe('the engine on its own worker thread (ThreadedGateway)', () => {
  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'lora-gateway-threaded-'));
    modelDir = join(root, 'model');
    await writeDemoModel(modelDir, { adapters: 2 });
    engine = await threaded();
    for (let i = 0; i < 2; i++) await engine.loadAdapterFromDir(`demo-${i}`, join(modelDir, 'adapters', `demo-${i}`));
    engine.onStep((s) => {
      steps.push(s);
      events.push(`step ${steps.length}`);
    });
    app = await buildApp({ engine, metrics: new GatewayMetrics(engine) });
    baseUrl = await app.listen({ host: '127.0.0.1', port: 0 });
  });
  after(async () => {
    await app.close();
    await engine.close();
    await rm(root, { recursive: true, force: true });
  });

  test('with every running slot and waiting place taken, QUEUE_FULL is decided on this thread, before another step report arrives', async () => {
    const hold = new AbortController();
    const held = Array.from({ length: LIMITS.maxRunningSeqs + LIMITS.maxWaiting }, () =>
      engine.complete(request([5, 6, 7], 1500, { logprobs: undefined, signal: hold.signal })).catch(() => undefined),
    );
    const stepsBefore = steps.length;
    await assert.rejects(engine.complete(request([5, 6, 7], 4)), withCode('QUEUE_FULL'));
    // no message from the engine thread was handled in between: the answer did not wait for a step
    assert.equal(steps.length, stepsBefore);
    hold.abort();
    await Promise.all(held);
  });

  test('a request arriving over HTTP mid-step is admitted at the next step boundary, and HTTP answers while the step runs', async () => {
    steps.length = 0;
    events.length = 0;
    let arrival: Promise<unknown> | undefined;
    let health: Promise<unknown> | undefined;
    let seenAtArrival = -1;
    const onFirstStep = (): void => {
      if (arrival || steps.length !== 1) return;
      // step 1 (the first prefill chunk) has ended; the engine thread is inside step 2 now
      seenAtArrival = steps.length;
      events.push('sent');
      health = fetch(`${baseUrl}/health`).then(async (r) => {
        assert.equal(r.status, 200);
        events.push('health answered');
      });
      arrival = fetch(`${baseUrl}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'demo-1', prompt: [7, 8, 9], max_tokens: 2 }),
      }).then(async (r) => {
        assert.equal(r.status, 200, await r.clone().text());
        return r.json();
      });
    };
    engine.onStep(onFirstStep);
    const long = engine.complete(request(LONG_PROMPT, 4));
    await long;
    await Promise.all([arrival, health]);
    // admitted: the first step after the long request's own admission that admits anything
    const admittedIn = steps.findIndex((s, i) => i > 0 && s.admitted > 0) + 1;
    assert.ok(seenAtArrival === 1, 'the second request was sent after step 1');
    assert.ok(admittedIn > 0, 'the second request was admitted');
    assert.ok(
      admittedIn <= seenAtArrival + 2,
      `sent during step ${seenAtArrival + 1}, admitted in step ${admittedIn}: ${JSON.stringify(steps.map((s) => [s.admitted, s.prefilled]))}`,
    );
    // the event loop was free while step 2 computed: /health came back before step 2's report
    assert.ok(events.indexOf('health answered') < events.indexOf('step 2'), events.join(', '));
  });

  test('gives the tokens and logprobs of the in-process engine, streams each token, and keeps error codes', async () => {
    await useWasm();
    const local = await Gateway.create({
      modelId: 'demo-model',
      model: await loadLlamaModel(modelDir),
      tokenizer: await TextTokenizer.load(modelDir),
      storeDir: join(root, 'store-local'),
      deviceMemoryBytes: 64 * 2 ** 20,
      hostMemoryBytes: 64 * 2 ** 20,
      maxLoraRank: 64,
      limits: LIMITS,
    });
    try {
      for (let i = 0; i < 2; i++) await local.loadAdapterFromDir(`demo-${i}`, join(modelDir, 'adapters', `demo-${i}`));
      const reqs = [null, 'demo-0', 'demo-1'].map((adapterId, i) => request([3 + i, 40, 41, 42 + i], 6, { adapterId }));
      const streamed: number[][] = reqs.map(() => []);
      const there = await Promise.all(reqs.map((r, i) => engine.complete(r, (e) => streamed[i].push(e.token.tokenId))));
      const here = await Promise.all(reqs.map((r) => local.complete(r)));
      for (let i = 0; i < reqs.length; i++) {
        assert.deepEqual(there[i].tokenIds, here[i].tokenIds);
        assert.deepEqual(streamed[i], there[i].tokenIds, 'each token was streamed, in order');
        for (let t = 0; t < here[i].logprobs.length; t++) assert.ok(Math.abs(there[i].logprobs[t].logprob - here[i].logprobs[t].logprob) < 1e-5);
      }
    } finally {
      await local.close();
    }
    await assert.rejects(engine.complete(request([1, 2], 2, { adapterId: 'nope' })), withCode('ADAPTER_NOT_FOUND', 'nope'));
    await assert.rejects(engine.complete(request([1, 10 ** 9], 2)), withCode('REQUEST_INVALID', 'vocabulary'));
    const abort = new AbortController();
    const cancelled = engine.complete(request(LONG_PROMPT.slice(0, 1000), 50, { signal: abort.signal }), () => abort.abort());
    await assert.rejects(cancelled, withCode('REQUEST_CANCELLED'));
    // the engine thread goes on serving after errors
    assert.equal((await engine.complete(request([1, 2, 3], 3))).tokenIds.length, 3);
  });

  test('adapter residence, stats and deletion reach the engine thread; closing fails what is still in flight', async () => {
    const record = engine.getAdapter('demo-0')!;
    await engine.complete(request([1, 2, 3], 2, { adapterId: 'demo-0' }));
    assert.equal(engine.residence(record), 'device');
    assert.ok(engine.stats().pager.deviceLoads >= 1);
    assert.equal(engine.stats().pages.kv, 0, 'finished requests hold no KV pages');
    // delete waits for the request in flight on that adapter, which finishes normally
    const inFlight = engine.complete(request(LONG_PROMPT.slice(0, 600), 3, { adapterId: 'demo-0' }));
    const deleted = await engine.deleteAdapter('demo-0');
    assert.equal(deleted.id, 'demo-0');
    assert.equal((await inFlight).tokenIds.length, 3);
    assert.equal(engine.getAdapter('demo-0'), undefined);
    assert.equal(engine.residence(record), 'disk', 'its versions left host and device');
    await assert.rejects(engine.complete(request([1, 2], 2, { adapterId: 'demo-0' })), withCode('ADAPTER_NOT_FOUND'));

    const other = await threaded();
    const pending = assert.rejects(other.complete(request(LONG_PROMPT.slice(0, 1900), 100)), withCode('ENGINE_FAILED'));
    await other.close();
    await pending;
    await assert.rejects(other.complete(request([1], 1)), withCode('ENGINE_FAILED'));
  });
});
