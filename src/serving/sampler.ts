import { RequestError } from '../errors.js';
import { nativeBlas } from '../model/backend/native-matmul.js';
import { SeededRandom } from '../model/synthetic/seeded-random.js';

export interface SamplingParams {
  /** 0 = greedy. */
  temperature: number;
  /** 1 = off. */
  topP: number;
  /** 0 or -1 = off. */
  topK: number;
  seed?: number;
  /** OpenAI's presence_penalty, −2…2: subtracted once from every token already generated. */
  presencePenalty?: number;
  /** OpenAI's frequency_penalty, −2…2: subtracted once per time a token was generated. */
  frequencyPenalty?: number;
  /** OpenAI's logit_bias, −100…100 per token id: added to its logit before sampling. */
  logitBias?: [number, number][];
}

export interface TokenLogprob {
  tokenId: number;
  logprob: number;
}

export const MAX_LOGPROBS = 20;

export function validateSampling(p: SamplingParams): void {
  const bad = (m: string) => {
    throw new RequestError('REQUEST_INVALID', m);
  };
  if (!(p.temperature >= 0) || !Number.isFinite(p.temperature)) bad(`temperature must be a finite number ≥ 0, got ${p.temperature}`);
  if (!(p.topP > 0 && p.topP <= 1)) bad(`top_p must be in (0, 1], got ${p.topP}`);
  if (!Number.isInteger(p.topK) || p.topK < -1) bad(`top_k must be an integer ≥ -1, got ${p.topK}`);
  if (p.seed !== undefined && !Number.isInteger(p.seed)) bad(`seed must be an integer, got ${p.seed}`);
  for (const [name, v] of [['presence_penalty', p.presencePenalty], ['frequency_penalty', p.frequencyPenalty]] as const) {
    if (v !== undefined && !(v >= -2 && v <= 2)) bad(`${name} must be in [-2, 2], got ${v}`);
  }
  for (const [id, b] of p.logitBias ?? []) {
    if (!Number.isInteger(id) || id < 0) bad(`logit_bias: token id ${id} is not a non-negative integer`);
    if (!(b >= -100 && b <= 100)) bad(`logit_bias: the bias of token ${id} must be in [-100, 100], got ${b}`);
  }
}

/**
 * Natural-log softmax over the whole vocabulary, accumulated in float64 from the float32
 * logits, so reported logprobs carry no extra rounding beyond the logits themselves.
 */
export function logSoftmax(logits: Float32Array): Float64Array {
  const lse = logSumExp(logits);
  const out = new Float64Array(logits.length);
  for (let i = 0; i < logits.length; i++) out[i] = logits[i] - lse;
  return out;
}

/** log Σ exp(logits), in float64 (max-shifted): logSoftmax(l)[i] = l[i] − logSumExp(l). */
export function logSumExp(logits: Float32Array): number {
  const native = nativeBlas();
  if (native && logits.length >= 1024) return native.logSumExp(logits);
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > max) max = logits[i];
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i] - max);
  return max + Math.log(sum);
}

/**
 * The n most likely tokens of a logits row as logprobs (l[i] − lse), most likely first, ties
 * to the lower id: the same list as topLogprobs(logSoftmax(l), n) without the vocabulary-sized
 * array, which every decoded token would otherwise allocate and fill.
 */
export function topLogprobsOfLogits(logits: Float32Array, lse: number, n: number): TokenLogprob[] {
  const top: { tokenId: number; v: number }[] = [];
  if (n <= 0) return [];
  for (let i = 0; i < logits.length; i++) {
    const v = logits[i];
    if (top.length === n && v <= top[n - 1].v) continue;
    let pos = top.length;
    while (pos > 0 && top[pos - 1].v < v) pos--;
    top.splice(pos, 0, { tokenId: i, v });
    if (top.length > n) top.pop();
  }
  return top.map((t) => ({ tokenId: t.tokenId, logprob: t.v - lse }));
}

