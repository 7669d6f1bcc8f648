import { readFile, stat } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { z } from 'zod';
import type { EngineConfig } from '../config.js';
import { LoraGatewayError, RequestError } from '../errors.js';
import type { LlamaModel } from '../model/forward/llama-model.js';
import type { LoraAdapter } from '../model/lora/lora-adapter.js';
import { loadPeftAdapter } from '../model/lora/peft-adapter-reader.js';
import { TextTokenizer } from '../model/tokenizer/tokenizer.js';
import { generateBatch, validateRequest, type GenerationRequest, type GenerationResult, type ScoredToken } from '../serving/batch-generator.js';

/** One input line of `generate --batch`. */
const batchLineSchema = z
  .object({
    id: z.union([z.string(), z.number()]).optional(),
    prompt: z.string().optional(),
    prompt_ids: z.array(z.number().int()).optional(),
    adapter: z.string().nullish(),
    max_tokens: z.number().int().nonnegative().default(16),
    temperature: z.number().nonnegative().default(0),
    top_p: z.number().default(1),
    top_k: z.number().int().default(-1),
    seed: z.number().int().optional(),
    logprobs: z.number().int().nullish(),
    echo: z.boolean().default(false),
    ignore_eos: z.boolean().default(false),
  })
  .strict();

export type BatchLine = z.input<typeof batchLineSchema>;

/** Everything a batch of lines shares: the model, its tokenizer, loaded adapters by path. */
export interface GenerateContext {
  model: LlamaModel;
  tokenizer: TextTokenizer | undefined;
  config: EngineConfig;
  adapters: Map<string, Promise<LoraAdapter>>;
  /** Where relative adapter paths in a batch file are also looked up. */
  baseDir?: string;
}

export async function loadTokenizerIfPresent(modelDir: string): Promise<TextTokenizer | undefined> {
  const exists = await stat(join(modelDir, 'tokenizer.json')).then(() => true, () => false);
  return exists ? TextTokenizer.load(modelDir) : undefined;
}

async function adapterFor(ctx: GenerateContext, path: string): Promise<LoraAdapter> {
  let dir = resolve(path);
  if (!isAbsolute(path) && ctx.baseDir) {
    const alt = resolve(ctx.baseDir, path);
    const here = await stat(dir).then(() => true, () => false);
    if (!here) dir = alt;
  }
  let p = ctx.adapters.get(dir);
  if (!p) {
    p = loadPeftAdapter(dir, ctx.model.config, ctx.config.maxLoraRank);
    ctx.adapters.set(dir, p);
  }
  return p;
}

function eosIds(ctx: GenerateContext): number[] {
  return [...new Set([...ctx.model.config.eosTokenIds, ...(ctx.tokenizer?.eosTokenIds ?? [])])];
}

/** Turns one parsed line into an engine request; every problem is a LoraGatewayError. */
export async function toRequest(ctx: GenerateContext, raw: unknown): Promise<GenerationRequest> {
  const parsed = batchLineSchema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new RequestError('REQUEST_INVALID', `${issue?.path.join('.') || '(line)'}: ${issue?.message}`);
  }
  const line = parsed.data;
  if ((line.prompt === undefined) === (line.prompt_ids === undefined)) {
    throw new RequestError('REQUEST_INVALID', 'give exactly one of "prompt" and "prompt_ids"');
  }
  let promptIds: number[];
  if (line.prompt_ids !== undefined) {
    promptIds = line.prompt_ids;
  } else {
    if (!ctx.tokenizer) throw new RequestError('REQUEST_INVALID', 'the model folder has no tokenizer.json; give "prompt_ids"');
    promptIds = ctx.tokenizer.encode(line.prompt!);
  }
  const request: GenerationRequest = {
    promptIds,
    adapter: line.adapter ? await adapterFor(ctx, line.adapter) : null,
    maxTokens: line.max_tokens,
    sampling: { temperature: line.temperature, topP: line.top_p, topK: line.top_k, seed: line.seed },
    logprobs: line.logprobs ?? undefined,
    echo: line.echo,
    ignoreEos: line.ignore_eos,
    stopTokenIds: eosIds(ctx),
  };
  validateRequest(ctx.model, request);
  return request;
}

function scoredJson(t: ScoredToken | null) {
  return t && { token_id: t.tokenId, logprob: t.logprob, top: t.top.map((x) => ({ token_id: x.tokenId, logprob: x.logprob })) };
}

/** The output line shape of `generate --batch`. */
export function resultJson(ctx: GenerateContext, id: unknown, r: GenerationResult) {
  return {
    id,
    prompt_ids: r.promptIds,
    token_ids: r.tokenIds,
    text: ctx.tokenizer ? ctx.tokenizer.decode(r.tokenIds) : null,
    finish_reason: r.finishReason,
    logprobs: r.logprobs.map(scoredJson),
    ...(r.promptLogprobs ? { prompt_logprobs: r.promptLogprobs.map(scoredJson) } : {}),
  };
}

export function errorJson(id: unknown, err: unknown) {
  if (err instanceof LoraGatewayError) return { id, error: { code: err.code, message: err.message } };
  throw err;
}

/**
 * Runs every valid line in ONE batch (each with its own adapter) and returns one output
 * object per input line, in input order; invalid lines get an error object instead.
 */
export async function runBatchLines(
  ctx: GenerateContext,
  lines: unknown[],
  onToken?: (lineIndex: number, tokenId: number) => void,
): Promise<object[]> {
  const out: object[] = new Array(lines.length);
  const valid: { index: number; id: unknown; request: GenerationRequest }[] = [];
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const id = line instanceof UnparsableLine ? i : ((line as { id?: unknown } | null)?.id ?? i);
    try {
      if (line instanceof UnparsableLine) throw line.error;
      valid.push({ index: i, id, request: await toRequest(ctx, line) });
    } catch (err) {
      out[i] = errorJson(id, err);
    }
  }
  if (valid.length > 0) {
    const results = await generateBatch(
      ctx.model,
      valid.map((v) => v.request),
      { loraStrategy: ctx.config.loraStrategy, onToken: onToken && ((k, token) => onToken(valid[k].index, token)) },
    );
    valid.forEach((v, k) => (out[v.index] = resultJson(ctx, v.id, results[k])));
  }
  return out;
}

/** A batch line that is not JSON: it gets an error line of its own, like any other invalid line. */
export class UnparsableLine {
  readonly error: RequestError;

  constructor(error: RequestError) {
    this.error = error;
  }
}

export async function readBatchFile(file: string): Promise<unknown[]> {
  const text = await readFile(file, 'utf8');
  return text
    .split('\n')
    .map((l, n) => ({ l: l.trim(), n }))
    .filter(({ l }) => l.length > 0)
    .map(({ l, n }) => {
      try {
        return JSON.parse(l) as unknown;
      } catch (err) {
        return new UnparsableLine(new RequestError('REQUEST_INVALID', `${file}:${n + 1}: not valid JSON: ${(err as Error).message}`));
      }
    });
}

export function batchBaseDir(file: string): string {
  return dirname(resolve(file));
}
