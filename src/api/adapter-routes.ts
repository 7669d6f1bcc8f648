import multipart from '@fastify/multipart';
import type { FastifyPluginAsync, FastifyRequest } from 'fastify';
import { AdapterError, RequestError } from '../errors.js';
import type { AdapterFiles, AdapterRecord } from '../pager/adapter-store.js';
import type { ServingEngine } from '../serving/serving-engine.js';
import type { LoraPathPolicy } from './lora-path-policy.js';
import type { GatewayMetrics } from './metrics.js';

function adapterJson(engine: ServingEngine, r: AdapterRecord) {
  const residence = engine.residence(r);
  return {
    id: r.id,
    object: 'adapter',
    parent: engine.modelId,
    version: r.version,
    rank: r.rank,
    targets: r.targets,
    size_bytes: r.sizeBytes,
    sha256: r.sha256,
    ...(r.provenance ? { provenance: r.provenance } : {}),
    ...(r.tenant !== undefined ? { tenant: r.tenant } : {}),
    residence,
    ...(residence === 'errored' ? { error: engine.loadError(r) } : {}),
  };
}

const idParam = { type: 'object', properties: { id: { type: 'string', maxLength: 256 } }, required: ['id'] } as const;

/** The files of a stored version that can be downloaded, with their content types. */
const DOWNLOADS: Record<string, { pick: keyof AdapterFiles; contentType: string }> = {
  'adapter_config.json': { pick: 'config', contentType: 'application/json' },
  'adapter_model.safetensors': { pick: 'weights', contentType: 'application/octet-stream' },
};

/** `?version=N` as a positive integer; absent = latest. */
function parseVersion(raw: string | undefined): number | undefined {
  if (raw === undefined) return undefined;
  if (!/^[1-9][0-9]{0,8}$/.test(raw)) throw new RequestError('REQUEST_INVALID', `version must be a positive integer, got ${JSON.stringify(raw)}`);
  return Number(raw);
}

/**
 * Adapter management: list / show / upload (multipart adapter_config.json +
 * adapter_model.safetensors) / download a version's files / delete, plus vLLM's
 * load_lora_adapter / unload_lora_adapter.
 */
