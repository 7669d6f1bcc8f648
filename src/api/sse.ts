import type { FastifyReply } from 'fastify';

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
        ...this.reply.getHeaders(),
        'content-type': 'text/event-stream; charset=utf-8',
        'cache-control': 'no-cache',
        connection: 'keep-alive',
        // proxies such as nginx would otherwise buffer the whole stream
        'x-accel-buffering': 'no',
      });
    }
    if (!raw.destroyed && !raw.writableEnded) raw.write(`data: ${JSON.stringify(data)}\n\n`);
  }

  /** Sends [DONE] and ends the response (only once started: before that the reply is Fastify's). */
  end(): void {
    const raw = this.reply.raw;
    if (!this.opened || raw.destroyed || raw.writableEnded) return;
    raw.end('data: [DONE]\n\n');
  }
}
