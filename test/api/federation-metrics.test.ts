import assert from 'node:assert/strict';
import type { FastifyInstance } from 'fastify';
import { after, before, describe, test } from 'node:test';
import { buildApp } from '../../src/api/app.js';
import { FederationMetrics, type JobCounts } from '../../src/api/federation-metrics.js';
import { GatewayMetrics } from '../../src/api/metrics.js';
import { UPDATE_REJECT_REASONS } from '../../src/federation/federation-observer.js';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

let fx: GatewayFixture;
let app: FastifyInstance;
let federation: FederationMetrics;
/** What the gauge callbacks answer; `down` makes them fail as an unreachable queue would. */
const sources = { jobs: { queued: 2, running: 1, completed: 5, stopped: 0, failed: 1, cancelled: 0 } as JobCounts, live: 3, down: false };

before(async () => {
  fx = await startGateway(0);
  // the way `serve` wires it: federation metrics on the gateway metrics' registry, served by the same /metrics
  const metrics = new GatewayMetrics(fx.gateway);
  federation = new FederationMetrics(metrics.registry, {
    jobsByState: async () => {
      if (sources.down) throw new Error('redis is down');
      return sources.jobs;
    },
    liveClients: () => {
      if (sources.down) throw new Error('redis is down');
      return sources.live;
    },
  });
  app = await buildApp({ engine: fx.gateway, metrics });
});
after(async () => {
  await app.close();
  await fx.close();
});

async function scrape(): Promise<string> {
  const res = await app.inject({ method: 'GET', url: '/metrics' });
  assert.equal(res.statusCode, 200);
  return res.body;
}

