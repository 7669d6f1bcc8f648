import * as tf from '@tensorflow/tfjs-core';
import type { ProjectionName } from '../architecture/llama-weights.js';

/** One adapted projection on device. y += scale · (x · aT) · bT. */
export interface LoraModuleWeights {
  /** lora_A transposed: [in, r]. */
  aT: tf.Tensor2D;
  /** lora_B transposed: [r, out]. */
  bT: tf.Tensor2D;
  rank: number;
  scale: number;
}

export function loraModuleKey(layer: number, proj: ProjectionName): string {
  return `${layer}.${proj}`;
}

let nextSerial = 1;

/** A PEFT LoRA adapter resident as tensors. The base weights are never touched. */
export class LoraAdapter {
  readonly id: string;
  /** Unique per loaded instance: a stable order for stacking, unlike ids (a re-upload reuses the id). */
  readonly serial = nextSerial++;
  /** Largest rank among its modules. */
  readonly rank: number;
  readonly targets: ReadonlySet<ProjectionName>;
  readonly modules: ReadonlyMap<string, LoraModuleWeights>;
  /** Float32 bytes of all A and B matrices. */
  readonly bytes: number;
  private disposed = false;

  constructor(id: string, modules: Map<string, LoraModuleWeights>, targets: Set<ProjectionName>) {
    this.id = id;
    this.modules = modules;
    this.targets = targets;
    let rank = 0;
    let bytes = 0;
    for (const m of modules.values()) {
      rank = Math.max(rank, m.rank);
      bytes += (m.aT.size + m.bT.size) * 4;
    }
    this.rank = rank;
    this.bytes = bytes;
  }

  get isDisposed(): boolean {
    return this.disposed;
  }

  module(layer: number, proj: ProjectionName): LoraModuleWeights | undefined {
    return this.modules.get(loraModuleKey(layer, proj));
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const m of this.modules.values()) {
      m.aT.dispose();
      m.bT.dispose();
    }
  }
}
