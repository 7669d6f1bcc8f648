import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { checkpointLayout, type ProjectionName } from '../architecture/llama-weights.js';
import { parseModelConfig } from '../architecture/model-config.js';
import { encodeSafetensors, type StoredDtype, type TensorToWrite } from '../formats/safetensors.js';

/**
 * Writers for the real Hugging Face and PEFT folder layouts. The demo model, the tests and
 * the benchmarks make their models with these, so nothing is ever downloaded.
 */

export interface ModelFolderOptions {
  dtype?: StoredDtype;
  /** Split the checkpoint into this many shards with a model.safetensors.index.json. */
  shards?: number;
  tokenizerJson?: object;
  tokenizerConfig?: object;
  generationConfig?: object;
}

/** Writes config.json, the safetensors checkpoint (sharded or not) and tokenizer files. */
export async function writeModelFolder(
  dir: string,
  configJson: Record<string, unknown>,
  weights: Map<string, Float32Array>,
  options: ModelFolderOptions = {},
): Promise<void> {
  await mkdir(dir, { recursive: true });
  const dtype = options.dtype ?? 'F32';
  await writeFile(join(dir, 'config.json'), JSON.stringify({ ...configJson, torch_dtype: torchDtype(dtype) }, null, 2));
  const config = parseModelConfig(configJson);
  const tensors: TensorToWrite[] = [...checkpointLayout(config)].map(([name, shape]) => ({ name, shape, dtype, data: weights.get(name)! }));
  const shards = Math.max(1, options.shards ?? 1);
  if (shards === 1) {
    await writeFile(join(dir, 'model.safetensors'), encodeSafetensors(tensors, { format: 'pt' }));
  } else {
    const weightMap: Record<string, string> = {};
    const per = Math.ceil(tensors.length / shards);
    let totalSize = 0;
    for (let s = 0; s < shards; s++) {
      const file = `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`;
      const part = tensors.slice(s * per, (s + 1) * per);
      for (const t of part) {
        weightMap[t.name] = file;
        totalSize += t.data.length * (dtype === 'F32' ? 4 : 2);
      }
      await writeFile(join(dir, file), encodeSafetensors(part, { format: 'pt' }));
    }
    await writeFile(
      join(dir, 'model.safetensors.index.json'),
      JSON.stringify({ metadata: { total_size: totalSize }, weight_map: weightMap }, null, 2),
    );
  }
  if (options.tokenizerJson) await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(options.tokenizerJson));
  if (options.tokenizerConfig) await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify(options.tokenizerConfig, null, 2));
  if (options.generationConfig) await writeFile(join(dir, 'generation_config.json'), JSON.stringify(options.generationConfig, null, 2));
}

function torchDtype(d: StoredDtype): string {
  return d === 'F32' ? 'float32' : d === 'F16' ? 'float16' : 'bfloat16';
}

export interface PeftAdapterSpec {
  r: number;
  loraAlpha: number;
  targetModules: ProjectionName[] | string;
  useRslora?: boolean;
  layersToTransform?: number[];
  rankPattern?: Record<string, number>;
  alphaPattern?: Record<string, number>;
  baseModelName?: string;
}

export function peftConfigJson(spec: PeftAdapterSpec): Record<string, unknown> {
  return {
    peft_type: 'LORA',
    task_type: 'CAUSAL_LM',
    base_model_name_or_path: spec.baseModelName ?? null,
    r: spec.r,
    lora_alpha: spec.loraAlpha,
    lora_dropout: 0,
    target_modules: spec.targetModules,
    layers_to_transform: spec.layersToTransform ?? null,
    rank_pattern: spec.rankPattern ?? {},
    alpha_pattern: spec.alphaPattern ?? {},
    use_rslora: spec.useRslora ?? false,
    use_dora: false,
    bias: 'none',
    fan_in_fan_out: false,
    modules_to_save: null,
    inference_mode: true,
  };
}

/** Writes adapter_config.json + adapter_model.safetensors as PEFT's save_pretrained does. */
export async function writePeftAdapter(
  dir: string,
  configJson: Record<string, unknown>,
  weights: Map<string, { shape: number[]; data: Float32Array }>,
  dtype: StoredDtype = 'F32',
): Promise<void> {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'adapter_config.json'), JSON.stringify(configJson, null, 2));
  const tensors: TensorToWrite[] = [...weights].map(([name, t]) => ({ name, shape: t.shape, dtype, data: t.data }));
  await writeFile(join(dir, 'adapter_model.safetensors'), encodeSafetensors(tensors, { format: 'pt' }));
}
