import * as tf from '@tensorflow/tfjs-core';
import { readFile, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { AdapterError, LoraGatewayError } from '../../errors.js';
import { LoraAdapter, loraModuleKey, type LoraModuleWeights } from './lora-adapter.js';
import { projectionShape, type ProjectionName } from '../architecture/llama-weights.js';
import type { ModelConfig } from '../architecture/model-config.js';
import { checkDeltaBounds } from './lora-delta-bounds.js';
import { resolvePeftConfig, type LoraModuleSpec } from './peft-config.js';
import { SafetensorsReader } from '../formats/safetensors.js';

export interface HostLoraModule {
  spec: LoraModuleSpec;
  /** lora_A as stored: [r, in], row-major. */
  a: Float32Array;
  /** lora_B as stored: [out, r], row-major. */
  b: Float32Array;
}

/** An adapter read and validated on the host, not yet on device. */
export interface HostLoraAdapter {
  id: string;
  modules: HostLoraModule[];
}

const KEY_RE = /^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$/;

/** The two files of a PEFT adapter, already read. */
export interface PeftAdapterBytes {
  config: Uint8Array;
  weights: Uint8Array;
}

/**
 * Reads `adapter_config.json` + `adapter_model.safetensors` and checks everything before
 * anything reaches the device: options, ranks, which modules the weights name, shapes,
 * finiteness, and that no module's scale and factors could overflow float32 (lora-delta-bounds).
 * Any failure is an AdapterError naming the file and the problem. With `bytes`, the files'
 * contents are taken from there (already read, e.g. to check their checksums) and `dir` only
 * names them in errors.
 */
export async function readPeftAdapter(dir: string, model: ModelConfig, maxRank: number, id = basename(dir), bytes?: PeftAdapterBytes): Promise<HostLoraAdapter> {
  const configFile = join(dir, 'adapter_config.json');
  let configJson: unknown;
  try {
    configJson = JSON.parse(bytes ? new TextDecoder().decode(bytes.config) : await readFile(configFile, 'utf8'));
  } catch (err) {
    throw new AdapterError('ADAPTER_CONFIG_INVALID', `${configFile}: ${(err as Error).message}`, { cause: err });
  }
  const specs = resolvePeftConfig(configJson, model, maxRank, configFile);
  const weightsFile = join(dir, 'adapter_model.safetensors');
  if (!bytes) await weightsFileExists(dir, weightsFile);
  let reader: SafetensorsReader;
  try {
    reader = bytes ? await SafetensorsReader.fromBytes(bytes.weights, weightsFile) : await SafetensorsReader.open(weightsFile);
  } catch (err) {
    throw asAdapterError(err);
  }
  return readModules(reader, specs, weightsFile, model, id);
}

async function weightsFileExists(dir: string, weightsFile: string): Promise<void> {
  try {
    await stat(weightsFile);
  } catch {
    const hasBin = await stat(join(dir, 'adapter_model.bin')).then(() => true, () => false);
    throw new AdapterError(
      'ADAPTER_WEIGHTS_INVALID',
      hasBin ? `${dir}: adapter_model.bin (pickle) is not read; save the adapter with safe_serialization=True` : `${weightsFile}: file is missing`,
    );
  }
}

/** Matches the weights to the config's modules, checks shapes, finiteness and delta bounds, and reads them. */
async function readModules(reader: SafetensorsReader, specs: LoraModuleSpec[], weightsFile: string, model: ModelConfig, id: string): Promise<HostLoraAdapter> {
  try {
    const byPath = new Map(specs.map((s) => [s.modulePath, s]));
    const names = new Map<string, { spec: LoraModuleSpec; which: 'A' | 'B' }>();
    for (const entry of reader.entries()) {
      const m = KEY_RE.exec(entry.name);
      const spec = m ? byPath.get(m[1]) : undefined;
      if (!m || !spec) {
        throw new AdapterError(
          'ADAPTER_MODULE_UNKNOWN',
          `${weightsFile}: tensor '${entry.name}' is not a lora_A/lora_B weight of a module adapter_config.json targets`,
        );
      }
      const which = m[2] as 'A' | 'B';
      const { inFeatures, outFeatures } = projectionShape(model, spec.proj);
      const want = which === 'A' ? [spec.rank, inFeatures] : [outFeatures, spec.rank];
      if (entry.shape.length !== 2 || entry.shape[0] !== want[0] || entry.shape[1] !== want[1]) {
        throw new AdapterError(
          'ADAPTER_SHAPE_MISMATCH',
          `${weightsFile}: '${entry.name}' has shape [${entry.shape.join(', ')}], expected [${want.join(', ')}] (rank ${spec.rank}, ${spec.proj} is ${inFeatures}→${outFeatures})`,
        );
      }
      names.set(entry.name, { spec, which });
    }
    const parts = new Map<LoraModuleSpec, { a?: Float32Array; b?: Float32Array }>();
    await reader.readTensors((entry, data) => {
      const n = names.get(entry.name)!;
      for (let i = 0; i < data.length; i++) {
        if (!Number.isFinite(data[i])) {
          throw new AdapterError('ADAPTER_WEIGHTS_INVALID', `${weightsFile}: '${entry.name}' holds a non-finite value (${data[i]}) at index ${i}`);
        }
      }
      const p = parts.get(n.spec) ?? {};
      if (n.which === 'A') p.a = data;
      else p.b = data;
      parts.set(n.spec, p);
    });
    const modules: HostLoraModule[] = [];
    for (const spec of specs) {
      const p = parts.get(spec);
      if (!p?.a || !p?.b) {
        throw new AdapterError('ADAPTER_WEIGHTS_INVALID', `${weightsFile}: lora_${p?.a ? 'B' : 'A'} weight of ${spec.modulePath} is missing`);
      }
      modules.push({ spec, a: p.a, b: p.b });
    }
    checkDeltaBounds(modules, weightsFile);
    return { id, modules };
  } catch (err) {
    throw asAdapterError(err);
  } finally {
    await reader.close();
  }
}

function asAdapterError(err: unknown): unknown {
  if (err instanceof AdapterError) return err;
  if (err instanceof LoraGatewayError) return new AdapterError('ADAPTER_WEIGHTS_INVALID', err.message, { cause: err });
  return err;
}

/** Uploads a validated host adapter to device tensors, transposed for fast matMul. */
export function uploadAdapter(host: HostLoraAdapter, model: ModelConfig): LoraAdapter {
  const modules = new Map<string, LoraModuleWeights>();
  const targets = new Set<ProjectionName>();
  for (const { spec, a, b } of host.modules) {
    const { inFeatures, outFeatures } = projectionShape(model, spec.proj);
    const [aT, bT] = tf.tidy(() => [
      tf.transpose(tf.tensor2d(a, [spec.rank, inFeatures])),
      tf.transpose(tf.tensor2d(b, [outFeatures, spec.rank])),
    ]) as [tf.Tensor2D, tf.Tensor2D];
    modules.set(loraModuleKey(spec.layer, spec.proj), { aT, bT, rank: spec.rank, scale: spec.scale });
    targets.add(spec.proj);
  }
  return new LoraAdapter(host.id, modules, targets);
}

export async function loadPeftAdapter(dir: string, model: ModelConfig, maxRank: number, id?: string): Promise<LoraAdapter> {
  return uploadAdapter(await readPeftAdapter(dir, model, maxRank, id), model);
}