/** The value of one series, e.g. value(text, 'x_total', 'outcome="published"'); undefined when absent. */
function value(text: string, name: string, labels = ''): number | undefined {
  const series = labels ? `${name}{${labels}}` : name;
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

describe('federation metrics on /metrics', () => {
  test('before any round every series is there at zero, with the gauges read from their callbacks', async () => {
    const text = await scrape();
    assert.ok(text.includes('# TYPE lora_gateway_requests_total counter'), 'the gateway metrics are still served');
    for (const outcome of ['published', 'retried', 'failed', 'cancelled']) assert.equal(value(text, 'lora_gateway_federation_rounds_total', `outcome="${outcome}"`), 0, outcome);
    for (const result of ['accepted', 'rejected', 'late']) assert.equal(value(text, 'lora_gateway_federation_updates_total', `result="${result}"`), 0, result);
    for (const reason of UPDATE_REJECT_REASONS) assert.equal(value(text, 'lora_gateway_federation_updates_rejected_total', `reason="${reason}"`), 0, reason);
    for (const phase of ['training', 'aggregation', 'publishing']) assert.equal(value(text, 'lora_gateway_federation_round_phase_seconds_count', `phase="${phase}"`), 0, phase);
    assert.equal(value(text, 'lora_gateway_federation_round_duration_seconds_count'), 0);
    assert.equal(value(text, 'lora_gateway_federation_update_bytes_count'), 0);
    assert.equal(value(text, 'lora_gateway_federation_jobs', 'state="queued"'), 2);
    assert.equal(value(text, 'lora_gateway_federation_jobs', 'state="completed"'), 5);
    assert.equal(value(text, 'lora_gateway_federation_jobs', 'state="cancelled"'), 0);
    assert.equal(value(text, 'lora_gateway_federation_live_clients'), 3);
  });

  test('observer calls show up with their labels and values; unknown reasons count as other', async () => {
    federation.roundFinished('published', 42);
    federation.roundFinished('published', 42);
    federation.roundFinished('retried', 3);
    federation.roundFinished('failed', 700);
    federation.roundFinished('cancelled', 1);
    federation.roundFinished('published', NaN); // counted, but no duration to observe
    federation.roundPhase('training', 30);
    federation.roundPhase('training', 90);
    federation.roundPhase('aggregation', 0.2);
    federation.roundPhase('publishing', -1); // a clock step back is clamped to 0
    federation.updateAccepted(5000);
    federation.updateAccepted(2_000_000);
    federation.updateRejected('shape_mismatch');
    federation.updateRejected('not_finite');
    federation.updateRejected('not_finite');
    federation.updateRejected('client-42 sent garbage');
    federation.updateRejected('');
    federation.updateLate();
    federation.updateLate();
    sources.jobs = { queued: 0, running: 2, completed: 6, stopped: 0, failed: 1, cancelled: 1 };
    sources.live = 7;
    const text = await scrape();

    const rounds = (outcome: string) => value(text, 'lora_gateway_federation_rounds_total', `outcome="${outcome}"`);
    assert.deepEqual(['published', 'retried', 'failed', 'cancelled'].map(rounds), [3, 1, 1, 1]);
    const duration = 'lora_gateway_federation_round_duration_seconds';
    assert.equal(value(text, `${duration}_count`), 5);
    assert.equal(value(text, `${duration}_sum`), 42 + 42 + 3 + 700 + 1);
    assert.equal(value(text, `${duration}_bucket`, 'le="1"'), 1);
    assert.equal(value(text, `${duration}_bucket`, 'le="60"'), 4);
    assert.equal(value(text, `${duration}_bucket`, 'le="600"'), 4);
    assert.equal(value(text, `${duration}_bucket`, 'le="1200"'), 5);
    assert.equal(value(text, `${duration}_bucket`, 'le="+Inf"'), 5);

    const phase = 'lora_gateway_federation_round_phase_seconds';
    assert.equal(value(text, `${phase}_count`, 'phase="training"'), 2);
    assert.equal(value(text, `${phase}_sum`, 'phase="training"'), 120);
    assert.equal(value(text, `${phase}_bucket`, 'le="60",phase="training"'), 1);
    assert.equal(value(text, `${phase}_sum`, 'phase="aggregation"'), 0.2);
    assert.equal(value(text, `${phase}_count`, 'phase="publishing"'), 1);
    assert.equal(value(text, `${phase}_sum`, 'phase="publishing"'), 0);

    const updates = (result: string) => value(text, 'lora_gateway_federation_updates_total', `result="${result}"`);
    assert.deepEqual(['accepted', 'rejected', 'late'].map(updates), [2, 5, 2]);
    const rejected = (reason: string) => value(text, 'lora_gateway_federation_updates_rejected_total', `reason="${reason}"`);
    assert.deepEqual(['shape_mismatch', 'not_finite', 'other', 'hash_mismatch'].map(rejected), [1, 2, 2, 0]);
    assert.ok(!text.includes('client-42'), 'a reason outside the fixed set never becomes a label value');

    const bytes = 'lora_gateway_federation_update_bytes';
    assert.equal(value(text, `${bytes}_count`), 2);
    assert.equal(value(text, `${bytes}_sum`), 2_005_000);
    assert.equal(value(text, `${bytes}_bucket`, 'le="4096"'), 0);
    assert.equal(value(text, `${bytes}_bucket`, 'le="16384"'), 1);
    assert.equal(value(text, `${bytes}_bucket`, 'le="4194304"'), 2);

    assert.deepEqual(['queued', 'running', 'completed', 'failed', 'cancelled'].map((s) => value(text, 'lora_gateway_federation_jobs', `state="${s}"`)), [0, 2, 6, 1, 1]);
    assert.equal(value(text, 'lora_gateway_federation_live_clients'), 7);
  });

  test('labels are fixed sets: outcome, phase, result, reason, state (and le), never ids', async () => {
    const text = await scrape();
    const allowed: Record<string, Set<string>> = {
      outcome: new Set(['published', 'retried', 'failed', 'cancelled']),
      phase: new Set(['training', 'aggregation', 'publishing']),
      result: new Set(['accepted', 'rejected', 'late']),
      reason: new Set(UPDATE_REJECT_REASONS),
      state: new Set(['queued', 'running', 'completed', 'stopped', 'failed', 'cancelled']),
    };
    const lines = text.split('\n').filter((l) => l.startsWith('lora_gateway_federation_'));
    assert.ok(lines.length > 50);
    for (const line of lines) {
      const labels = /\{([^}]*)\}/.exec(line)?.[1] ?? '';
      for (const [, key, val] of labels.matchAll(/([a-z_]+)="([^"]*)"/g)) {
        if (key === 'le') continue;
        assert.ok(allowed[key]?.has(val), `${line}: label ${key}="${val}"`);
      }
    }
  });

  test('when the job queue cannot be read, /metrics still answers and the federation gauges are NaN', async () => {
    sources.down = true;
    try {
      const text = await scrape();
      assert.ok(Number.isNaN(value(text, 'lora_gateway_federation_jobs', 'state="running"')));
      assert.ok(Number.isNaN(value(text, 'lora_gateway_federation_live_clients')));
      assert.equal(value(text, 'lora_gateway_federation_rounds_total', 'outcome="published"'), 3);
      assert.ok(text.includes('# TYPE lora_gateway_pool_pages gauge'));
    } finally {
      sources.down = false;
    }
    assert.equal(value(await scrape(), 'lora_gateway_federation_live_clients'), 7);
  });
});
