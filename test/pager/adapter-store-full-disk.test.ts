import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, rm, statfs, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { assertAdapterWhole, assertNoTempLeft, completionStatus } from '../helpers/adapter-integrity.js';
import { bigDemoAdapter, putAdapter, readAdapterFolder } from '../helpers/adapter-upload.js';
import { startGateway } from '../helpers/gateway-fixture.js';

const run = promisify(execFile);

test('a full disk during an upload answers 507 storage_full, changes nothing, leaves no temporary files, and the server keeps serving', async (t) => {
  const mountPoint = await mkdtemp(join(tmpdir(), 'lora-gateway-full-'));
  try {
    await run('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', mountPoint]);
  } catch (err) {
    await rm(mountPoint, { recursive: true, force: true });
    t.skip(`cannot mount a 2 MiB tmpfs as the data folder (${(err as Error).message.split('\n')[0]}): needs root or CAP_SYS_ADMIN`);
    return;
  }
  const store = join(mountPoint, 'store');
  const fx = await startGateway(2, { storeDir: store });
  try {
    const good = await readAdapterFolder(join(fx.modelDir, 'adapters', 'demo-1'));
    assert.equal((await putAdapter(fx.baseUrl, 'victim', good)).status, 201);
    // leave ~300 KB: the big adapter's config fits, its ~1.2 MB of weights run out of space mid-write
    const { bavail, bsize } = await statfs(mountPoint);
    const filler = join(mountPoint, 'filler');
    await writeFile(filler, Buffer.alloc(Number(bavail) * Number(bsize) - 300_000));
    const big = bigDemoAdapter(2);
    assert.ok(big.weights.length > 1_000_000);

    for (const id of ['victim', 'newcomer']) {
      const res = await putAdapter(fx.baseUrl, id, big);
      assert.equal(res.status, 507, JSON.stringify(res.json));
      assert.equal(res.json.error?.code, 'storage_full');
      assert.equal(res.json.error?.type, 'server_error');
      assert.match(res.json.error?.message ?? '', new RegExp(`cannot store adapter '${id}'.*out of space \\(ENOSPC\\); nothing was changed`));
      assert.ok(!res.json.error?.message.includes(mountPoint), 'the answer names no server folder');
    }
    await assertNoTempLeft(store);
    assert.equal(await assertAdapterWhole(fx.baseUrl, 'victim'), 1);
    assert.equal((await fetch(`${fx.baseUrl}/v1/adapters/newcomer`)).status, 404);
    assert.equal(await completionStatus(fx.baseUrl, 'victim'), 200);
    assert.equal(await completionStatus(fx.baseUrl, 'demo-0'), 200);

    // space back: the same upload is stored as the next version
    await unlink(filler);
    const retry = await putAdapter(fx.baseUrl, 'victim', big);
    assert.equal(retry.status, 200, JSON.stringify(retry.json));
    assert.equal(retry.json.version, 2);
    assert.equal(await assertAdapterWhole(fx.baseUrl, 'victim'), 2);
    assert.equal(await completionStatus(fx.baseUrl, 'victim'), 200);
  } finally {
    await fx.close();
    await run('umount', [mountPoint]);
    await rm(mountPoint, { recursive: true, force: true });
  }
});
