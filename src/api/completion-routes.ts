import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify';
import { AdapterError, RequestError } from '../errors.js';
import type { StreamDecoder, TextTokenizer } from '../model/tokenizer/tokenizer.js';
import type { ScoredToken } from '../serving/batch-generator.js';
import { MAX_LOGPROBS } from '../serving/sampler.js';
import type { CompletionRequest, ServingEngine } from '../serving/serving-engine.js';
import { registerChatRoutes } from './chat-routes.js';
import { runGeneration, type GenerationGuards } from './generation-run.js';
import type { GatewayMetrics } from './metrics.js';
import {
  DEFAULT_COMPLETION_MAX_TOKENS,
  rejectUnsupported,
  resolveAdapterId,
  responseId,
  samplingOf,
  samplingProperties,
  stopStringsOf,
  tokenText,
  unixSeconds,
  usageOf,
  type SamplingBody,
} from './openai-params.js';
import { attachMeter, meterOf as attachedMeter, RequestMeter, type InferenceRoute } from './request-meter.js';
import { SseStream, streamResponse } from './sse.js';

interface CompletionBody extends SamplingBody {
  /** Text, a list holding one text, or token ids; checked by promptOf. */
  prompt: unknown;
  logprobs?: number | null;
  echo?: boolean | null;
}

function completionBodySchema(modelRequired: boolean) {
  return {
    type: 'object',
    properties: {
      ...samplingProperties,
      prompt: {},
      logprobs: { type: ['integer', 'null'], minimum: 0, maximum: MAX_LOGPROBS },
      echo: { type: ['boolean', 'null'] },
    },
    required: modelRequired ? ['model', 'prompt'] : ['prompt'],
  } as const;
}

const idParam = { type: 'object', properties: { id: { type: 'string', maxLength: 256 } }, required: ['id'] } as const;

/**
 * Which routes are inference requests, for the `route` label of lora_gateway_requests_total;
 * their RequestMeter counts them (every other route is counted by the app's onResponse hook).
 */
export const METERED: Record<string, InferenceRoute> = {
  '/v1/completions': 'completions',
  '/v1/adapters/:id/completions': 'completions',
  '/v1/chat/completions': 'chat',
};

/**
 * The OpenAI-compatible inference surface (vLLM flavour): /v1/completions, the same per
 * adapter at /v1/adapters/:id/completions, /v1/chat/completions (chat-routes.ts) and
 * /v1/models. `model` names an adapter, or the base model by the engine's model id.
 */
export const completionRoutes: FastifyPluginAsync<{ engine: ServingEngine; engineFor: (req: FastifyRequest) => ServingEngine; metrics: GatewayMetrics; guards?: GenerationGuards }> = async (
  app,
  { engine, engineFor, metrics, guards },
) => {
  app.addHook('onRequest', async (req) => {
    const route = METERED[req.routeOptions.url ?? ''];
    if (route) attachMeter(req, new RequestMeter(metrics, route));
  });
  // Counts what was sent; streams and hung-up clients were already counted with their real outcome.
  app.addHook('onResponse', async (req, reply) => attachedMeter(req)?.count(reply.statusCode));
  const meterOf = (req: FastifyRequest, route: InferenceRoute) => attachedMeter(req) ?? new RequestMeter(metrics, route);

  const startedAt = unixSeconds();
  const modelCard = (id: string, parent: string | null) => ({
    id,
    object: 'model',
    created: startedAt,
    owned_by: 'lora-gateway',
    root: engine.modelId,
    parent,
    max_model_len: engine.model.maxPositionEmbeddings,
  });
  app.get('/v1/models', async (req) => ({
    object: 'list',
    data: [modelCard(engine.modelId, null), ...engineFor(req).listAdapters().map((r) => modelCard(r.id, engine.modelId))],
  }));

  app.get<{ Params: { id: string } }>('/v1/models/:id', { schema: { params: idParam } }, async (req) => {
    const { id } = req.params;
    if (id === engine.modelId) return modelCard(id, null);
    if (!engineFor(req).getAdapter(id)) throw new AdapterError('ADAPTER_NOT_FOUND', `the model '${id}' does not exist`);
    return modelCard(id, engine.modelId);
  });

  app.post<{ Body: CompletionBody }>('/v1/completions', { schema: { body: completionBodySchema(true) } }, async (req, reply) =>
    complete(engineFor(req), req.body, req.body.model!, req, reply, meterOf(req, 'completions'), guards),
  );

  app.post<{ Body: CompletionBody; Params: { id: string } }>(
    '/v1/adapters/:id/completions',
    { schema: { params: idParam, body: completionBodySchema(false) } },
    async (req, reply) => complete(engineFor(req), req.body, req.params.id, req, reply, meterOf(req, 'completions'), guards),
  );

  registerChatRoutes(app, { engineFor, meterOf, guards });
};