/** The n most likely tokens, most likely first; equal values keep the lower token id first. */
export function topLogprobs(logprobs: Float64Array, n: number): TokenLogprob[] {
  const top: TokenLogprob[] = [];
  if (n <= 0) return top;
  for (let i = 0; i < logprobs.length; i++) {
    const v = logprobs[i];
    if (top.length === n && v <= top[n - 1].logprob) continue;
    let pos = top.length;
    while (pos > 0 && top[pos - 1].logprob < v) pos--;
    top.splice(pos, 0, { tokenId: i, logprob: v });
    if (top.length > n) top.pop();
  }
  return top;
}

/** Index of the largest logit; the first one on ties, as torch.argmax. */
export function argmax(logits: Float32Array): number {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

/**
 * Per-request sampler: greedy at temperature 0, otherwise softmax(logits / T) restricted to
 * top-k then top-p (smallest set whose mass reaches p, at least one token), drawn with the
 * request's own seeded generator so a seed reproduces the same tokens.
 */
export class TokenSampler {
  private readonly params: SamplingParams;
  private readonly rng: SeededRandom;

  constructor(params: SamplingParams) {
    validateSampling(params);
    this.params = params;
    this.rng = new SeededRandom(params.seed ?? Math.floor(Math.random() * 2 ** 32));
  }

  /**
   * The next token. Penalties and logit_bias shape the distribution sampled from, as vLLM and
   * OpenAI apply them (on this sequence's generated tokens only):
   *   l'[t] = l[t] + bias[t] − presence·[c[t] > 0] − frequency·c[t]
   * Reported logprobs stay those of the raw logits.
   */
  sample(raw: Float32Array): number {
    const logits = this.adjusted(raw);
    const token = this.pick(logits);
    if (this.counts) this.counts.set(token, (this.counts.get(token) ?? 0) + 1);
    return token;
  }

  private counts: Map<number, number> | undefined;

  private adjusted(raw: Float32Array): Float32Array {
    const { presencePenalty = 0, frequencyPenalty = 0, logitBias } = this.params;
    const penalized = presencePenalty !== 0 || frequencyPenalty !== 0;
    if (penalized) this.counts ??= new Map();
    if (!penalized && !logitBias?.length) return raw;
    const l = Float32Array.from(raw);
    for (const [id, b] of logitBias ?? []) {
      if (id >= l.length) throw new RequestError('REQUEST_INVALID', `logit_bias: token id ${id} is outside the vocabulary [0, ${l.length})`);
      l[id] += b;
    }
    for (const [id, c] of this.counts ?? []) l[id] -= presencePenalty + frequencyPenalty * c;
    return l;
  }

  private pick(logits: Float32Array): number {
    const { temperature, topK, topP } = this.params;
    if (temperature === 0) return argmax(logits);
    const V = logits.length;
    let max = -Infinity;
    for (let i = 0; i < V; i++) if (logits[i] > max) max = logits[i];
    const probs = new Float64Array(V);
    let sum = 0;
    for (let i = 0; i < V; i++) sum += probs[i] = Math.exp((logits[i] - max) / temperature);
    for (let i = 0; i < V; i++) probs[i] /= sum;
    let candidates: number[] | undefined;
    if ((topK > 0 && topK < V) || topP < 1) {
      const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => probs[b] - probs[a] || a - b);
      let keep = topK > 0 ? Math.min(topK, V) : V;
      if (topP < 1) {
        let mass = 0;
        for (let i = 0; i < keep; i++) {
          mass += probs[order[i]];
          if (mass >= topP) {
            keep = i + 1;
            break;
          }
        }
      }
      candidates = order.slice(0, keep);
    }
    const pool = candidates ?? Array.from({ length: V }, (_, i) => i);
    let total = 0;
    for (const i of pool) total += probs[i];
    let u = this.rng.next() * total;
    for (const i of pool) {
      u -= probs[i];
      if (u < 0) return i;
    }
    return pool[pool.length - 1];
  }
}
