import type { FastifyInstance, FastifyRequest } from 'fastify';
import { RequestError } from '../errors.js';
import type { TextTokenizer } from '../model/tokenizer/tokenizer.js';
import type { ScoredToken } from '../serving/batch-generator.js';
import { MAX_LOGPROBS } from '../serving/sampler.js';
import type { CompletionRequest, ServingEngine } from '../serving/serving-engine.js';
import { chatMessagesOf, renderChatPrompt, type ChatMessage } from './chat-template.js';
import { runGeneration, type GenerationGuards } from './generation-run.js';
import { rejectUnsupported, resolveAdapterId, responseId, samplingOf, samplingProperties, stopStringsOf, tokenText, unixSeconds, usageOf, type SamplingBody } from './openai-params.js';
import type { InferenceRoute, RequestMeter } from './request-meter.js';
import { SseStream, streamResponse } from './sse.js';

interface ChatBody extends SamplingBody {
  messages: ChatMessage[];
  logprobs?: boolean | null;
  top_logprobs?: number | null;
  /** OpenAI's newer name for max_tokens; wins when both are set. */
  max_completion_tokens?: number | null;
}

const chatBodySchema = {
  type: 'object',
  properties: {
    ...samplingProperties,
    messages: {
      type: 'array',
      minItems: 1,
      items: {
        type: 'object',
        // content: a string, or OpenAI's list of content parts (checked by chatMessagesOf)
        properties: { role: { type: 'string', minLength: 1 }, content: {} },
        required: ['role', 'content'],
      },
    },
    logprobs: { type: ['boolean', 'null'] },
    top_logprobs: { type: ['integer', 'null'], minimum: 0, maximum: MAX_LOGPROBS },
    max_completion_tokens: { type: ['integer', 'null'], minimum: 0 },
  },
  required: ['model', 'messages'],
} as const;

/** OpenAI's chat logprobs: one entry per generated token, bytes as UTF-8 of the token text. */
interface ChatTokenLogprob {
  token: string;
  logprob: number;
  bytes: number[];
  top_logprobs: { token: string; logprob: number; bytes: number[] }[];
}

export interface ChatRouteDeps {
  /** The engine as the request's principal sees it. */
  engineFor: (req: FastifyRequest) => ServingEngine;
  meterOf: (req: FastifyRequest, route: InferenceRoute) => RequestMeter;
  guards?: GenerationGuards;
}

/**
 * /v1/chat/completions: the messages are rendered with the model's chat template and then
 * generated like a completion, with the same sampling, stop strings and streaming.
 */
export function registerChatRoutes(app: FastifyInstance, { engineFor, meterOf, guards }: ChatRouteDeps): void {
  app.post<{ Body: ChatBody }>('/v1/chat/completions', { schema: { body: chatBodySchema } }, async (req, reply) => {
    const engine = engineFor(req);
    const body = req.body;
    const meter = meterOf(req, 'chat');
    rejectUnsupported(body);
    const adapterId = resolveAdapterId(engine, body.model!);
    const wantLogprobs = body.logprobs ?? false;
    if (!wantLogprobs && body.top_logprobs !== undefined && body.top_logprobs !== null) {
      throw new RequestError('REQUEST_INVALID', 'top_logprobs needs logprobs: true');
    }
    // renders only with a tokenizer (it throws otherwise); the template writes any BOS itself
    const promptText = renderChatPrompt(engine.tokenizer, chatMessagesOf(body.messages));
    const promptIds = engine.tokenizer!.encode(promptText, { addSpecialTokens: false });
    const request: Omit<CompletionRequest, 'signal'> = {
      adapterId,
      promptIds,
      // unset means "up to the context length", as OpenAI and vLLM do for chat
      maxTokens: body.max_completion_tokens ?? body.max_tokens ?? Math.max(1, engine.model.maxPositionEmbeddings - promptIds.length),
      sampling: samplingOf(body),
      logprobs: wantLogprobs ? (body.top_logprobs ?? 0) : undefined,
      ignoreEos: body.ignore_eos ?? false,
    };
    const stop = stopStringsOf(engine, body.stop);
    const id = responseId('chatcmpl');
    const created = unixSeconds();
    const head = (object: string) => ({ id, object, created, model: body.model! });
    const logprobsOf = (tokens: ScoredToken[]) => (wantLogprobs ? { content: tokens.map((t) => chatLogprob(engine.tokenizer, t)) } : null);

    if (body.stream) {
      const chunk = (delta: object, logprobs: object | null, finishReason: string | null) => ({
        ...head('chat.completion.chunk'),
        choices: [{ index: 0, delta, logprobs, finish_reason: finishReason }],
      });
      const sse = new SseStream(reply);
      // the role goes out with the first generated text, so early failures stay plain HTTP errors
      let rolePending = true;
      const roleChunks = () => {
        const chunks = rolePending ? [chunk({ role: 'assistant', content: '' }, null, null)] : [];
        rolePending = false;
        return chunks;
      };
      return streamResponse(sse, meter, req.log, async () => {
        const outcome = await runGeneration(engine, {
          request,
          stop,
          meter,
          response: reply.raw,
          guards,
          onDelta: (text, tokens) => {
            for (const c of roleChunks()) sse.send(c);
            if (text !== '' || wantLogprobs) sse.send(chunk({ content: text }, logprobsOf(tokens), null));
          },
        });
        const usage = body.stream_options?.include_usage ? [{ ...head('chat.completion.chunk'), choices: [], usage: usageOf(outcome) }] : [];
        return [...roleChunks(), chunk({}, null, outcome.finishReason), ...usage];
      });
    }

    const outcome = await runGeneration(engine, { request, stop, meter, response: reply.raw, guards });
    return {
      ...head('chat.completion'),
      choices: [{ index: 0, message: { role: 'assistant', content: outcome.text }, logprobs: logprobsOf(outcome.tokens), finish_reason: outcome.finishReason }],
      usage: usageOf(outcome),
    };
  });
}

function chatLogprob(tokenizer: TextTokenizer | undefined, token: ScoredToken): ChatTokenLogprob {
  const entry = (tokenId: number, logprob: number) => {
    const text = tokenText(tokenizer, tokenId);
    return { token: text, logprob, bytes: [...Buffer.from(text, 'utf8')] };
  };
  return { ...entry(token.tokenId, token.logprob), top_logprobs: token.top.map((t) => entry(t.tokenId, t.logprob)) };
}
