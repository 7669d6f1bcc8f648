import type { ServerResponse } from 'node:http';
import { LoraGatewayError } from '../errors.js';
import type { ScoredToken } from '../serving/batch-generator.js';
import type { CompletionRequest, ServingEngine, TokenEvent } from '../serving/serving-engine.js';
import type { RequestMeter } from './request-meter.js';
import type { ServerLifecycle } from './server-lifecycle.js';

/** Unsent bytes a stream's socket may hold past the kernel's buffers before it is cut (CLIENT_TOO_SLOW). */
export const DEFAULT_STREAM_BUFFER_BYTES = 64 * 1024;

/** Server-wide bounds that every generation runs under. */
export interface GenerationGuards {
  /** Counts running generations; its cancelSignal aborts them when the shutdown grace ends. */
  lifecycle: ServerLifecycle;
  /**
   * A stream whose response holds more unsent bytes than this (its client stopped reading) is
   * cancelled, so a reader that never reads costs this much memory, not its whole output.
   */
  maxBufferedBytes: number;
}

/**
 * Generated text cut at the first stop string. While streaming it holds back the last
 * (longest stop − 1) characters, which could be the start of a stop string, so no part of
 * a stop string is ever sent.
 */
export class StopMatcher {
  private text = '';
  /** text[0, released) has been handed out. */
  private released = 0;
  private readonly holdBack: number;
  matched = false;

  constructor(private readonly stops: string[]) {
    this.holdBack = Math.max(0, ...stops.map((s) => s.length - 1));
  }

  /** Adds decoded text; returns the part that is now final ("" while it could still start a stop string). */
  push(piece: string): string {
    if (this.matched || piece === '') return '';
    // a stop string ending in `piece` starts at the earliest in the held-back tail
    const from = Math.max(0, this.text.length - this.holdBack);
    this.text += piece;
    let cut = -1;
    for (const stop of this.stops) {
      const at = this.text.indexOf(stop, from);
      if (at >= 0 && (cut < 0 || at < cut)) cut = at;
    }
    if (cut >= 0) {
      this.matched = true;
      this.text = this.text.slice(0, cut);
      return this.release(this.text.length);
    }
    let end = this.text.length - this.holdBack;
    // never split a surrogate pair between two pieces
    if (end > 0 && isHighSurrogate(this.text.charCodeAt(end - 1))) end--;
    return this.release(end);
  }

  /** The generation ended: whatever was held back is final. */
  finish(): string {
    return this.release(this.text.length);
  }

  get fullText(): string {
    return this.text;
  }

  private release(end: number): string {
    if (end <= this.released) return '';
    const out = this.text.slice(this.released, end);
    this.released = end;
    return out;
  }
}

function isHighSurrogate(code: number): boolean {
  return code >= 0xd800 && code <= 0xdbff;
}

export interface GenerationJob {
  request: Omit<CompletionRequest, 'signal'>;
  stop: string[];
  meter: RequestMeter;
  /** The HTTP response: if it closes before it finished, the client is gone and the engine request is cancelled. */
  response: ServerResponse;
  /** Streaming: each piece of final text with the tokens sampled since the previous piece. */
  onDelta?: (text: string, tokens: ScoredToken[]) => void;
  guards?: GenerationGuards;
}

export interface GenerationOutcome {
  promptIds: number[];
  /** Generated text (special tokens skipped), cut before a stop string. */
  text: string;
  /** Every token the answer consumed, the one that completed a stop string included (as vLLM counts them). */
  tokens: ScoredToken[];
  finishReason: 'stop' | 'length';
  /** With echo and logprobs: [null, logprob of prompt token 1 given token 0, …]. */
  promptLogprobs?: (ScoredToken | null)[];
}

/**
 * Runs one request on the engine: detokenizes as tokens arrive (the StreamDecoder never
 * yields half a UTF-8 character), applies stop strings by cancelling the engine request so
 * its KV pages are freed at the next step, cancels it too when the client disconnects, stops
 * reading, or the shutdown grace ends (then it rejects with that reason: CLIENT_TOO_SLOW,
 * SERVER_SHUTTING_DOWN), and feeds the latency and token metrics.
 */
