import type * as tf from '@tensorflow/tfjs-core';
import { RequestError } from '../errors.js';
import { DecodeBatchCache } from '../model/forward/kv-cache.js';
import type { LoraAdapter } from '../model/lora/lora-adapter.js';
import type { LoraStrategy } from '../model/lora/lora-batch.js';
import { LoraStackCache } from '../model/lora/lora-stack-cache.js';
import { forwardDecode, forwardSequences, type LlamaModel, type SequenceStep } from '../model/forward/llama-model.js';
import { logSumExp, MAX_LOGPROBS, TokenSampler, topLogprobsOfLogits, type SamplingParams, type TokenLogprob } from './sampler.js';

export interface GenerationRequest {
  promptIds: number[];
  adapter: LoraAdapter | null;
  maxTokens: number;
  sampling: SamplingParams;
  /** Top-N logprobs per generated token (0..20); undefined = none. */
  logprobs?: number;
  /** Also score the prompt: prompt_logprobs[t] for t ≥ 1. */
  echo?: boolean;
  ignoreEos?: boolean;
  /** Token ids that end generation (eos) unless ignoreEos. */
  stopTokenIds: number[];
}

export interface ScoredToken extends TokenLogprob {
  top: TokenLogprob[];
}

export interface GenerationResult {
  promptIds: number[];
  tokenIds: number[];
  finishReason: 'stop' | 'length';
  /** Every generated token's logprob, with the top-N alternatives when requested. */
  logprobs: ScoredToken[];
  /** [null, {token 1 given token 0}, ...] with echo. */
  promptLogprobs?: (ScoredToken | null)[];
}

export interface BatchGeneratorOptions {
  loraStrategy?: LoraStrategy;
  /** Called for each generated token as soon as it is sampled (for streaming). */
  onToken?: (requestIndex: number, tokenId: number) => void;
}

export function validateRequest(model: LlamaModel, r: GenerationRequest): void {
  const max = model.config.maxPositionEmbeddings;
  if (r.promptIds.length === 0) throw new RequestError('REQUEST_INVALID', 'the prompt is empty');
  if (!Number.isInteger(r.maxTokens) || r.maxTokens < 0) throw new RequestError('REQUEST_INVALID', `max_tokens must be an integer ≥ 0, got ${r.maxTokens}`);
  if (r.logprobs !== undefined && !(Number.isInteger(r.logprobs) && r.logprobs >= 0 && r.logprobs <= MAX_LOGPROBS)) {
    throw new RequestError('REQUEST_INVALID', `logprobs must be an integer in [0, ${MAX_LOGPROBS}], got ${r.logprobs}`);
  }
  if (r.promptIds.length + r.maxTokens > max) {
    throw new RequestError(
      'CONTEXT_LENGTH_EXCEEDED',
      `prompt (${r.promptIds.length} tokens) + max_tokens (${r.maxTokens}) = ${r.promptIds.length + r.maxTokens} exceeds the model's context length ${max}`,
    );
  }
  for (const t of r.promptIds) {
    if (!Number.isInteger(t) || t < 0 || t >= model.config.vocabSize) {
      throw new RequestError('REQUEST_INVALID', `prompt token id ${t} is outside the vocabulary [0, ${model.config.vocabSize})`);
    }
  }
  for (const [id] of r.sampling.logitBias ?? []) {
    if (id >= model.config.vocabSize) throw new RequestError('REQUEST_INVALID', `logit_bias: token id ${id} is outside the vocabulary [0, ${model.config.vocabSize})`);
  }
}

export function scored(row: Float32Array, tokenId: number, n: number): ScoredToken {
  // one max pass and one exp pass per token: no vocabulary-sized logprob array
  const lse = logSumExp(row);
  return { tokenId, logprob: row[tokenId] - lse, top: topLogprobsOfLogits(row, lse, n) };
}

/** Downloads logits to the host and releases the tensor. */
export async function readRows(logits: tf.Tensor2D): Promise<Float32Array> {
  try {
    return (await logits.data()) as Float32Array;
  } finally {
    logits.dispose();
  }
}

type PrefillShape = Pick<GenerationRequest, 'promptIds' | 'maxTokens' | 'echo' | 'logprobs'>;

/** The logits rows a prefill needs: every prompt position with echo, else the last one when tokens will be generated. */
export function prefillLogits(r: PrefillShape): 'all' | 'last' | 'none' {
  return r.echo ? 'all' : r.maxTokens > 0 ? 'last' : 'none';
}

