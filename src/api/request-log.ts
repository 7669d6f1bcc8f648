import type { FastifyBaseLogger, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { pino, type DestinationStream, type Logger } from 'pino';
import type { LogLevel } from '../config.js';
import { meterOf } from './request-meter.js';

/**
 * Paths pino blanks out wherever a log call would carry them: the API keys clients send
 * (`Authorization: Bearer …`, `x-api-key`) must never reach a log file, even when a later
 * change logs a request's headers or an error that holds them.
 */
export const REDACTED_PATHS = ['req.headers.authorization', 'req.headers["x-api-key"]', 'headers.authorization', 'headers["x-api-key"]', 'authorization', 'apiKey', 'api_key'];

export interface LoggerOptions {
  level: LogLevel;
  /** JSON lines (for log collectors) or one human-readable line per entry (a terminal). */
  json: boolean;
  /** Where lines go. @defaultValue stdout */
  destination?: { write(line: string): unknown };
}

/** The one logger of `serve`: Fastify's request logs and the startup lines both go through it. */
export function createLogger(options: LoggerOptions): Logger {
  const out = options.destination ?? process.stdout;
  const destination: DestinationStream = options.json ? { write: (line) => void out.write(line) } : { write: (line) => void out.write(humanLine(line)) };
  return pino({ level: options.level, redact: { paths: REDACTED_PATHS, censor: '[redacted]' } }, destination);
}

const LEVEL_NAMES: Record<number, string> = { 10: 'TRACE', 20: 'DEBUG', 30: 'INFO', 40: 'WARN', 50: 'ERROR', 60: 'FATAL' };
/** Fields every entry has, or that say nothing on a terminal of one process. */
const QUIET = new Set(['level', 'time', 'msg', 'pid', 'hostname']);

/**
 * One JSON entry as a terminal line, `12:04:05.123 INFO  msg key=value …` (a few lines of our
 * own instead of pino-pretty, which would be a dependency tree for this alone). An error's
 * stack follows on its own lines.
 */
export function humanLine(json: string): string {
  let entry: Record<string, unknown>;
  try {
    entry = JSON.parse(json) as Record<string, unknown>;
  } catch {
    return json;
  }
  const time = typeof entry.time === 'number' ? new Date(entry.time).toISOString().slice(11, 23) : '';
  const level = (LEVEL_NAMES[entry.level as number] ?? String(entry.level)).padEnd(5);
  let stack = '';
  const fields: string[] = [];
  for (const [key, value] of Object.entries(entry)) {
    if (QUIET.has(key) || value === undefined) continue;
    if (key === 'err' && typeof value === 'object' && value !== null) {
      stack = `\n${String((value as { stack?: unknown }).stack ?? (value as { message?: unknown }).message)}`;
      continue;
    }
    fields.push(`${key}=${typeof value === 'string' ? value : JSON.stringify(value)}`);
  }
  return `${time} ${level} ${String(entry.msg ?? '')}${fields.length > 0 ? ` ${fields.join(' ')}` : ''}${stack}\n`;
}

/** The route of a request as a bounded label: `METHOD /pattern/:id`, or "unmatched" (a 404 of no route). */
export function routeOf(req: FastifyRequest): string {
  const url = req.routeOptions.url;
  return url === undefined ? 'unmatched' : `${req.method} ${url}`;
}

/** Longest adapter id we put in a log line (ids are at most 128; `model` is the client's string). */
const MAX_ADAPTER_CHARS = 256;

/** The adapter (or model) a request names: `model` in the body, the `:id` of adapter routes, vLLM's `lora_name`. */
function adapterOf(req: FastifyRequest): string | undefined {
  const body = req.body as { model?: unknown; lora_name?: unknown } | undefined;
  const params = req.params as { id?: unknown } | undefined;
  const named = typeof body?.model === 'string' ? body.model : typeof body?.lora_name === 'string' ? body.lora_name : req.routeOptions.url?.startsWith('/v1/adapters/:id') || req.routeOptions.url === '/v1/models/:id' ? params?.id : undefined;
  return typeof named === 'string' ? named.slice(0, MAX_ADAPTER_CHARS) : undefined;
}

/**
 * Calls `done` exactly once per request when its response is over: on Fastify's onResponse
 * (the response was sent), or when the connection closed first (`aborted`: a client that hung
 * up, which never reaches onResponse).
 */
export function whenRequestEnds(app: FastifyInstance, done: (req: FastifyRequest, reply: FastifyReply, aborted: boolean) => void): void {
  const ended = new WeakSet<FastifyRequest>();
  const end = (req: FastifyRequest, reply: FastifyReply, aborted: boolean) => {
    if (ended.has(req)) return;
    ended.add(req);
    done(req, reply, aborted);
  };
  app.addHook('onRequest', async (req, reply) => {
    reply.raw.once('close', () => {
      if (!reply.raw.writableFinished) end(req, reply, true);
    });
  });
  app.addHook('onResponse', async (req, reply) => end(req, reply, false));
}

/**
 * One log line per request, in place of Fastify's "incoming request" / "request completed"
 * pair: request id, route pattern, the adapter it names, status, token counts of inference
 * requests (from their RequestMeter), latency. The status is the meter's when it counted one
 * (a stream that failed after its 200 went out, a client that hung up: 499).
 */
export function logRequest(log: FastifyBaseLogger, req: FastifyRequest, reply: FastifyReply, aborted: boolean): void {
  const meter = meterOf(req);
  const route = req.routeOptions.url;
  log.info(
    {
      method: req.method,
      route: route ?? 'unmatched',
      // a 404 of no route: the path that was asked for (the route alone would say nothing)
      ...(route === undefined ? { url: req.url.slice(0, 1024) } : {}),
      adapter: adapterOf(req),
      // who asked (with --api-keys): the key's tenant and id, never the key
      ...(req.principal ? { tenant: req.principal.tenant, keyId: req.principal.keyId } : {}),
      status: meter?.status ?? (aborted ? 499 : reply.statusCode),
      promptTokens: meter?.promptTokens,
      generatedTokens: meter?.generatedTokens,
      latencyMs: Math.round(reply.elapsedTime * 10) / 10,
    },
    'request',
  );
}
