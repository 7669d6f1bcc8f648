import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { AdapterError, ModelFormatError } from '../../../src/errors.js';
import { peftConfigJson, writeModelFolder, writePeftAdapter } from '../../../src/model/synthetic/hf-folder-writer.js';
import { loadLlamaModel } from '../../../src/model/forward/model-loader.js';
import { parseModelConfig } from '../../../src/model/architecture/model-config.js';
import { loadPeftAdapter } from '../../../src/model/lora/peft-adapter-reader.js';
import { resolvePeftConfig } from '../../../src/model/lora/peft-config.js';
import { randomLlamaWeights, randomLoraWeights } from '../../../src/model/synthetic/random-weights.js';
import { TINY_CONFIGS, useWasm } from '../../helpers/tiny-models.js';

const run = promisify(execFile);
const cfg = TINY_CONFIGS.gqa;
const model = parseModelConfig(cfg);
let root: string;

before(async () => {
  await useWasm();
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-files-'));
});
after(async () => rm(root, { recursive: true, force: true }));

async function modelFolder(name: string, edit?: (w: Map<string, Float32Array>) => void, cfgOver: Record<string, unknown> = {}): Promise<string> {
  const dir = join(root, name);
  const weights = randomLlamaWeights(cfg, 1);
  edit?.(weights);
  await writeModelFolder(dir, { ...cfg, ...cfgOver }, weights);
  return dir;
}

async function adapterFolder(name: string, config: Record<string, unknown>, edit?: (w: Map<string, { shape: number[]; data: Float32Array }>) => void): Promise<string> {
  const dir = join(root, 'adapters', name);
  const specs = resolvePeftConfig({ ...config, r: Math.min(config.r as number, 64) }, model, 64);
  const w = randomLoraWeights(cfg, specs.map((s) => ({ ...s, rank: config.r as number })), 9);
  edit?.(w);
  await writePeftAdapter(dir, config, w);
  return dir;
}

function isCode<T extends Error>(type: new (...a: never[]) => T, code: string, pattern?: RegExp) {
  return (e: unknown) => e instanceof type && (e as unknown as { code: string }).code === code && (!pattern || pattern.test(e.message));
}

describe('model folders', () => {
  test('a tensor whose shape does not fit config.json is refused, naming tensor and both shapes, leaving no tensors', async () => {
    const dir = await modelFolder('shape', undefined, {});
    // the same file read under a config with a wider MLP
    await writeFile(join(dir, 'config.json'), JSON.stringify({ ...cfg, intermediate_size: 64 }));
    const before = tf.memory().numTensors;
    await assert.rejects(loadLlamaModel(dir), isCode(ModelFormatError, 'TENSOR_SHAPE_MISMATCH', /gate_proj\.weight.*\[48, 32\].*\[64, 32\]/));
    assert.equal(tf.memory().numTensors, before);
  });

  test('a missing tensor is refused by name', async () => {
    const dir = await modelFolder('missing');
    await writeFile(join(dir, 'config.json'), JSON.stringify({ ...cfg, architectures: ['Qwen2ForCausalLM'] }));
    await assert.rejects(loadLlamaModel(dir), isCode(ModelFormatError, 'TENSOR_MISSING', /q_proj\.bias/));
  });

  test('a folder without weights or config is refused with MODEL_FILE_MISSING', async () => {
    const dir = await modelFolder('noweights');
    await unlink(join(dir, 'model.safetensors'));
    await assert.rejects(loadLlamaModel(dir), isCode(ModelFormatError, 'MODEL_FILE_MISSING'));
    await assert.rejects(loadLlamaModel(join(root, 'nowhere')), isCode(ModelFormatError, 'MODEL_FILE_MISSING', /config\.json/));
  });
});

describe('PEFT adapter folders', () => {
  const good = peftConfigJson({ r: 8, loraAlpha: 16, targetModules: ['q_proj', 'v_proj'] });

  test('a valid adapter loads with its rank, targets and size', async () => {
    const dir = await adapterFolder('good', good);
    const a = await loadPeftAdapter(dir, model, 64);
    assert.equal(a.id, 'good');
    assert.equal(a.rank, 8);
    assert.deepEqual([...a.targets].sort(), ['q_proj', 'v_proj']);
    assert.equal(a.modules.size, 2 * model.numLayers);
    a.dispose();
  });

  test('weights whose shapes do not fit the base are refused with both shapes', async () => {
    const dir = await adapterFolder('badshape', good, (w) => {
      const k = 'base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight';
      w.set(k, { shape: [99, 8], data: new Float32Array(99 * 8) });
    });
    await assert.rejects(loadPeftAdapter(dir, model, 64), isCode(AdapterError, 'ADAPTER_SHAPE_MISMATCH', /\[99, 8\].*\[16, 8\]/));
  });

  test('NaN or infinite weights are refused', async () => {
    const dir = await adapterFolder('nan', good, (w) => {
      w.get('base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight')!.data[3] = NaN;
    });
    await assert.rejects(loadPeftAdapter(dir, model, 64), isCode(AdapterError, 'ADAPTER_WEIGHTS_INVALID', /non-finite/));
  });

  test('a missing lora_B or a weight for an untargeted module is refused', async () => {
    const missing = await adapterFolder('missingB', good, (w) => w.delete('base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight'));
    await assert.rejects(loadPeftAdapter(missing, model, 64), isCode(AdapterError, 'ADAPTER_WEIGHTS_INVALID', /lora_B.*layers\.0\.self_attn\.q_proj/));
    const extra = await adapterFolder('extra', good, (w) =>
      w.set('base_model.model.model.layers.0.mlp.up_proj.lora_A.weight', { shape: [8, 32], data: new Float32Array(256) }),
    );
    await assert.rejects(loadPeftAdapter(extra, model, 64), isCode(AdapterError, 'ADAPTER_MODULE_UNKNOWN', /up_proj/));
  });

  test('a rank over the maximum is refused before any weight is read', async () => {
    const dir = await adapterFolder('bigrank', peftConfigJson({ r: 32, loraAlpha: 16, targetModules: ['q_proj'] }));
    await assert.rejects(loadPeftAdapter(dir, model, 16), isCode(AdapterError, 'ADAPTER_RANK_TOO_LARGE', /32.*16/));
  });

  test('a truncated adapter_model.safetensors is an adapter error, not a crash', async () => {
    const dir = await adapterFolder('truncated', good);
    await writeFile(join(dir, 'adapter_model.safetensors'), Buffer.from([200, 0, 0, 0, 0, 0, 0, 0, 123]));
    await assert.rejects(loadPeftAdapter(dir, model, 64), isCode(AdapterError, 'ADAPTER_WEIGHTS_INVALID', /header/));
  });
});

describe('tensor backend', () => {
  test('asking for the native backend where it cannot load exits with BACKEND_UNAVAILABLE', async (t) => {
    const nativePackage = '@tensorflow/tfjs-node';
    const native = await import(nativePackage).then(
      () => true,
      () => false,
    );
    if (native) {
      t.skip('tfjs-node loads on this machine');
      return;
    }
    await assert.rejects(
      run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'generate', '--model', root, '--prompt-ids', '1', '--backend', 'tensorflow']),
      (e: { code?: number; stderr?: string }) => e.code === 1 && /BACKEND_UNAVAILABLE/.test(e.stderr ?? ''),
    );
  });
});
