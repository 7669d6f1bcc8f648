import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify';
import { FederationError, RequestError } from '../errors.js';
import type { JobPrivacy, JobRecord, RoundRecord } from '../federation/job-record.js';
import type { MechanismSteps } from '../federation/privacy/rdp-accountant.js';
import type { RoundCoordinator } from '../federation/round-coordinator.js';
import { refuseReservedAdapterId } from '../serving/store-backed-engine.js';
import { clientBelongsTo, qualifyAdapterId, splitAdapterId, TENANT_SEPARATOR } from '../tenants/tenant-ids.js';

/** snake_case view of a round record, as the OpenAI-style API speaks. */
function roundJson(r: RoundRecord) {
  return {
    round: r.round,
    attempt: r.attempt,
    kind: r.kind,
    state: r.state,
    started_at: r.startedAt,
    deadline_at: r.deadlineAt,
    finished_at: r.finishedAt ?? null,
    clients: r.clients.map((c) => ({
      client: c.client,
      status: c.status,
      ...(c.reason !== undefined ? { reason: c.reason } : {}),
      ...(c.step !== undefined ? { step: c.step, steps: c.steps, loss: c.loss } : {}),
      ...(c.numExamples !== undefined ? { num_examples: c.numExamples, train_loss: c.trainLoss, bytes: c.bytes, train_seconds: c.trainSeconds } : {}),
    })),
    participants: r.participants ?? [],
    dropped: r.dropped ?? [],
    examples: r.examples ?? null,
    mean_train_loss: r.meanTrainLoss ?? null,
    bytes_uploaded: r.bytesUploaded ?? null,
    timings: r.timings ? { training_s: r.timings.trainingSeconds, aggregation_s: r.timings.aggregationSeconds, publishing_s: r.timings.publishingSeconds } : null,
    published_version: r.publishedVersion ?? null,
    rank: r.rank ?? null,
    ...(r.aggregationError !== undefined ? { aggregation_error: r.aggregationError } : {}),
    ...(r.keptFraction !== undefined ? { kept_fraction: r.keptFraction } : {}),
    ...(r.sampleRate !== undefined ? { sample_rate: r.sampleRate, dp_denominator: r.dpDenominator } : {}),
    ...(r.rules
      ? { rules: { norms: r.rules.norms, bounded: r.rules.bounded, clipped: r.rules.clipped, ...(r.rules.selected ? { selected: r.rules.selected } : {}), ...(r.rules.noiseStd !== undefined ? { noise_std: r.rules.noiseStd } : {}) } }
      : {}),
  };
}

const stepsJson = (h: MechanismSteps[]) => h.map((x) => ({ noise_multiplier: x.noiseMultiplier, sample_rate: x.sampleRate, steps: x.steps }));

function privacyJson(p: JobPrivacy) {
  return {
    ...p,
    history: stepsJson(p.history),
    ...(p.clients ? { clients: Object.fromEntries(Object.entries(p.clients).map(([c, v]) => [c, { ...v, history: stepsJson(v.history) }])) } : {}),
  };
}

/** `asTenant`: the tenant's own view, its adapter named without the `<tenant>~` of its store id. */
export function jobJson(j: JobRecord, asTenant = false) {
  const target = asTenant ? splitAdapterId(j.spec.target_adapter_id).name : j.spec.target_adapter_id;
  return {
    id: j.id,
    object: 'federation.job',
    state: j.state,
    target_adapter_id: target,
    method: j.spec.method,
    rounds: j.spec.rounds,
    rounds_done: j.roundsDone,
    versions: j.versions,
    created_at: j.createdAt,
    updated_at: j.updatedAt,
    spec: { ...j.spec, target_adapter_id: target },
    ...(j.tenant !== undefined && !asTenant ? { tenant: j.tenant } : {}),
    current_round: j.current ? roundJson(j.current) : null,
    history: j.history.map(roundJson),
    error: j.error ?? null,
    ...(j.privacy ? { privacy: privacyJson(j.privacy) } : {}),
    ...(j.stopReason ? { stop_reason: j.stopReason } : {}),
  };
}

const idParams = { type: 'object', properties: { id: { type: 'string', maxLength: 128 } }, required: ['id'] } as const;
const updateParams = {
  type: 'object',
  properties: { id: { type: 'string', maxLength: 128 }, n: { type: 'integer', minimum: 0 }, client: { type: 'string', maxLength: 64 } },
  required: ['id', 'n'],
} as const;

function sendBytes(reply: FastifyReply, bytes: Buffer, filename: string): FastifyReply {
  return reply.header('content-type', 'application/octet-stream').header('content-disposition', `attachment; filename="${filename}"`).send(bytes);
}

