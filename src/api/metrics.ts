import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { ServingEngine } from '../serving/serving-engine.js';
import type { BuildInfo } from './ops-routes.js';

const LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

/**
 * Prometheus metrics of the gateway. Labels are bounded sets (route, status class, page
 * kind, tier): never one series per adapter id, since there can be thousands.
 */
export class GatewayMetrics {
  readonly registry = new Registry();
  /**
   * Every HTTP request, by route and status: inference routes as `completions` / `chat` (what
   * the dashboard has always read), every other one as `METHOD /pattern`, and requests that
   * match no route as `unmatched`, so the label stays bounded whatever URLs clients send.
   */
  readonly requests = new Counter({ name: 'lora_gateway_requests_total', help: 'Finished HTTP requests by route and status', labelNames: ['route', 'status'], registers: [this.registry] });
  /** Always 1; the labels say what runs (Prometheus' *_build_info convention). */
  private readonly buildInfo = new Gauge({ name: 'lora_gateway_build_info', help: 'Version, tensor backend and Node.js of this process (value 1)', labelNames: ['version', 'backend', 'native_blas', 'node'], registers: [this.registry] });
  readonly ttft = new Histogram({ name: 'lora_gateway_time_to_first_token_seconds', help: 'Time from request arrival to its first token', buckets: LATENCY_BUCKETS, registers: [this.registry] });
  readonly interToken = new Histogram({ name: 'lora_gateway_inter_token_latency_seconds', help: 'Time between consecutive tokens of one request', buckets: LATENCY_BUCKETS, registers: [this.registry] });
  readonly e2e = new Histogram({ name: 'lora_gateway_request_duration_seconds', help: 'End-to-end latency of inference requests', buckets: LATENCY_BUCKETS, registers: [this.registry] });
  readonly promptTokens = new Counter({ name: 'lora_gateway_prompt_tokens_total', help: 'Prompt tokens processed', registers: [this.registry] });
  readonly generatedTokens = new Counter({ name: 'lora_gateway_generation_tokens_total', help: 'Tokens generated', registers: [this.registry] });
  readonly batchSize = new Histogram({ name: 'lora_gateway_batch_size', help: 'Sequences in each scheduler step', buckets: [1, 2, 4, 8, 16, 32, 64, 128], registers: [this.registry] });

  readonly stepSeconds = new Histogram({
    name: 'lora_gateway_step_seconds',
    help: 'Time of one scheduler step spent prefilling prompts and decoding the batch',
    labelNames: ['phase'],
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [this.registry],
  });
  readonly preemptions = new Counter({ name: 'lora_gateway_preemptions_total', help: 'Running sequences sent back to the queue because KV pages ran out', registers: [this.registry] });

  readonly adapterLoad = new Histogram({ name: 'lora_gateway_adapter_load_seconds', help: 'Time to bring an adapter onto the device', buckets: LATENCY_BUCKETS, registers: [this.registry] });

  reportBuild(build: BuildInfo): void {
    this.buildInfo.reset();
    this.buildInfo.set({ version: build.version, backend: build.backend, native_blas: String(build.nativeBlas), node: process.versions.node }, 1);
  }

  constructor(engine: ServingEngine) {
    const r = [this.registry];
    engine.onAdapterLoad((s) => this.adapterLoad.observe(s));
    engine.onStep((info) => {
      if (info.running > 0) this.batchSize.observe(info.running);
      if (info.preempted > 0) this.preemptions.inc(info.preempted);
      if (info.prefilled > 0) this.stepSeconds.observe({ phase: 'prefill' }, info.ms.prefill / 1000);
      if (info.ms.decode > 0) this.stepSeconds.observe({ phase: 'decode' }, info.ms.decode / 1000);
    });
    new Gauge({ name: 'lora_gateway_running_sequences', help: 'Sequences decoding now', registers: r, collect() { this.set(engine.stats().running); } });
    new Gauge({ name: 'lora_gateway_engine_tensors', help: 'Live tensors on the engine thread (flat under steady load unless something leaks)', registers: r, collect() { this.set(engine.stats().tensors ?? 0); } });
    new Gauge({ name: 'lora_gateway_waiting_sequences', help: 'Requests waiting for admission', registers: r, collect() { this.set(engine.stats().waiting); } });
    new Gauge({
      name: 'lora_gateway_pool_pages',
      help: 'Device pool pages in use by kind, and the capacity',
      labelNames: ['kind'],
      registers: r,
      collect() {
        const p = engine.stats().pages;
        this.set({ kind: 'kv' }, p.kv);
        this.set({ kind: 'adapter' }, p.adapter);
        this.set({ kind: 'total' }, p.kv + p.adapter);
        this.set({ kind: 'capacity' }, p.capacity);
      },
    });
    // the pager's counters only grow, so each scrape adds what happened since the last one: a
    // Prometheus counter (rate() and increase() need one, and see the restart when they reset)
    const seen = new Map<string, number>();
    new Counter({
      name: 'lora_gateway_adapter_events_total',
      help: 'Adapter loads and evictions by tier, and host-cache hits and misses',
      labelNames: ['event', 'tier'],
      registers: r,
      collect() {
        const c = engine.stats().pager;
        const events: [string, string, number][] = [
          ['load', 'device', c.deviceLoads],
          ['eviction', 'device', c.deviceEvictions],
          ['eviction', 'host', c.hostEvictions],
          ['hit', 'host', c.hostHits],
          ['miss', 'host', c.hostMisses],
        ];
        for (const [event, tier, total] of events) {
          const key = `${event}/${tier}`;
          const delta = total - (seen.get(key) ?? 0);
          seen.set(key, total);
          this.inc({ event, tier }, Math.max(0, delta));
        }
      },
    });
  }
}
