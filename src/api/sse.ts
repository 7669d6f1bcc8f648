import type { OutgoingHttpHeaders } from 'node:http';
import type { FastifyBaseLogger, FastifyReply } from 'fastify';
import { LoraGatewayError } from '../errors.js';
import { errorBody, statusOf } from './http-errors.js';
import type { RequestMeter } from './request-meter.js';

/**
 * Server-sent events in OpenAI's framing (`data: {json}\n\n`, then `data: [DONE]\n\n`) on a
 * hijacked reply. The status line and headers go out with the first event, not before, so a
 * request that fails before producing anything (queue full, context too long) still gets a
 * JSON error with its proper status from the normal error handler.
 */
export class SseStream {
  private opened = false;

  constructor(private readonly reply: FastifyReply) {}

  /** Whether the 200 and the headers are out: from then on errors must travel as events. */
  get started(): boolean {
    return this.opened;
  }

  send(data: unknown): void {
    const raw = this.reply.raw;
    if (!this.opened) {
      this.opened = true;
      this.reply.hijack();
      raw.writeHead(200, {
        // headers that hooks already set on the reply (request ids, CORS) still apply
        ...(this.reply.getHeaders() as OutgoingHttpHeaders),
        'content-type': 'text/event-stream; charset=utf-8',
        'cache-control': 'no-cache',
        connection: 'keep-alive',
        // proxies such as nginx would otherwise buffer the whole stream
        'x-accel-buffering': 'no',
      });
    }
    if (!raw.destroyed && !raw.writableEnded) raw.write(`data: ${JSON.stringify(data)}\n\n`);
  }

  /** Drops the connection and whatever it still holds unsent (a client that stopped reading). */
  destroy(): void {
    this.reply.raw.destroy();
  }

  /** Sends [DONE] and ends the response (only once started: before that the reply is Fastify's). */
  end(): void {
    const raw = this.reply.raw;
    if (!this.opened || raw.destroyed || raw.writableEnded) return;
    raw.end('data: [DONE]\n\n');
  }
}

/**
 * Drives one streaming response: `work` streams the deltas and returns the closing events
 * (final chunk, usage). An error before the first event is rethrown for Fastify's error
 * handler (a JSON error with its status); after it, it becomes an error event before [DONE],
 * as OpenAI's clients expect.
 */
export async function streamResponse(sse: SseStream, meter: RequestMeter, log: FastifyBaseLogger, work: () => Promise<unknown[]>): Promise<void> {
  try {
    const closing = await work();
    meter.count(200);
    for (const event of closing) sse.send(event);
  } catch (err) {
    if (!sse.started) throw err;
    const known = err instanceof LoraGatewayError;
    const status = known ? statusOf(err) : 500;
    if (!known) log.error(err);
    meter.count(status);
    if (known && err.code === 'CLIENT_TOO_SLOW') {
      // an error event would only queue behind the bytes it does not read
      log.warn(`stream cancelled: ${err.message}`);
      sse.destroy();
      return;
    }
    sse.send(known ? errorBody(err.code, err.message) : errorBody('INTERNAL_ERROR', 'internal server error'));
  }
  sse.end();
}
