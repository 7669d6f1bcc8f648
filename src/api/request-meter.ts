import type { FastifyRequest } from 'fastify';
import type { GatewayMetrics } from './metrics.js';

/** The `route` label of lora_gateway_requests_total: a bounded set, never the adapter id. */
export type InferenceRoute = 'completions' | 'chat';

/**
 * Metrics of one inference request, from arrival to its last byte. Each request is counted
 * exactly once: by the route when it knows the outcome better than the HTTP status does (a
 * stream that failed after its 200 went out, a client that hung up), otherwise by the
 * plugin's onResponse hook with the status that was sent.
 */
export class RequestMeter {
  private lastTokenAt: number | undefined;
  private counted = false;
  /** What the request log line reports: the engine's token counts and the status counted. */
  promptTokens: number | undefined;
  generatedTokens: number | undefined;
  status: number | undefined;

  constructor(
    private readonly metrics: GatewayMetrics,
    readonly route: InferenceRoute,
    /** performance.now() when the request arrived (onRequest, before the body is read). */
    readonly arrivedAt = performance.now(),
  ) {}

  /** A token was sampled: the first feeds time-to-first-token, the rest inter-token latency. */
  token(): void {
    const now = performance.now();
    if (this.lastTokenAt === undefined) this.metrics.ttft.observe((now - this.arrivedAt) / 1000);
    else this.metrics.interToken.observe((now - this.lastTokenAt) / 1000);
    this.lastTokenAt = now;
  }

  /** The engine finished with the request; prompt tokens count once the prompt was prefilled. */
  generated(promptTokens: number, generatedTokens: number, succeeded: boolean): void {
    this.promptTokens = promptTokens;
    this.generatedTokens = generatedTokens;
    if (succeeded) this.metrics.e2e.observe((performance.now() - this.arrivedAt) / 1000);
    if (succeeded || generatedTokens > 0) this.metrics.promptTokens.inc(promptTokens);
    this.metrics.generatedTokens.inc(generatedTokens);
  }

  /** Counts the request with its outcome as an HTTP status; later calls are ignored. */
  count(status: number): void {
    if (this.counted) return;
    this.counted = true;
    this.status = status;
    this.metrics.requests.inc({ route: this.route, status: String(status) });
  }
}

// One meter per inference request, shared by the route that feeds it and the request log
// (request-log.ts), which reads its token counts and outcome when the response ends.
const meters = new WeakMap<FastifyRequest, RequestMeter>();

export function attachMeter(req: FastifyRequest, meter: RequestMeter): void {
  meters.set(req, meter);
}

export function meterOf(req: FastifyRequest): RequestMeter | undefined {
  return meters.get(req);
}
