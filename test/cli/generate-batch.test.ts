import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { parseEngineConfig } from '../../src/config.js';
import { loadTokenizerIfPresent, runBatchLines, type GenerateContext } from '../../src/cli/generate-command.js';
import { peftConfigJson, writeModelFolder, writePeftAdapter } from '../../src/model/synthetic/hf-folder-writer.js';
import type { ProjectionName } from '../../src/model/architecture/llama-weights.js';
import { loadLlamaModel } from '../../src/model/forward/model-loader.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { resolvePeftConfig } from '../../src/model/lora/peft-config.js';
import { randomLlamaWeights, randomLoraWeights } from '../../src/model/synthetic/random-weights.js';
import { bf16BitsToF32, f16BitsToF32, f32ToBf16Bits, f32ToF16Bits, type StoredDtype } from '../../src/model/formats/safetensors.js';
import { logSoftmax, referenceForward, type ReferenceLora } from '../reference/llama-reference.js';
import { TINY_CONFIGS, useWasm } from '../helpers/tiny-models.js';

const run = promisify(execFile);
let root: string;

before(async () => {
  await useWasm();
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-generate-'));
});
after(async () => rm(root, { recursive: true, force: true }));

function roundTo(dtype: StoredDtype, data: Float32Array): Float64Array {
  if (dtype === 'BF16') return Float64Array.from(bf16BitsToF32(f32ToBf16Bits(data)));
  if (dtype === 'F16') return Float64Array.from(f16BitsToF32(f32ToF16Bits(data)));
  return Float64Array.from(data);
}

interface AdapterCase {
  name: string;
  r: number;
  alpha: number;
  targets: ProjectionName[];
  rslora?: boolean;
  layers?: number[];
  rankPattern?: Record<string, number>;
}

/** Writes a model folder and PEFT adapters as real files; returns what the reference needs. */
async function writeCase(name: string, cfg: Record<string, unknown>, dtype: StoredDtype, shards: number, adapters: AdapterCase[]) {
  const dir = join(root, name);
  const weights = randomLlamaWeights(cfg, name.length * 17);
  await writeModelFolder(dir, cfg, weights, { dtype, shards });
  const refWeights = new Map([...weights].map(([k, v]) => [k, roundTo(dtype, v)]));
  const model = parseModelConfig(cfg);
  const refAdapters = new Map<string, ReferenceLora>();
  for (const [i, a] of adapters.entries()) {
    const json = peftConfigJson({ r: a.r, loraAlpha: a.alpha, targetModules: a.targets, useRslora: a.rslora, layersToTransform: a.layers, rankPattern: a.rankPattern });
    const specs = resolvePeftConfig(json, model, 64);
    const w = randomLoraWeights(cfg, specs, 300 + i, 0.2);
    const adapterDir = join(dir, 'adapters', a.name);
    await writePeftAdapter(adapterDir, json, w, dtype);
    const ref: ReferenceLora = { modules: new Map() };
    for (const s of specs) {
      ref.modules.set(s.modulePath, {
        a: roundTo(dtype, w.get(`base_model.model.${s.modulePath}.lora_A.weight`)!.data),
        b: roundTo(dtype, w.get(`base_model.model.${s.modulePath}.lora_B.weight`)!.data),
        rank: s.rank,
        scale: s.scale,
      });
    }
    refAdapters.set(adapterDir, ref);
  }
  return { dir, refWeights, refAdapters };
}

const FILE_CASES: { name: string; cfg: string; dtype: StoredDtype; shards: number }[] = [
  { name: 'f32-gqa', cfg: 'gqa', dtype: 'F32', shards: 1 },
  { name: 'bf16-mqa', cfg: 'mqa', dtype: 'BF16', shards: 1 },
  { name: 'f16-tied', cfg: 'tied', dtype: 'F16', shards: 1 },
  { name: 'sharded-llama3', cfg: 'llama3Rope', dtype: 'F32', shards: 3 },
  { name: 'bf16-sharded-mha', cfg: 'mha', dtype: 'BF16', shards: 2 },
];