export function runGeneration(engine: ServingEngine, job: GenerationJob): Promise<GenerationOutcome> {
  const run = generate(engine, job);
  return job.guards ? job.guards.lifecycle.track(run) : run;
}

async function generate(engine: ServingEngine, job: GenerationJob): Promise<GenerationOutcome> {
  const controller = new AbortController();
  const clientGone = () => {
    if (!job.response.writableFinished) controller.abort();
  };
  job.response.on('close', clientGone);
  if (job.response.destroyed) controller.abort();
  const shutdown = job.guards?.lifecycle.cancelSignal;
  const onShutdown = () => controller.abort(shutdown?.reason);
  shutdown?.addEventListener('abort', onShutdown, { once: true });
  if (shutdown?.aborted) onShutdown();
  const maxBuffered = job.guards?.maxBufferedBytes ?? Infinity;

  const decoder = engine.tokenizer?.createStreamDecoder();
  const stops = new StopMatcher(job.stop);
  // The engine's cancellation error carries no partial result, so prompt logprobs would be
  // lost; such requests run on to max_tokens/EOS and the extra tokens are dropped instead.
  const cancelOnStop = !(job.request.echo && job.request.logprobs !== undefined);
  const tokens: ScoredToken[] = [];
  let pending: ScoredToken[] = [];
  let callbackError: unknown;

  const onToken = ({ token }: TokenEvent) => {
    if (stops.matched || callbackError !== undefined) return;
    // A throw here would reach the batcher's step loop and fail every running sequence.
    try {
      job.meter.token();
      tokens.push(token);
      pending.push(token);
      const piece = stops.push(decoder ? decoder.push(token.tokenId) : '');
      if (stops.matched && cancelOnStop) controller.abort();
      if (piece !== '' && job.onDelta) {
        job.onDelta(piece, pending);
        pending = [];
        // the engine has no pause: a stream whose reader fell behind is cancelled, its bytes bounded
        if (job.response.writableLength > maxBuffered && !controller.signal.aborted) {
          const held = job.response.writableLength;
          controller.abort(new LoraGatewayError('CLIENT_TOO_SLOW', `the client stopped reading its stream: ${held} bytes unsent, over the ${maxBuffered}-byte bound`));
        }
      }
    } catch (err) {
      callbackError = err;
      controller.abort();
    }
  };

  let promptLogprobs: (ScoredToken | null)[] | undefined;
  let finishReason: 'stop' | 'length';
  try {
    const result = await engine.complete({ ...job.request, signal: controller.signal }, onToken);
    promptLogprobs = result.promptLogprobs;
    finishReason = stops.matched ? 'stop' : result.finishReason;
  } catch (err) {
    if (callbackError !== undefined) throw callbackError;
    const cancelled = err instanceof LoraGatewayError && err.code === 'REQUEST_CANCELLED';
    if (!(cancelled && stops.matched)) {
      job.meter.generated(job.request.promptIds.length, tokens.length, false);
      // cut by the server (shutdown, a stalled reader): that reason, counted where it is answered
      const reason: unknown = controller.signal.reason;
      if (cancelled && reason instanceof LoraGatewayError) throw reason;
      if (cancelled) job.meter.count(499);
      throw err;
    }
    finishReason = 'stop';
  } finally {
    job.response.off('close', clientGone);
    shutdown?.removeEventListener('abort', onShutdown);
  }
  if (callbackError !== undefined) throw callbackError;

  job.meter.generated(job.request.promptIds.length, tokens.length, true);
  const tail = stops.matched ? '' : stops.push(decoder?.flush() ?? '') + stops.finish();
  if (stops.matched) finishReason = 'stop';
  if (job.onDelta && (tail !== '' || pending.length > 0)) job.onDelta(tail, pending);
  return { promptIds: job.request.promptIds, text: stops.fullText, tokens, finishReason, promptLogprobs };
}