export const adapterRoutes: FastifyPluginAsync<{
  engineFor: (req: FastifyRequest) => ServingEngine;
  metrics: GatewayMetrics;
  uploadLimitBytes: number;
  loraPaths: LoraPathPolicy;
}> = async (app, { engineFor, uploadLimitBytes, loraPaths }) => {
  // multipart streams bypass Fastify's bodyLimit: each file gets the same bound (413 past it)
  await app.register(multipart, { limits: { files: 2, fields: 0, fileSize: uploadLimitBytes } });

  app.get('/v1/adapters', async (req) => {
    const engine = engineFor(req);
    return { object: 'list', data: engine.listAdapters().map((r) => adapterJson(engine, r)) };
  });

  app.get<{ Params: { id: string } }>('/v1/adapters/:id', { schema: { params: idParam } }, async (req) => {
    const engine = engineFor(req);
    const r = engine.getAdapter(req.params.id);
    if (!r) throw new AdapterError('ADAPTER_NOT_FOUND', `adapter '${req.params.id}' does not exist`);
    return adapterJson(engine, r);
  });

  app.get<{ Params: { id: string; file: string }; Querystring: { version?: string } }>(
    '/v1/adapters/:id/files/:file',
    {
      schema: {
        params: { type: 'object', properties: { id: { type: 'string', maxLength: 256 }, file: { type: 'string', maxLength: 256 } }, required: ['id', 'file'] },
        querystring: { type: 'object', properties: { version: { type: 'string', maxLength: 32 } } },
      },
    },
    async (req, reply) => {
      const engine = engineFor(req);
      const { id, file } = req.params;
      const download = Object.hasOwn(DOWNLOADS, file) ? DOWNLOADS[file] : undefined;
      if (!download) throw new RequestError('REQUEST_INVALID', `unknown file '${file}': download ${Object.keys(DOWNLOADS).join(' or ')}`);
      const version = parseVersion(req.query.version);
      const record = await engine.getAdapterVersion(id, version);
      if (!record) {
        const exists = version !== undefined && engine.getAdapter(id);
        throw new AdapterError('ADAPTER_NOT_FOUND', exists ? `adapter '${id}' has no version ${version} (latest is ${exists.version})` : `adapter '${id}' does not exist`);
      }
      let files: AdapterFiles;
      try {
        files = await engine.readAdapterFiles(record);
      } catch (err) {
        // deleted between finding the record and reading its files
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new AdapterError('ADAPTER_NOT_FOUND', `adapter '${id}' version ${record.version} no longer exists`, { cause: err });
        throw err;
      }
      return reply
        .header('content-type', download.contentType)
        .header('content-disposition', `attachment; filename="${file}"`)
        .header('x-adapter-version', String(record.version))
        .send(files[download.pick]);
    },
  );

  // every stored version, oldest first, with where it came from (an upload or a federated round)
  app.get<{ Params: { id: string } }>('/v1/adapters/:id/versions', { schema: { params: idParam } }, async (req) => {
    const engine = engineFor(req);
    const latest = engine.getAdapter(req.params.id);
    if (!latest) throw new AdapterError('ADAPTER_NOT_FOUND', `adapter '${req.params.id}' does not exist`);
    const data = [];
    for (let v = 1; v <= latest.version; v++) {
      const r = await engine.getAdapterVersion(req.params.id, v);
      if (!r) continue;
      const p = r.provenance as { job?: string; round?: number; method?: string } | undefined;
      data.push({
        version: r.version,
        rank: r.rank,
        size_bytes: r.sizeBytes,
        sha256: r.sha256,
        source: p?.job ? { kind: 'federated_round', job: p.job, round: p.round, method: p.method } : { kind: 'upload' },
        ...(r.provenance ? { provenance: r.provenance } : {}),
      });
    }
    return { object: 'list', id: req.params.id, data };
  });

  app.put<{ Params: { id: string } }>('/v1/adapters/:id', { schema: { params: idParam } }, async (req, reply) => {
    const engine = engineFor(req);
    if (!req.isMultipart()) {
      throw new RequestError('REQUEST_INVALID', 'upload the adapter as multipart/form-data with files adapter_config.json and adapter_model.safetensors');
    }
    const files: Record<string, Buffer> = {};
    for await (const part of req.files()) {
      const name = part.fieldname === 'adapter_config.json' || part.filename === 'adapter_config.json' ? 'config' : part.fieldname === 'adapter_model.safetensors' || part.filename === 'adapter_model.safetensors' ? 'weights' : undefined;
      const data = await part.toBuffer();
      if (!name) throw new RequestError('REQUEST_INVALID', `unexpected file '${part.filename ?? part.fieldname}'`);
      files[name] = data;
    }
    if (!files.config || !files.weights) {
      throw new RequestError('REQUEST_INVALID', 'both adapter_config.json and adapter_model.safetensors are required');
    }
    const record = await engine.putAdapter(req.params.id, { config: files.config, weights: files.weights });
    return reply.status(record.version === 1 ? 201 : 200).send(adapterJson(engine, record));
  });

  app.delete<{ Params: { id: string } }>('/v1/adapters/:id', { schema: { params: idParam } }, async (req) => {
    const engine = engineFor(req);
    const r = await engine.deleteAdapter(req.params.id);
    return { id: r.id, object: 'adapter', deleted: true };
  });

  app.post<{ Body: { lora_name: string; lora_path: string; load_inplace?: boolean } }>(
    '/v1/load_lora_adapter',
    {
      schema: {
        body: {
          type: 'object',
          properties: { lora_name: { type: 'string', minLength: 1, maxLength: 256 }, lora_path: { type: 'string', minLength: 1 }, load_inplace: { type: 'boolean' } },
          required: ['lora_name', 'lora_path'],
        },
      },
    },
    async (req) => {
      const engine = engineFor(req);
      // as vLLM: a name already loaded is refused unless load_inplace asks to replace it (a new version here)
      if (!req.body.load_inplace && engine.getAdapter(req.body.lora_name)) {
        throw new RequestError('ADAPTER_ALREADY_LOADED', `The lora adapter '${req.body.lora_name}' has already been loaded. Give load_inplace: true to replace it.`);
      }
      const r = await engine.putAdapter(req.body.lora_name, await loraPaths.read(req.body.lora_path));
      return `Success: LoRA adapter '${r.id}' added successfully.`;
    },
  );

  app.post<{ Body: { lora_name: string } }>(
    '/v1/unload_lora_adapter',
    { schema: { body: { type: 'object', properties: { lora_name: { type: 'string', minLength: 1, maxLength: 256 } }, required: ['lora_name'] } } },
    async (req) => {
      const engine = engineFor(req);
      await engine.deleteAdapter(req.body.lora_name);
      return `Success: LoRA adapter '${req.body.lora_name}' removed successfully.`;
    },
  );
};