/** Each request's rows of a prefill's logits, laid out by prefillLogits in request order (empty for 'none'). */
export function prefillRowSpans(requests: PrefillShape[], rows: Float32Array, vocabSize: number): Float32Array[] {
  let row = 0;
  return requests.map((r) => {
    const kind = prefillLogits(r);
    const n = kind === 'all' ? r.promptIds.length : kind === 'last' ? 1 : 0;
    const span = rows.subarray(row * vocabSize, (row + n) * vocabSize);
    row += n;
    return span;
  });
}

/**
 * Walks a prefill's logits rows (prefillRowSpans): pushes each echoed prompt token's score into
 * its `promptLogprobs`, and returns per request the row that samples its first token (its last
 * row; undefined when max_tokens is 0).
 */
export function splitPrefillRows(
  requests: PrefillShape[],
  rows: Float32Array,
  vocabSize: number,
  promptLogprobs: ((ScoredToken | null)[] | undefined)[],
): (Float32Array | undefined)[] {
  const V = vocabSize;
  return prefillRowSpans(requests, rows, V).map((span, i) => {
    const r = requests[i];
    if (r.echo) {
      // row t-1 scores prompt token t
      for (let t = 1; t < r.promptIds.length; t++) promptLogprobs[i]!.push(scored(span.subarray((t - 1) * V, t * V), r.promptIds[t], r.logprobs ?? 0));
    }
    if (span.length === 0 || r.maxTokens <= 0) return undefined;
    return span.subarray(span.length - V);
  });
}

/**
 * Runs a static batch to completion: one prefill over all prompts, then decode steps in which
 * every live sequence advances one token with its own adapter; finished sequences leave the
 * batch. Requests must already pass validateRequest.
 */
export async function generateBatch(model: LlamaModel, requests: GenerationRequest[], options: BatchGeneratorOptions = {}): Promise<GenerationResult[]> {
  for (const r of requests) validateRequest(model, r);
  const V = model.config.vocabSize;
  const stackCache = new LoraStackCache();
  const forwardOptions = { loraStrategy: options.loraStrategy, stackCache };
  const samplers = requests.map((r) => new TokenSampler(r.sampling));
  const results: GenerationResult[] = requests.map((r) => ({
    promptIds: r.promptIds,
    tokenIds: [],
    finishReason: 'length',
    logprobs: [],
    ...(r.echo ? { promptLogprobs: [null] } : {}),
  }));
  const caches = requests.map(() => model.newCache());
  let batch: DecodeBatchCache | undefined;
  try {
    // Accept a sampled token; returns whether the sequence goes on.
    const accept = (i: number, row: Float32Array): boolean => {
      const r = requests[i];
      const token = samplers[i].sample(row);
      results[i].tokenIds.push(token);
      results[i].logprobs.push(scored(row, token, r.logprobs ?? 0));
      options.onToken?.(i, token);
      if (!r.ignoreEos && r.stopTokenIds.includes(token)) {
        results[i].finishReason = 'stop';
        return false;
      }
      return results[i].tokenIds.length < r.maxTokens;
    };

    const steps: SequenceStep[] = requests.map((r, i) => ({
      tokens: r.promptIds,
      cache: caches[i],
      adapter: r.adapter,
      logits: prefillLogits(r),
    }));
    const prefill = await readRows(forwardSequences(model, steps, forwardOptions));
    const firstRows = splitPrefillRows(requests, prefill, V, results.map((r) => r.promptLogprobs));
    const live: number[] = [];
    firstRows.forEach((row, i) => {
      if (row && accept(i, row)) live.push(i);
    });

    if (live.length > 0) {
      batch = DecodeBatchCache.pack(live.map((i) => caches[i]), model.config.slidingWindow);
    }
    for (const c of caches) c.dispose();
    while (batch && live.length > 0) {
      const tokens = live.map((i) => results[i].tokenIds[results[i].tokenIds.length - 1]);
      const logits = await readRows(forwardDecode(model, batch, tokens, live.map((i) => requests[i].adapter), forwardOptions));
      const keep: number[] = [];
      live.forEach((i, b) => {
        if (accept(i, logits.subarray(b * V, (b + 1) * V))) keep.push(b);
      });
      if (keep.length < live.length) {
        const next = keep.map((b) => live[b]);
        live.length = 0;
        live.push(...next);
        if (live.length > 0) batch.keepRows(keep);
      }
    }
    return results;
  } finally {
    for (const c of caches) c.dispose();
    batch?.dispose();
    stackCache.clear();
  }
}
