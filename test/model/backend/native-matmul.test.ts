import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import { writeDemoModel } from '../../../src/cli/demo-model-command.js';
import { chooseOpenBlasCore, matMulPath } from '../../../src/model/backend/native-matmul.js';
import { SeededRandom } from '../../../src/model/synthetic/seeded-random.js';
import { useWasm } from '../../helpers/tiny-models.js';

const run = promisify(execFile);
const ADDON_BUILT = existsSync(new URL('../../../native/blas/build/Release/lora_gateway_blas.node', import.meta.url));
let root: string;

before(async () => {
  await useWasm();
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-blas-'));
});
after(async () => rm(root, { recursive: true, force: true }));

/** The slow obvious matrix product in float64: out[b] = op(a[b or 0]) · op(c[b or 0]). */
function reference(a: Float32Array, aShape: number[], b: Float32Array, bShape: number[], ta: boolean, tb: boolean): Float64Array {
  const [ba, ra, ca] = aShape;
  const [bb, rb, cb] = bShape;
  const m = ta ? ca : ra;
  const k = ta ? ra : ca;
  const n = tb ? rb : cb;
  const batch = Math.max(ba, bb);
  const out = new Float64Array(batch * m * n);
  for (let i = 0; i < batch; i++) {
    const oa = (ba === 1 ? 0 : i) * ra * ca;
    const ob = (bb === 1 ? 0 : i) * rb * cb;
    for (let r = 0; r < m; r++) {
      for (let c = 0; c < n; c++) {
        let s = 0;
        for (let p = 0; p < k; p++) s += a[oa + (ta ? p * ca + r : r * ca + p)] * b[ob + (tb ? c * cb + p : p * cb + c)];
        out[(i * m + r) * n + c] = s;
      }
    }
  }
  return out;
}

test('the wasm backend takes the native OpenBLAS path whenever the addon is built and not turned off', () => {
  const path = matMulPath()!;
  assert.ok(path, 'resolved with the wasm backend');
  const off = /^(off|0|false)$/i.test(process.env.LORA_GATEWAY_NATIVE_BLAS ?? '');
  assert.equal(path.native, ADDON_BUILT && !off, path.detail);
  if (path.native) assert.match(path.detail, /OpenBLAS sgemm, \d+ thread/);
});

test('matMul equals a float64 reference on every shape class: transposes, batches, broadcasts, tiny and large', () => {
  const rng = new SeededRandom(11);
  const cases: [number[], number[], boolean, boolean][] = [
    [[1, 64, 96], [1, 96, 80], false, false],
    [[1, 96, 64], [1, 96, 80], true, false],
    [[1, 64, 96], [1, 80, 96], false, true],
    [[1, 96, 64], [1, 80, 96], true, true],
    [[6, 33, 40], [6, 40, 17], false, false],
    [[6, 33, 40], [1, 40, 70], false, false],
    [[1, 33, 40], [5, 70, 40], false, true],
    [[2, 3, 4], [2, 4, 5], false, false],
    [[1, 1, 576], [1, 576, 300], false, false],
    [[1, 300, 576], [1, 576, 1], false, false],
    // one row (the sgemv path), every transpose, batched with and without broadcast
    [[1, 1, 96], [1, 96, 70], false, false],
    [[1, 96, 1], [1, 96, 70], true, false],
    [[1, 1, 96], [1, 70, 96], false, true],
    [[1, 96, 1], [1, 70, 96], true, true],
    [[4, 1, 40], [4, 40, 9], false, false],
    [[4, 1, 40], [1, 9, 40], false, true],
    // many tiny products (the loop path: decode attention), plain, transposed A, broadcast
    [[6, 2, 64], [6, 64, 80], false, false],
    [[6, 64, 3], [6, 64, 80], true, false],
    [[5, 8, 40], [1, 40, 17], false, false],
    [[5, 2, 40], [5, 17, 40], false, true],
  ];
  const before = tf.memory().numTensors;
  for (const [sa, sb, ta, tb] of cases) {
    const a = rng.normalArray(sa.reduce((x, y) => x * y), 1);
    const b = rng.normalArray(sb.reduce((x, y) => x * y), 1);
    const got = tf.tidy(() => tf.matMul(tf.tensor3d(a, sa as [number, number, number]), tf.tensor3d(b, sb as [number, number, number]), ta, tb).dataSync());
    const want = reference(a, sa, b, sb, ta, tb);
    assert.equal(got.length, want.length);
    let worst = 0;
    for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]) / (1 + Math.abs(want[i])));
    assert.ok(worst < 1e-4, `${JSON.stringify([sa, sb, ta, tb])}: worst relative error ${worst}`);
  }
  // rank 4 with a broadcast batch, as attention's scores use it
  const q = tf.randomNormal([2, 3, 4, 8], 0, 1, 'float32', 3);
  const k = tf.randomNormal([2, 3, 8, 5], 0, 1, 'float32', 4);
  const got = tf.matMul(q, k);
  assert.deepEqual(got.shape, [2, 3, 4, 5]);
  const want = reference(q.dataSync() as Float32Array, [6, 4, 8], k.dataSync() as Float32Array, [6, 8, 5], false, false);
  const g = got.dataSync();
  for (let i = 0; i < want.length; i++) assert.ok(Math.abs(g[i] - want[i]) < 1e-4);
  tf.dispose([q, k, got]);
  assert.equal(tf.memory().numTensors, before);
});