/**
 * Federated training jobs: submit, list, show (live per-client progress), cancel; live clients;
 * each round's kept updates and the global state it started from, so anyone auditing a version
 * can recompute its aggregate. Without a coordinator (serve without --redis) every route
 * answers 503 federation_disabled.
 */
export const federationRoutes: FastifyPluginAsync<{ coordinator: RoundCoordinator | undefined; modelId: string }> = async (app, { coordinator, modelId }) => {
  const fed = (): RoundCoordinator => {
    if (!coordinator) {
      throw new FederationError('FEDERATION_DISABLED', 'federation is off: start the server with --redis redis://HOST:PORT (or LORA_GATEWAY_REDIS_URL) to run federated training jobs');
    }
    return coordinator;
  };
  /** The tenant a request is scoped to; undefined for an admin or an open server (sees every job). */
  const tenantOf = (req: FastifyRequest): string | undefined => (req.principal && req.principal.role !== 'admin' ? req.principal.tenant : undefined);
  /** A job the request may see; another tenant's job answers exactly as a missing one. */
  const ownJob = async (req: FastifyRequest, id: string): Promise<JobRecord> => {
    const tenant = tenantOf(req);
    const rec = await fed().get(id);
    if (tenant !== undefined && rec.tenant !== tenant) throw new FederationError('FED_JOB_NOT_FOUND', `federation job '${id}' does not exist`);
    return rec;
  };
  const view = (req: FastifyRequest, rec: JobRecord) => jobJson(rec, tenantOf(req) !== undefined);

  app.post('/v1/federation/jobs', async (req, reply) => {
    if (req.body === undefined || req.body === null || typeof req.body !== 'object' || Array.isArray(req.body)) throw new RequestError('REQUEST_INVALID', 'send the job spec as a JSON object');
    const coordinator = fed();
    const tenant = tenantOf(req);
    let body = req.body as Record<string, unknown>;
    // refused now rather than at the first publish, after a round of everyone's training
    if (typeof body.target_adapter_id === 'string') refuseReservedAdapterId(body.target_adapter_id, modelId, 'target_adapter_id');
    if (tenant !== undefined && typeof body.target_adapter_id === 'string') {
      // the tenant names its adapter plainly; the job publishes to the tenant's store id
      if (body.target_adapter_id.includes(TENANT_SEPARATOR)) throw new FederationError('FED_JOB_INVALID', `job spec: target_adapter_id: '${TENANT_SEPARATOR}' is reserved`);
      body = { ...body, target_adapter_id: qualifyAdapterId(tenant, body.target_adapter_id) };
    }
    const rec = await coordinator.submit(body, { tenant });
    return reply.status(201).send(view(req, rec));
  });

  app.get('/v1/federation/jobs', async (req) => {
    const tenant = tenantOf(req);
    const jobs = (await fed().list()).filter((j) => tenant === undefined || j.tenant === tenant);
    return { object: 'list', data: jobs.map((j) => view(req, j)) };
  });

  app.get<{ Params: { id: string } }>('/v1/federation/jobs/:id', { schema: { params: idParams } }, async (req) => view(req, await ownJob(req, req.params.id)));

  app.post<{ Params: { id: string } }>('/v1/federation/jobs/:id/cancel', { schema: { params: idParams } }, async (req) => {
    await ownJob(req, req.params.id);
    return view(req, await fed().cancel(req.params.id));
  });

  app.get('/v1/federation/clients', async (req) => {
    const tenant = tenantOf(req);
    return {
      object: 'list',
      data: (await fed().clients())
        .filter((c) => tenant === undefined || clientBelongsTo(tenant, c.id))
        .map((c) => ({ id: c.id, last_seen: c.lastSeen, busy: c.busy, compatible: c.compatible, current: c.current ?? null, host: c.host ?? null })),
    };
  });

  app.get<{ Params: { id: string; n: number; client: string } }>('/v1/federation/jobs/:id/rounds/:n/updates/:client', { schema: { params: updateParams } }, async (req, reply) => {
    await ownJob(req, req.params.id);
    return sendBytes(reply, await fed().update(req.params.id, req.params.n, req.params.client), `${req.params.id}-round-${req.params.n}-${req.params.client}.safetensors`);
  });

  app.get<{ Params: { id: string; n: number } }>('/v1/federation/jobs/:id/rounds/:n/global', { schema: { params: updateParams } }, async (req, reply) => {
    await ownJob(req, req.params.id);
    return sendBytes(reply, await fed().globalState(req.params.id, req.params.n), `${req.params.id}-round-${req.params.n}-global.safetensors`);
  });
};