const ADAPTERS: AdapterCase[] = [
  { name: 'r4-attn', r: 4, alpha: 8, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] },
  { name: 'r64-rslora-all', r: 64, alpha: 16, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], rslora: true },
  { name: 'r16-mlp-layer1', r: 16, alpha: 32, targets: ['gate_proj', 'up_proj', 'down_proj'], layers: [1] },
  { name: 'r8-pattern', r: 8, alpha: 8, targets: ['q_proj', 'v_proj'], rankPattern: { v_proj: 2 } },
];

describe('generate --batch on real Hugging Face / PEFT files agrees with the float64 reference', () => {
  for (const fc of FILE_CASES) {
    test(`${fc.name}: echo + logprobs 5 within 1e-4, greedy tokens follow the reference argmax`, async () => {
      const cfg = TINY_CONFIGS[fc.cfg];
      const { dir, refWeights, refAdapters } = await writeCase(fc.name, cfg, fc.dtype, fc.shards, ADAPTERS);
      const model = await loadLlamaModel(dir);
      const ctx: GenerateContext = { model, tokenizer: await loadTokenizerIfPresent(dir), config: parseEngineConfig({}), adapters: new Map() };
      try {
        const adapterDirs = [null, ...refAdapters.keys()];
        const lines = adapterDirs.map((a, i) => ({
          id: `line-${i}`,
          prompt_ids: [1, 5 + i, 9, 33, 2 * i + 3, 17, 40].slice(0, 4 + i),
          adapter: a,
          max_tokens: 5,
          temperature: 0,
          logprobs: 5,
          echo: true,
          ignore_eos: true,
        }));
        const out = (await runBatchLines(ctx, lines)) as {
          id: string;
          prompt_ids: number[];
          token_ids: number[];
          finish_reason: string;
          logprobs: { token_id: number; logprob: number; top: { token_id: number; logprob: number }[] }[];
          prompt_logprobs: ({ token_id: number; logprob: number; top: { token_id: number; logprob: number }[] } | null)[];
        }[];
        out.forEach((o, i) => {
          assert.equal(o.id, lines[i].id);
          assert.equal(o.finish_reason, 'length');
          assert.equal(o.token_ids.length, 5);
          const seq = [...o.prompt_ids, ...o.token_ids];
          const ref = referenceForward(cfg, refWeights, seq, adapterDirs[i] ? refAdapters.get(adapterDirs[i]!) : undefined).map(logSoftmax);
          assert.equal(o.prompt_logprobs[0], null);
          const check = (pos: number, got: { token_id: number; logprob: number; top: { token_id: number; logprob: number }[] }) => {
            const want = ref[pos - 1];
            assert.equal(got.token_id, seq[pos]);
            assert.ok(Math.abs(got.logprob - want[seq[pos]]) < 1e-4, `line ${i} position ${pos}: ${got.logprob} vs ${want[seq[pos]]}`);
            assert.equal(got.top.length, 5);
            for (const t of got.top) assert.ok(Math.abs(t.logprob - want[t.token_id]) < 1e-4);
            const best = Math.max(...want);
            assert.ok(Math.abs(got.top[0].logprob - best) < 1e-4, 'top-1 is the reference maximum');
          };
          for (let t = 1; t < o.prompt_ids.length; t++) check(t, o.prompt_logprobs[t]!);
          o.logprobs.forEach((lp, k) => {
            const pos = o.prompt_ids.length + k;
            check(pos, lp);
            // greedy: the chosen token is the reference's argmax up to float32 near-ties
            assert.ok(ref[pos - 1][lp.token_id] > Math.max(...ref[pos - 1]) - 1e-4);
          });
        });
      } finally {
        for (const a of ctx.adapters.values()) (await a).dispose();
        model.dispose();
      }
    });
  }

  test('an invalid line gets an error object; the other lines still run', async () => {
    const { dir } = await writeCase('errors', TINY_CONFIGS.gqa, 'F32', 1, []);
    const model = await loadLlamaModel(dir);
    const ctx: GenerateContext = { model, tokenizer: undefined, config: parseEngineConfig({}), adapters: new Map() };
    try {
      const out = (await runBatchLines(ctx, [
        { id: 'ok', prompt_ids: [1, 2, 3], max_tokens: 2, ignore_eos: true },
        { id: 'too-long', prompt_ids: [1, 2, 3], max_tokens: 1000 },
        { id: 'bad-token', prompt_ids: [1, 99999] },
        { id: 'no-adapter', prompt_ids: [1], adapter: join(root, 'does-not-exist') },
        { id: 'both', prompt: 'x', prompt_ids: [1] },
      ])) as { id: string; error?: { code: string }; token_ids?: number[] }[];
      assert.equal(out[0].token_ids?.length, 2);
      assert.equal(out[1].error?.code, 'CONTEXT_LENGTH_EXCEEDED');
      assert.equal(out[2].error?.code, 'REQUEST_INVALID');
      assert.equal(out[3].error?.code, 'ADAPTER_CONFIG_INVALID');
      assert.equal(out[4].error?.code, 'REQUEST_INVALID');
    } finally {
      model.dispose();
    }
  });

  test('serving 200 requests leaves tf.memory().numTensors where it started', async () => {
    const { dir, refAdapters } = await writeCase('leak', TINY_CONFIGS.gqa, 'F32', 1, ADAPTERS.slice(0, 2));
    const model = await loadLlamaModel(dir);
    const ctx: GenerateContext = { model, tokenizer: undefined, config: parseEngineConfig({}), adapters: new Map() };
    const adapters = [null, ...refAdapters.keys()];
    // load the adapters once, so the count below measures serving, not residency
    await runBatchLines(ctx, adapters.map((a) => ({ prompt_ids: [1], adapter: a, max_tokens: 1 })));
    const before = tf.memory().numTensors;
    for (let round = 0; round < 10; round++) {
      const lines = Array.from({ length: 20 }, (_, i) => ({
        prompt_ids: [1, 2 + i, 3 + round],
        adapter: adapters[i % adapters.length],
        max_tokens: 1 + (i % 4),
        temperature: i % 2 ? 0.8 : 0,
        seed: i,
        logprobs: 2,
        echo: i % 3 === 0,
        ignore_eos: true,
      }));
      const out = await runBatchLines(ctx, lines);
      assert.equal(out.length, 20);
    }
    assert.equal(tf.memory().numTensors, before);
    for (const a of ctx.adapters.values()) (await a).dispose();
    model.dispose();
  });
});

