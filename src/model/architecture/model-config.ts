import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { ModelFormatError } from '../../errors.js';

/** RoPE frequency scaling, per transformers' `modeling_rope_utils`. */
export type RopeScaling =
  | { type: 'default' }
  | { type: 'linear'; factor: number }
  | {
      type: 'llama3';
      factor: number;
      lowFreqFactor: number;
      highFreqFactor: number;
      originalMaxPositionEmbeddings: number;
    };

/** The model's shape and semantics, with transformers' defaults already applied. */
export interface ModelConfig {
  architecture: 'LlamaForCausalLM' | 'MistralForCausalLM' | 'Qwen2ForCausalLM';
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: RopeScaling;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  /** Bias on q/k/v projections (Qwen2 always; Llama when `attention_bias`). */
  qkvBias: boolean;
  /** Bias on o_proj (Llama `attention_bias` only; Qwen2 has none). */
  oBias: boolean;
  mlpBias: boolean;
  /** Mistral's sliding-window attention: key j is visible from query i when i - j < window. */
  slidingWindow: number | undefined;
  bosTokenId: number | undefined;
  eosTokenIds: number[];
}

const ARCHITECTURES = ['LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM'] as const;

const tokenIds = z.union([z.number().int(), z.array(z.number().int())]).nullish();
const positiveInt = z.number().int().positive();

const rawRope = z
  .object({
    type: z.string().optional(),
    rope_type: z.string().optional(),
    factor: z.number().positive().optional(),
    low_freq_factor: z.number().optional(),
    high_freq_factor: z.number().optional(),
    original_max_position_embeddings: z.number().int().positive().optional(),
    rope_theta: z.number().positive().optional(),
  })
  .passthrough();

const rawConfig = z
  .object({
    architectures: z.array(z.string()).nonempty().optional(),
    model_type: z.string().optional(),
    hidden_size: positiveInt,
    intermediate_size: positiveInt,
    num_hidden_layers: positiveInt,
    num_attention_heads: positiveInt,
    num_key_value_heads: positiveInt.nullish(),
    head_dim: positiveInt.nullish(),
    vocab_size: positiveInt,
    rms_norm_eps: z.number().positive().optional(),
    rope_theta: z.number().positive().optional(),
    rope_scaling: rawRope.nullish(),
    // transformers v5 folds rope_theta and rope_scaling into one object
    rope_parameters: rawRope.nullish(),
    max_position_embeddings: positiveInt.optional(),
    tie_word_embeddings: z.boolean().optional(),
    attention_bias: z.boolean().optional(),
    mlp_bias: z.boolean().optional(),
    hidden_act: z.string().optional(),
    sliding_window: positiveInt.nullish(),
    use_sliding_window: z.boolean().optional(),
    bos_token_id: tokenIds,
    eos_token_id: tokenIds,
  })
  .passthrough();

function toList(v: number | number[] | null | undefined): number[] {
  if (v === null || v === undefined) return [];
  return Array.isArray(v) ? v : [v];
}

function parseRope(file: string, rope: z.infer<typeof rawRope> | null | undefined): RopeScaling {
  if (!rope) return { type: 'default' };
  const type = rope.rope_type ?? rope.type ?? 'default';
  if (type === 'default') return { type: 'default' };
  if (rope.factor === undefined) {
    throw new ModelFormatError('MODEL_CONFIG_INVALID', file, `rope_scaling of type '${type}' needs a 'factor'`);
  }
  if (type === 'linear') return { type: 'linear', factor: rope.factor };
  if (type === 'llama3') {
    const { low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: orig } = rope;
    if (low === undefined || high === undefined || orig === undefined) {
      throw new ModelFormatError(
        'MODEL_CONFIG_INVALID',
        file,
        'rope_scaling llama3 needs low_freq_factor, high_freq_factor and original_max_position_embeddings',
      );
    }
    if (!(high > low)) {
      throw new ModelFormatError('MODEL_CONFIG_INVALID', file, `rope_scaling llama3 needs high_freq_factor (${high}) > low_freq_factor (${low})`);
    }
    return { type: 'llama3', factor: rope.factor, lowFreqFactor: low, highFreqFactor: high, originalMaxPositionEmbeddings: orig };
  }
  throw new ModelFormatError(
    'ROPE_SCALING_UNSUPPORTED',
    file,
    `rope_scaling type '${type}' is not supported (supported: default, linear, llama3)`,
  );
}

