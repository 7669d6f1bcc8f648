import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { writeDemoModel } from '../../src/cli/demo-model-command.js';
import type { TokenEvent } from '../../src/serving/serving-engine.js';
import { startThreaded } from '../helpers/threaded-fixture.js';

let root: string | undefined;
after(async () => root && rm(root, { recursive: true, force: true }));

test('ThreadedGateway with keepVersions 1: the version a request runs on outlives two newer uploads until the request is over', async () => {
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-threaded-keep-'));
  const modelDir = join(root, 'model');
  await writeDemoModel(modelDir, { adapters: 1 });
  const engine = await startThreaded(root, modelDir, { maxRunningSeqs: 4, maxBatchTokens: 512, maxAdaptersPerBatch: 4, maxWaiting: 16 }, { keepVersions: 1 });
  try {
    assert.ok(engine.backend?.name, 'the engine thread reports the backend it resolved');
    const adapterDir = join(modelDir, 'adapters', 'demo-0');
    await engine.loadAdapterFromDir('demo-0', adapterDir);
    let firstToken!: () => void;
    const started = new Promise<void>((r) => (firstToken = r));
    const running = engine.complete({ adapterId: 'demo-0', promptIds: [1, 2, 3], maxTokens: 1500, sampling: { temperature: 0, topP: 1, topK: 0 }, ignoreEos: true }, (_e: TokenEvent) => firstToken());
    await started;
    await engine.loadAdapterFromDir('demo-0', adapterDir);
    await engine.loadAdapterFromDir('demo-0', adapterDir);
    const disk = async () => (await readdir(join(root!, 'store', 'demo-0'))).sort();
    assert.deepEqual(await disk(), ['v1', 'v3']);
    const result = await running;
    assert.equal(result.tokenIds.length, 1500);
    assert.deepEqual(await disk(), ['v3']);
    assert.equal(await engine.getAdapterVersion('demo-0', 1), undefined);
  } finally {
    await engine.close();
  }
});