describe('the lora-gateway command', () => {
  test('generate --batch prints one JSON line per input line, in order', async () => {
    const { dir, refAdapters } = await writeCase('cli', TINY_CONFIGS.gqa, 'BF16', 1, ADAPTERS.slice(0, 1));
    const [adapterDir] = refAdapters.keys();
    const batchFile = join(root, 'batch.jsonl');
    await writeFile(
      batchFile,
      [
        { id: 'a', prompt_ids: [1, 2, 3], adapter: adapterDir, max_tokens: 3, logprobs: 2, ignore_eos: true },
        { id: 'b', prompt_ids: [4, 5], adapter: null, max_tokens: 2, echo: true, ignore_eos: true },
      ]
        .map((l) => JSON.stringify(l))
        .join('\n'),
    );
    const { stdout, stderr } = await run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'generate', '--model', dir, '--batch', batchFile, '--backend', 'wasm']);
    assert.match(stderr, /tensor backend: wasm/);
    const lines = stdout.trim().split('\n').map((l) => JSON.parse(l));
    assert.deepEqual(lines.map((l) => l.id), ['a', 'b']);
    assert.equal(lines[0].token_ids.length, 3);
    assert.equal(lines[0].logprobs[0].top.length, 2);
    assert.equal(lines[1].prompt_logprobs.length, 2);
    assert.equal(lines[1].prompt_logprobs[0], null);
  });

  test('generate --batch gives a line that is not JSON an error line of its own; the other lines still run', async () => {
    const { dir } = await writeCase('cli-bad-json', TINY_CONFIGS.gqa, 'F32', 1, []);
    const batchFile = join(root, 'batch-bad.jsonl');
    await writeFile(batchFile, [JSON.stringify({ id: 'a', prompt_ids: [1, 2], max_tokens: 1 }), '{"id": "b", "prompt_ids": [1,', '', JSON.stringify({ id: 'c', prompt_ids: [3], max_tokens: 1 })].join('\n'));
    const { stdout } = await run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'generate', '--model', dir, '--batch', batchFile, '--backend', 'wasm']);
    const lines = stdout.trim().split('\n').map((l) => JSON.parse(l));
    assert.equal(lines.length, 3);
    assert.equal(lines[0].id, 'a');
    assert.equal(lines[0].token_ids.length, 1);
    assert.equal(lines[1].error.code, 'REQUEST_INVALID');
    assert.match(lines[1].error.message, /batch-bad\.jsonl:2: not valid JSON/);
    assert.equal(lines[2].id, 'c');
  });

  test('--version prints the package version', async () => {
    const { stdout } = await run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', '--version']);
    assert.match(stdout, /^lora-gateway \d+\.\d+\.\d+\n$/);
  });

  test('demo-model into a folder that had more adapters leaves exactly the new ones; demo runs on a model with none', async () => {
    const data = join(root, 'demo-data');
    const dir = join(data, 'demo-model');
    const cli = (...args: string[]) => run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args]);
    await cli('demo-model', '--out', dir, '--adapters', '3');
    await cli('demo-model', '--out', dir, '--adapters', '1');
    const { readdir } = await import('node:fs/promises');
    assert.deepEqual((await readdir(join(dir, 'adapters'))).sort(), ['demo-0']);
    await cli('demo-model', '--out', dir, '--adapters', '0');
    // --data is the data folder for demo as for serve: the model is <data>/demo-model
    const { stdout } = await cli('demo', '--data', data, '--backend', 'wasm');
    const lines = stdout.trim().split('\n').map((l) => JSON.parse(l));
    assert.equal(lines.length, 1, 'the base model alone');
    assert.equal(lines[0].id, 'base');
  });

  test('demo-model writes a loadable model with adapters; streamed text equals the JSON text', async () => {
    const dir = join(root, 'demo');
    const cli = (...args: string[]) => run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args]);
    await cli('demo-model', '--out', dir, '--adapters', '2', '--dtype', 'BF16');
    const common = ['generate', '--model', dir, '--adapter', join(dir, 'adapters', 'demo-1'), '--prompt', 'café naïve', '--max-tokens', '10', '--ignore-eos', '--temperature', '0.9', '--seed', '5'];
    const plain = await cli(...common);
    const json = JSON.parse((await cli(...common, '--json')).stdout);
    assert.equal(json.token_ids.length, 10);
    assert.equal(plain.stdout, `${json.text}\n`);
    assert.ok(!plain.stdout.includes('\uFFFD') || json.text.includes('\uFFFD'));
  });

  test('a bad model folder exits 1 with the error code on stderr', async () => {
    const empty = join(root, 'empty');
    await writeModelFolder(empty, TINY_CONFIGS.gqa, randomLlamaWeights(TINY_CONFIGS.gqa, 1));
    await writeFile(join(empty, 'model.safetensors'), Buffer.from([1, 2, 3]));
    await assert.rejects(
      run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'generate', '--model', empty, '--prompt-ids', '1,2']),
      (e: { code?: number; stderr?: string }) => e.code === 1 && /SAFETENSORS_TOO_SHORT/.test(e.stderr ?? ''),
    );
  });
});

