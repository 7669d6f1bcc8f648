import type { ModelConfig } from '../model/architecture/model-config.js';
import { projectionShape, type ProjectionName } from '../model/architecture/llama-weights.js';

/**
 * Page sizes of S-LoRA's unified memory pool: one page holds one vector of the model's hidden
 * size (float32), and both KV entries and adapter weights are counted in whole pages, so the
 * two compete for one budget without fragmenting it.
 */
export function pageBytes(config: ModelConfig): number {
  return config.hiddenSize * 4;
}

/** Pages for the keys and values of one token across all layers: per layer, K and V each round up to whole pages. */
export function kvPagesPerToken(config: ModelConfig): number {
  const perLayerVector = config.numKvHeads * config.headDim;
  return config.numLayers * 2 * Math.ceil(perLayerVector / config.hiddenSize);
}

/** One adapted projection of rank r: its r rows of A (length in) and r columns of B (length out), each rounded up to whole pages. */
export function loraModulePages(config: ModelConfig, proj: ProjectionName, rank: number): number {
  const { inFeatures, outFeatures } = projectionShape(config, proj);
  const h = config.hiddenSize;
  return rank * (Math.ceil(inFeatures / h) + Math.ceil(outFeatures / h));
}

/** All pages an adapter occupies on device. */
export function adapterPages(config: ModelConfig, modules: Iterable<{ proj: ProjectionName; rank: number }>): number {
  let pages = 0;
  for (const m of modules) pages += loraModulePages(config, m.proj, m.rank);
  return pages;
}
