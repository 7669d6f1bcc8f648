import { randomUUID } from 'node:crypto';
import { AdapterError, RequestError } from '../errors.js';
import type { TextTokenizer } from '../model/tokenizer/tokenizer.js';
import type { SamplingParams } from '../serving/sampler.js';
import type { ServingEngine } from '../serving/serving-engine.js';
import type { GenerationOutcome } from './generation-run.js';

/**
 * Request fields shared by /v1/completions and /v1/chat/completions, with OpenAI's defaults
 * and vLLM's extensions (top_k, ignore_eos). Optional fields also accept null, as the OpenAI
 * API does; unknown fields are ignored.
 */
export interface SamplingBody {
  model?: string;
  max_tokens?: number | null;
  temperature?: number | null;
  top_p?: number | null;
  top_k?: number | null;
  seed?: number | null;
  n?: number | null;
  stream?: boolean | null;
  stream_options?: { include_usage?: boolean | null } | null;
  /** A string or up to 4 strings; checked by stopStringsOf. */
  stop?: unknown;
  ignore_eos?: boolean | null;
  user?: string;
  presence_penalty?: number | null;
  frequency_penalty?: number | null;
  /** Token id (as a string key, as JSON has it) → bias in [−100, 100]. */
  logit_bias?: Record<string, number> | null;
}

/*
 * Fields that are one of several non-null types (prompt, stop) are checked in code, not by
 * the schema: Fastify's Ajv coerces types ('array' mode), so inside anyOf a failing branch
 * rewrites the value (["42"] → [42], [42] → "42") before the next branch sees it, and union
 * `type` lists trip Ajv's strictTypes warnings.
 */
export const samplingProperties = {
  model: { type: 'string', minLength: 1 },
  max_tokens: { type: ['integer', 'null'], minimum: 0 },
  temperature: { type: ['number', 'null'], minimum: 0 },
  top_p: { type: ['number', 'null'], exclusiveMinimum: 0, maximum: 1 },
  top_k: { type: ['integer', 'null'], minimum: -1 },
  seed: { type: ['integer', 'null'] },
  n: { type: ['integer', 'null'], minimum: 1 },
  stream: { type: ['boolean', 'null'] },
  stream_options: { type: ['object', 'null'], properties: { include_usage: { type: ['boolean', 'null'] } } },
  stop: {},
  ignore_eos: { type: ['boolean', 'null'] },
  user: { type: 'string' },
  presence_penalty: { type: ['number', 'null'], minimum: -2, maximum: 2 },
  frequency_penalty: { type: ['number', 'null'], minimum: -2, maximum: 2 },
  logit_bias: { type: ['object', 'null'], additionalProperties: { type: 'number', minimum: -100, maximum: 100 } },
} as const;

/** OpenAI's default max_tokens for legacy completions. */
export const DEFAULT_COMPLETION_MAX_TOKENS = 16;

/** `model` names an adapter; the engine's own model id names the base model (adapterId null). */
export function resolveAdapterId(engine: ServingEngine, model: string): string | null {
  if (model === engine.modelId) return null;
  if (!engine.getAdapter(model)) {
    throw new AdapterError('ADAPTER_NOT_FOUND', `the model '${model}' does not exist: use '${engine.modelId}' or one of the adapters in GET /v1/models`);
  }
  return model;
}

function unsupported(field: string, why: string): never {
  throw new RequestError('UNSUPPORTED_PARAMETER', `${field}: ${why}`);
}

const isSet = (v: unknown) => v !== undefined && v !== null;

/**
 * Checks what the body asks for that this server does not do, so that an OpenAI parameter is
 * either honoured or refused with 400 `unsupported_parameter` naming it, never ignored.
 */
export function rejectUnsupported(sampling: SamplingBody): void {
  const body = sampling as SamplingBody & Record<string, unknown>;
  if ((body.n ?? 1) !== 1) throw new RequestError('REQUEST_INVALID', `only n=1 is supported, got n=${body.n}`);
  if (isSet(body.best_of) && body.best_of !== 1) unsupported('best_of', `only best_of = 1 is supported, got ${JSON.stringify(body.best_of)}`);
  if (isSet(body.suffix) && body.suffix !== '') unsupported('suffix', 'insertion (text after the completion) is not supported');
  const format = body.response_format as { type?: unknown } | null | undefined;
  if (isSet(format) && format!.type !== 'text') unsupported('response_format', `only {"type": "text"} is supported, got ${JSON.stringify(format)}`);
  if (isSet(body.tools) && !(Array.isArray(body.tools) && body.tools.length === 0)) unsupported('tools', 'tool calling is not supported');
  if (isSet(body.tool_choice) && body.tool_choice !== 'none') unsupported('tool_choice', 'tool calling is not supported');
  if (isSet(body.functions)) unsupported('functions', 'function calling is not supported');
}

/** logit_bias's keys are token ids written as strings (JSON object keys). */
function logitBiasOf(bias: Record<string, number>): [number, number][] {
  return Object.entries(bias).map(([k, v]) => {
    if (!/^(0|[1-9][0-9]{0,9})$/.test(k)) throw new RequestError('REQUEST_INVALID', `logit_bias: key '${k}' is not a token id`);
    return [Number(k), v];
  });
}

export function samplingOf(body: SamplingBody): SamplingParams {
  return {
    temperature: body.temperature ?? 1,
    topP: body.top_p ?? 1,
    topK: body.top_k ?? -1,
    ...(body.seed === undefined || body.seed === null ? {} : { seed: body.seed }),
    ...(isSet(body.presence_penalty) && body.presence_penalty !== 0 ? { presencePenalty: body.presence_penalty! } : {}),
    ...(isSet(body.frequency_penalty) && body.frequency_penalty !== 0 ? { frequencyPenalty: body.frequency_penalty! } : {}),
    ...(body.logit_bias && Object.keys(body.logit_bias).length > 0 ? { logitBias: logitBiasOf(body.logit_bias) } : {}),
  };
}

/** OpenAI's limit on stop sequences. */
const MAX_STOP_STRINGS = 4;

/** The stop strings as a list; they need text, so a model without a tokenizer cannot take them. */
export function stopStringsOf(engine: ServingEngine, stop: unknown): string[] {
  const stops: unknown[] = stop === undefined || stop === null ? [] : Array.isArray(stop) ? stop : [stop];
  if (stops.length > MAX_STOP_STRINGS || !stops.every((s): s is string => typeof s === 'string' && s.length > 0)) {
    throw new RequestError('REQUEST_INVALID', `stop must be a non-empty string or a list of up to ${MAX_STOP_STRINGS} of them`);
  }
  if (stops.length > 0 && !engine.tokenizer) throw new RequestError('REQUEST_INVALID', 'stop strings need a tokenizer, and this model has none');
  return stops;
}

/** One token as text, special tokens spelled out; without a tokenizer vLLM's "token_id:N". */
export function tokenText(tokenizer: TextTokenizer | undefined, tokenId: number): string {
  return tokenizer ? tokenizer.decode([tokenId], { skipSpecialTokens: false }) : `token_id:${tokenId}`;
}

export function responseId(prefix: 'cmpl' | 'chatcmpl'): string {
  return `${prefix}-${randomUUID().replaceAll('-', '')}`;
}

export function unixSeconds(): number {
  return Math.floor(Date.now() / 1000);
}

export function usageOf(outcome: GenerationOutcome) {
  const prompt = outcome.promptIds.length;
  return { prompt_tokens: prompt, completion_tokens: outcome.tokens.length, total_tokens: prompt + outcome.tokens.length };
}
