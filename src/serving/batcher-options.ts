import { LoraGatewayError } from '../errors.js';
import type { LoraCostModel, LoraStrategy } from '../model/lora/lora-batch.js';
import type { LlamaModel } from '../model/forward/llama-model.js';
import type { AdapterPager } from '../pager/adapter-pager.js';
import type { AdapterStore } from '../pager/adapter-store.js';
import type { PagePool } from '../pager/page-pool.js';

export interface BatcherLimits {
  maxRunningSeqs: number;
  /** Prompt tokens prefilled in one step: longer prompts are prefilled in chunks over several steps (chunked prefill). */
  maxBatchTokens: number;
  maxAdaptersPerBatch: number;
  /** Requests beyond this many waiting are refused with QUEUE_FULL. */
  maxWaiting: number;
}

export interface BatcherParts {
  model: LlamaModel;
  /** The latest record of an adapter id (the AdapterStore's get). */
  store: Pick<AdapterStore, 'get'>;
  pager: AdapterPager;
  pool: PagePool;
  limits: BatcherLimits;
  stopTokenIds: number[];
  loraStrategy?: LoraStrategy;
  loraCost?: LoraCostModel;
  /** Called after every step, for metrics and tests. */
  onStep?: (info: StepInfo) => void;
}

export interface StepInfo {
  running: number;
  waiting: number;
  admitted: number;
  /** Prompt tokens prefilled in this step. */
  prefilled: number;
  finished: number;
  /** Running sequences sent back to the queue this step because decode ran out of pages. */
  preempted: number;
  /** Wall time of the step's phases, in milliseconds. */
  ms: { grow: number; admit: number; prefill: number; repack: number; decode: number };
}

/** The 429 of a full waiting queue, whichever side decides it (the batcher, or the HTTP thread of a ThreadedGateway). */
export function queueFullError(maxWaiting: number): LoraGatewayError {
  return new LoraGatewayError('QUEUE_FULL', `the waiting queue is full (${maxWaiting} requests); retry later`);
}
