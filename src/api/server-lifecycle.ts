import type { FastifyInstance } from 'fastify';
import { LoraGatewayError } from '../errors.js';
import { errorBody } from './http-errors.js';

/** Routes still answered while draining: a load balancer watches /ready turn 503, scrapes go on. */
const OPS_PATHS = new Set(['/health', '/ready', '/metrics']);

/**
 * Draining and shutdown of the HTTP side. `beginDrain()` (SIGTERM / SIGINT) makes /ready answer
 * 503 {"status":"draining"}, every other new request 503 server_shutting_down, and each response
 * close its connection; generations already running go on until `cancelInFlight()`, which
 * aborts them with SERVER_SHUTTING_DOWN (a stream then ends with that error event).
 */
export class ServerLifecycle {
  private drainStarted = false;
  private readonly cancel = new AbortController();
  private inFlight = 0;
  private idleWaiters: (() => void)[] = [];

  get draining(): boolean {
    return this.drainStarted;
  }

  /** Aborted, with a SERVER_SHUTTING_DOWN error as its reason, when the grace period ends. */
  get cancelSignal(): AbortSignal {
    return this.cancel.signal;
  }

  /** Generations running now (streaming or not). */
  get running(): number {
    return this.inFlight;
  }

  beginDrain(): void {
    this.drainStarted = true;
  }

  cancelInFlight(): void {
    this.cancel.abort(new LoraGatewayError('SERVER_SHUTTING_DOWN', 'the server is shutting down: the request was cancelled when its grace period ended'));
  }

  /** Counts one generation until `done` settles. */
  track<T>(done: Promise<T>): Promise<T> {
    this.inFlight++;
    const finish = () => {
      if (--this.inFlight > 0) return;
      for (const w of this.idleWaiters.splice(0)) w();
    };
    done.then(finish, finish);
    return done;
  }

  /** Resolves when no generation is running (at once if none is). */
  whenIdle(): Promise<void> {
    return this.inFlight === 0 ? Promise.resolve() : new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** The onRequest hook that refuses new work while draining. */
  install(app: FastifyInstance): void {
    app.addHook('onRequest', async (req, reply) => {
      if (!this.drainStarted) return;
      // keep-alive connections end after this response, so the server can close
      void reply.header('connection', 'close');
      if (OPS_PATHS.has(req.url.split('?')[0])) return;
      return reply.status(503).header('retry-after', '1').send(errorBody('SERVER_SHUTTING_DOWN', 'the server is shutting down and accepts no new requests'));
    });
  }
}