async function complete(engine: ServingEngine, body: CompletionBody, model: string, req: FastifyRequest, reply: FastifyReply, meter: RequestMeter, guards?: GenerationGuards) {
  rejectUnsupported(body);
  const adapterId = resolveAdapterId(engine, model);
  const prompt = promptOf(engine, body.prompt);
  const logprobs = body.logprobs ?? undefined;
  const echo = body.echo ?? false;
  if (body.stream && echo && logprobs !== undefined) {
    // the engine reports prompt logprobs only with the final result, after the text went out
    throw new RequestError('REQUEST_INVALID', 'echo with logprobs is not supported when streaming');
  }
  const request: Omit<CompletionRequest, 'signal'> = {
    adapterId,
    promptIds: prompt.ids,
    maxTokens: body.max_tokens ?? DEFAULT_COMPLETION_MAX_TOKENS,
    sampling: samplingOf(body),
    logprobs,
    // prompt logprobs cost a logits row per prompt token: only when they are shown
    echo: echo && logprobs !== undefined,
    ignoreEos: body.ignore_eos ?? false,
  };
  const stop = stopStringsOf(engine, body.stop);
  const head = { id: responseId('cmpl'), object: 'text_completion', created: unixSeconds(), model };
  const echoed = echo ? prompt.text : '';
  const writer = new LegacyLogprobsWriter(engine.tokenizer);

  if (body.stream) {
    const chunk = (text: string, lp: LegacyLogprobs | null, finishReason: string | null) => ({
      ...head,
      choices: [{ index: 0, text, logprobs: lp, finish_reason: finishReason }],
    });
    const sse = new SseStream(reply);
    // the echoed prompt goes out with the first generated text, so early failures stay plain HTTP errors
    let echoPending = echo;
    const sendEcho = () => {
      if (echoPending) sse.send(chunk(echoed, null, null));
      echoPending = false;
    };
    return streamResponse(sse, meter, req.log, async () => {
      const outcome = await runGeneration(engine, {
        request,
        stop,
        meter,
        response: reply.raw,
        guards,
        onDelta: (text, tokens) => {
          sendEcho();
          if (text === '' && logprobs === undefined) return;
          sse.send(chunk(text, logprobs === undefined ? null : writer.write(tokens.map(generatedEntry)), null));
        },
      });
      sendEcho();
      const usage = body.stream_options?.include_usage ? [{ ...head, choices: [], usage: usageOf(outcome) }] : [];
      return [chunk('', null, outcome.finishReason), ...usage];
    });
  }

  const outcome = await runGeneration(engine, { request, stop, meter, response: reply.raw, guards });
  let lp: LegacyLogprobs | null = null;
  if (logprobs !== undefined) {
    const promptEntries = echo ? outcome.promptIds.map((tokenId, i) => ({ tokenId, scored: outcome.promptLogprobs?.[i] ?? null })) : [];
    lp = writer.write([...promptEntries, ...outcome.tokens.map(generatedEntry)]);
  }
  return {
    ...head,
    choices: [{ index: 0, text: echoed + outcome.text, logprobs: lp, finish_reason: outcome.finishReason }],
    usage: usageOf(outcome),
  };
}

/** prompt → token ids (BOS added by the tokenizer's post-processor, as vLLM does) and its text for echo. */
function promptOf(engine: ServingEngine, prompt: unknown): { ids: number[]; text: string } {
  const text = typeof prompt === 'string' ? prompt : Array.isArray(prompt) && prompt.length === 1 && typeof prompt[0] === 'string' ? prompt[0] : undefined;
  if (text !== undefined) {
    if (!engine.tokenizer) throw new RequestError('REQUEST_INVALID', 'this model has no tokenizer: send the prompt as a list of token ids');
    return { ids: engine.tokenizer.encode(text), text };
  }
  // token ids; the engine checks that each is an integer inside the vocabulary
  if (Array.isArray(prompt) && prompt.length > 0 && prompt.every((t): t is number => typeof t === 'number')) {
    return { ids: prompt, text: engine.tokenizer?.decode(prompt) ?? '' };
  }
  throw new RequestError('REQUEST_INVALID', 'prompt must be a string, a list of one string, or a list of token ids; send one request per prompt');
}

/** OpenAI's legacy completions logprobs; top_logprobs maps token text → logprob. */
interface LegacyLogprobs {
  tokens: string[];
  token_logprobs: (number | null)[];
  top_logprobs: (Record<string, number> | null)[];
  text_offset: number[];
}

/** A token with its score; the first prompt token has none. */
interface LogprobEntry {
  tokenId: number;
  scored: ScoredToken | null;
}

function generatedEntry(token: ScoredToken): LogprobEntry {
  return { tokenId: token.tokenId, scored: token };
}

/**
 * Writes legacy logprobs. text_offset is each token's character position in the returned
 * text, found by detokenizing incrementally, so it stays right across stream chunks and
 * for special tokens that the text leaves out.
 */
class LegacyLogprobsWriter {
  private readonly decoder: StreamDecoder | undefined;
  private offset = 0;

  constructor(private readonly tokenizer: TextTokenizer | undefined) {
    this.decoder = tokenizer?.createStreamDecoder();
  }

  write(entries: LogprobEntry[]): LegacyLogprobs {
    const out: LegacyLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
    for (const { tokenId, scored } of entries) {
      out.tokens.push(tokenText(this.tokenizer, tokenId));
      out.token_logprobs.push(scored ? scored.logprob : null);
      out.top_logprobs.push(scored ? this.topMap(scored) : null);
      out.text_offset.push(this.offset);
      this.offset += this.decoder?.push(tokenId).length ?? 0;
    }
    return out;
  }

  /** The top-N alternatives plus the chosen token, as OpenAI returns up to logprobs+1 entries. */
  private topMap(scored: ScoredToken): Record<string, number> {
    const map: Record<string, number> = {};
    for (const t of [...scored.top, scored]) {
      const text = tokenText(this.tokenizer, t.tokenId);
      // two ids can share a text (e.g. partial UTF-8 bytes): keep the likelier, listed first
      if (!Object.hasOwn(map, text)) map[text] = t.logprob;
    }
    return map;
  }
}
