import type { FedMethod } from './lora-factors.js';

/**
 * What the coordinator asks of one client for one round attempt: the data of its BullMQ
 * `train` job in queue `fed-client-<client>`. Everything the client needs is here or in the
 * global-state key; the client's text never leaves it, only the update it writes to
 * `updateKey` does.
 */
export interface TrainTask {
  job: string;
  round: number;
  attempt: number;
  client: string;
  /** 'train' = local LoRA training; 'gradient' = Fed-SB's initialisation (full-weight gradients). */
  kind: 'train' | 'gradient';
  method: FedMethod;
  /** The server's baseModelFingerprint(); a client with another base refuses the task. */
  fingerprint: string;
  /** Redis key of the global state (safetensors) this round starts from. */
  globalKey: string;
  /** Redis key the client writes its update to, with a TTL of `updateTtlMs`. */
  updateKey: string;
  updateTtlMs: number;
  /** The job's seed: FFA-LoRA's frozen A is derived from it on every client. */
  jobSeed: number;
  /** This client's training seed for this round (batch order, fresh factors). */
  seed: number;
  lora: { rank: number; alpha: number; useRslora: boolean; targetModules: string[] };
  local: { steps?: number; epochs?: number; batchSize: number; lr: number; seqLen: number };
}

/** What a client's train job returns: a small reference, never the update itself (BullMQ stores return values as JSON). */
export interface UpdateRef {
  key: string;
  sha256: string;
  bytes: number;
  num_examples: number;
  train_loss: number;
  train_seconds: number;
}

/** Progress a client reports on its train job while it trains. */
export interface TrainProgress {
  step: number;
  steps: number;
  loss: number;
}
