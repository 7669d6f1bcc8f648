import { checkpointLayout, projectionShape, type ProjectionName } from '../architecture/llama-weights.js';
import { parseModelConfig } from '../architecture/model-config.js';
import { SeededRandom } from './seeded-random.js';

/** Random weights for a config.json in HF layout (name → row-major data), scaled like an initialised model. */
export function randomLlamaWeights(configJson: Record<string, unknown>, seed: number): Map<string, Float32Array> {
  const config = parseModelConfig(configJson);
  const rng = new SeededRandom(seed);
  const out = new Map<string, Float32Array>();
  for (const [name, shape] of checkpointLayout(config)) {
    const n = shape.reduce((a, b) => a * b, 1);
    if (name.endsWith('norm.weight')) {
      // around 1, as trained norms are, but not exactly 1 so that a wrong norm shows up
      out.set(name, Float32Array.from({ length: n }, () => 1 + 0.1 * rng.normal()));
    } else if (name.endsWith('.bias')) {
      out.set(name, rng.normalArray(n, 0.02));
    } else {
      // std 1/sqrt(fan_in) keeps activations O(1) through the stack; embeddings std 1
      const fanIn = shape.length === 2 && !name.includes('embed_tokens') ? shape[1] : 1;
      out.set(name, rng.normalArray(n, 1 / Math.sqrt(fanIn)));
    }
  }
  return out;
}

/**
 * Random PEFT LoRA weights (name → data) for the modules a spec adapts. Unlike PEFT's
 * initialisation B is non-zero, so the adapter changes the output.
 */
export function randomLoraWeights(
  configJson: Record<string, unknown>,
  modules: { modulePath: string; proj: ProjectionName; rank: number }[],
  seed: number,
  std = 0.05,
): Map<string, { shape: number[]; data: Float32Array }> {
  const config = parseModelConfig(configJson);
  const rng = new SeededRandom(seed);
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const m of modules) {
    const { inFeatures, outFeatures } = projectionShape(config, m.proj);
    out.set(`base_model.model.${m.modulePath}.lora_A.weight`, {
      shape: [m.rank, inFeatures],
      data: rng.normalArray(m.rank * inFeatures, 1 / Math.sqrt(inFeatures)),
    });
    out.set(`base_model.model.${m.modulePath}.lora_B.weight`, {
      shape: [outFeatures, m.rank],
      data: rng.normalArray(outFeatures * m.rank, std),
    });
  }
  return out;
}