test('with LORA_GATEWAY_NATIVE_BLAS=off the CLI says it falls back to wasm, and both paths give the same logprobs', async () => {
  const modelDir = join(root, 'model');
  await writeDemoModel(modelDir, { adapters: 1 });
  const args = ['--import', 'tsx', 'src/cli/main.ts', 'generate', '--model', modelDir, '--adapter', join(modelDir, 'adapters', 'demo-0'), '--prompt', 'The quick brown fox', '--max-tokens', '6', '--logprobs', '3', '--echo', '--json', '--backend', 'wasm'];
  const fallback = await run(process.execPath, args, { env: { ...process.env, LORA_GATEWAY_NATIVE_BLAS: 'off' } });
  assert.match(fallback.stderr, /matrix products: wasm XNNPACK, one thread \(turned off by LORA_GATEWAY_NATIVE_BLAS\)/);
  const native = await run(process.execPath, args, { env: { ...process.env, LORA_GATEWAY_NATIVE_BLAS: 'auto' } });
  assert.match(native.stderr, ADDON_BUILT ? /matrix products: OpenBLAS sgemm/ : /matrix products: wasm XNNPACK/);
  type Out = { token_ids: number[]; logprobs: { logprob: number }[]; prompt_logprobs: ({ logprob: number } | null)[] };
  const f = JSON.parse(fallback.stdout) as Out;
  const n = JSON.parse(native.stdout) as Out;
  assert.deepEqual(n.token_ids, f.token_ids);
  n.logprobs.forEach((lp, i) => assert.ok(Math.abs(lp.logprob - f.logprobs[i].logprob) < 1e-4));
  n.prompt_logprobs.forEach((lp, i) => assert.ok(lp === null || Math.abs(lp.logprob - f.prompt_logprobs[i]!.logprob) < 1e-4));
});

test("OpenBLAS's kernels are chosen from the CPU's flags unless OPENBLAS_CORETYPE is set", () => {
  const cpu = (flags: string) => `processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 ${flags}\n`;
  assert.equal(chooseOpenBlasCore(cpu('avx2 fma avx512f avx512bw avx512dq avx512vl'), {}), 'SkylakeX');
  assert.equal(chooseOpenBlasCore(cpu('avx2 fma avx512f'), {}), 'Haswell', 'partial AVX-512 is not enough for SkylakeX kernels');
  assert.equal(chooseOpenBlasCore(cpu('avx sse4_2'), {}), undefined, 'older CPUs keep OpenBLAS own detection');
  assert.equal(chooseOpenBlasCore(cpu('avx2 fma avx512f avx512bw avx512dq avx512vl'), { OPENBLAS_CORETYPE: 'Haswell' }), undefined, "the user's choice stands");
  assert.equal(chooseOpenBlasCore(undefined, {}), undefined);
  if (matMulPath()?.native && process.env.OPENBLAS_CORETYPE === 'SkylakeX') assert.match(matMulPath()!.detail, /SkylakeX kernels/);
});
