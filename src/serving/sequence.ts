import type { SequenceKvCache } from '../model/forward/kv-cache.js';
import type { LoraAdapter } from '../model/lora/lora-adapter.js';
import type { AdapterRecord } from '../pager/adapter-store.js';
import type { GenerationResult } from './batch-generator.js';
import type { TokenSampler } from './sampler.js';
import type { CompletionRequest, TokenEvent } from './serving-engine.js';

/** One request inside the ContinuousBatcher, from submit to its promise settling. */
export interface Sequence {
  id: number;
  /** The adapter id, or BASE_KEY: fairness and in-flight counts are kept per key. */
  adapterKey: string;
  request: CompletionRequest;
  record: AdapterRecord | null;
  /** Pinned on device while the sequence runs. */
  adapter: LoraAdapter | null;
  sampler: TokenSampler;
  result: GenerationResult;
  onToken?: (e: TokenEvent) => void;
  resolve: (r: GenerationResult) => void;
  reject: (e: unknown) => void;
  /**
   * waiting: queued, holding nothing; prefill: admitted, its prompt going into `cache` chunk by
   * chunk (a long prompt takes several steps); decode: its KV is a row of the decode batch.
   */
  phase: 'waiting' | 'prefill' | 'decode';
  /** Its own KV cache during the prefill phase. */
  cache?: SequenceKvCache;
  /** How many of prefillTokens(s) are in `cache`. */
  prefilled: number;
  /** Why it ends in error, set when its own token callback threw or its logits were not finite: it ends that request only. */
  failure?: unknown;
  detachAbort?: () => void;
  /** Order of (re-)admission: the newest running sequence is preempted first. */
  admittedAt: number;
}

export const BASE_KEY = '(base)';

/**
 * What a (re-)admitted sequence prefills: its prompt, and after a preemption also the tokens
 * it generated except the last, which the next decode step feeds as usual.
 */
export function prefillTokens(s: Sequence): number[] {
  const generated = s.result.tokenIds;
  return generated.length === 0 ? s.request.promptIds : [...s.request.promptIds, ...generated.slice(0, -1)];
}
