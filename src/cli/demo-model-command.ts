import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { buildDemoTokenizer } from '../model/tokenizer/demo-tokenizer.js';
import { peftConfigJson, writeModelFolder, writePeftAdapter } from '../model/synthetic/hf-folder-writer.js';
import { PROJECTIONS, projectionModulePath, type ProjectionName } from '../model/architecture/llama-weights.js';
import { parseModelConfig } from '../model/architecture/model-config.js';
import { randomLlamaWeights, randomLoraWeights } from '../model/synthetic/random-weights.js';
import type { StoredDtype } from '../model/formats/safetensors.js';

/** Ranks and targets the demo adapters cycle through, so a demo batch is heterogeneous. */
const DEMO_RANKS = [4, 8, 16, 32];
const DEMO_TARGETS: ProjectionName[][] = [
  ['q_proj', 'v_proj'],
  ['q_proj', 'k_proj', 'v_proj', 'o_proj'],
  [...PROJECTIONS],
  ['gate_proj', 'up_proj', 'down_proj'],
];

export interface DemoModelOptions {
  adapters: number;
  dtype?: StoredDtype;
  seed?: number;
}

/** The demo model's config.json: a tiny Llama shaped like a real one (GQA, SwiGLU). */
export function demoModelConfigJson(tok = buildDemoTokenizer()): Record<string, unknown> {
  return {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: 64,
    intermediate_size: 172,
    num_hidden_layers: 4,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    vocab_size: tok.vocabSize,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    tie_word_embeddings: false,
    hidden_act: 'silu',
    bos_token_id: (tok.generationConfig as { bos_token_id?: number }).bos_token_id,
    eos_token_id: (tok.generationConfig as { eos_token_id?: number | number[] }).eos_token_id,
  };
}

/**
 * Writes a tiny Llama in the real Hugging Face layout (config.json, model.safetensors,
 * tokenizer.json, tokenizer_config.json, generation_config.json) and N PEFT adapters of
 * mixed ranks under `<dir>/adapters/demo-<i>`. Weights are random: the text is gibberish,
 * but every file is what transformers and PEFT would read.
 */
export async function writeDemoModel(dir: string, options: DemoModelOptions): Promise<{ adapterDirs: string[] }> {
  const seed = options.seed ?? 1234;
  const tok = buildDemoTokenizer();
  const configJson = demoModelConfigJson(tok);
  await writeModelFolder(dir, configJson, randomLlamaWeights(configJson, seed), {
    dtype: options.dtype ?? 'F32',
    tokenizerJson: tok.tokenizerJson,
    tokenizerConfig: tok.tokenizerConfig,
    generationConfig: tok.generationConfig,
  });
  const config = parseModelConfig(configJson);
  // the folder holds exactly these adapters: ones left by an earlier run with more would be stale
  await rm(join(dir, 'adapters'), { recursive: true, force: true });
  const adapterDirs: string[] = [];
  for (let i = 0; i < options.adapters; i++) {
    const rank = DEMO_RANKS[i % DEMO_RANKS.length];
    const targets = DEMO_TARGETS[Math.floor(i / DEMO_RANKS.length) % DEMO_TARGETS.length];
    const modules = [];
    for (let l = 0; l < config.numLayers; l++) {
      for (const proj of targets) modules.push({ modulePath: projectionModulePath(l, proj), proj, rank });
    }
    const adapterDir = join(dir, 'adapters', `demo-${i}`);
    await writePeftAdapter(
      adapterDir,
      peftConfigJson({ r: rank, loraAlpha: 2 * rank, targetModules: targets, baseModelName: dir }),
      randomLoraWeights(configJson, modules, seed + 1 + i, 0.2),
    );
    adapterDirs.push(adapterDir);
  }
  return { adapterDirs };
}