/** Validates a parsed config.json and applies the defaults transformers applies. */
export function parseModelConfig(json: unknown, file = 'config.json'): ModelConfig {
  const parsed = rawConfig.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new ModelFormatError('MODEL_CONFIG_INVALID', file, `${issue?.path.join('.') || '(root)'}: ${issue?.message}`);
  }
  const c = parsed.data;
  const arch = c.architectures?.[0] ?? archFromModelType(c.model_type);
  if (!ARCHITECTURES.includes(arch as (typeof ARCHITECTURES)[number])) {
    throw new ModelFormatError(
      'MODEL_ARCHITECTURE_UNSUPPORTED',
      file,
      `architecture '${arch}' is not supported (supported: ${ARCHITECTURES.join(', ')})`,
    );
  }
  const architecture = arch as ModelConfig['architecture'];
  if (c.hidden_act !== undefined && c.hidden_act !== 'silu') {
    throw new ModelFormatError('MODEL_CONFIG_INVALID', file, `hidden_act '${c.hidden_act}' is not supported (only silu)`);
  }
  const numKvHeads = c.num_key_value_heads ?? c.num_attention_heads;
  if (c.num_attention_heads % numKvHeads !== 0) {
    throw new ModelFormatError(
      'MODEL_CONFIG_INVALID',
      file,
      `num_attention_heads (${c.num_attention_heads}) must be a multiple of num_key_value_heads (${numKvHeads})`,
    );
  }
  const headDim = c.head_dim ?? Math.floor(c.hidden_size / c.num_attention_heads);
  if (headDim % 2 !== 0) throw new ModelFormatError('MODEL_CONFIG_INVALID', file, `head_dim ${headDim} must be even for RoPE`);
  const defaultsByArch = {
    LlamaForCausalLM: { maxPos: 2048 },
    MistralForCausalLM: { maxPos: 4096 * 32 },
    Qwen2ForCausalLM: { maxPos: 32768 },
  }[architecture];
  const maxPositionEmbeddings = c.max_position_embeddings ?? defaultsByArch.maxPos;
  const rope = c.rope_parameters ?? c.rope_scaling;
  const ropeTheta = c.rope_parameters?.rope_theta ?? c.rope_theta ?? 10000;

  let slidingWindow: number | undefined;
  if (architecture === 'MistralForCausalLM') slidingWindow = c.sliding_window ?? undefined;
  if (architecture === 'Qwen2ForCausalLM' && c.use_sliding_window) {
    throw new ModelFormatError('MODEL_CONFIG_INVALID', file, 'Qwen2 use_sliding_window=true is not supported');
  }

  return {
    architecture,
    hiddenSize: c.hidden_size,
    intermediateSize: c.intermediate_size,
    numLayers: c.num_hidden_layers,
    numHeads: c.num_attention_heads,
    numKvHeads,
    headDim,
    vocabSize: c.vocab_size,
    rmsNormEps: c.rms_norm_eps ?? 1e-6,
    ropeTheta,
    ropeScaling: parseRope(file, rope),
    maxPositionEmbeddings,
    tieWordEmbeddings: c.tie_word_embeddings ?? false,
    qkvBias: architecture === 'Qwen2ForCausalLM' ? true : (c.attention_bias ?? false),
    oBias: architecture === 'Qwen2ForCausalLM' ? false : (c.attention_bias ?? false),
    mlpBias: c.mlp_bias ?? false,
    slidingWindow,
    bosTokenId: toList(c.bos_token_id)[0],
    eosTokenIds: toList(c.eos_token_id),
  };
}

function archFromModelType(modelType: string | undefined): string {
  switch (modelType) {
    case 'llama':
      return 'LlamaForCausalLM';
    case 'mistral':
      return 'MistralForCausalLM';
    case 'qwen2':
      return 'Qwen2ForCausalLM';
    default:
      return modelType ?? '(none: config.json has neither architectures nor model_type)';
  }
}

export async function readModelConfig(modelDir: string): Promise<ModelConfig> {
  const file = join(modelDir, 'config.json');
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new ModelFormatError('MODEL_FILE_MISSING', file, 'cannot read config.json', { cause: err });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new ModelFormatError('MODEL_CONFIG_INVALID', file, `not valid JSON: ${(err as Error).message}`);
  }
  return parseModelConfig(json, file);
}
