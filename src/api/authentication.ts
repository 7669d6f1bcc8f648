import type { FastifyInstance, FastifyRequest } from 'fastify';
import { AuthError } from '../errors.js';
import type { ServingEngine } from '../serving/serving-engine.js';
import type { ApiKeyRing, Principal } from '../tenants/api-key-file.js';
import { TenantEngineView } from './tenant-engine.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** Who sent the request; null when the server runs without --api-keys (everyone is admin). */
    principal: Principal | null;
  }
}

export interface AuthOptions {
  /** The current keys (swapped on SIGHUP); undefined = the server runs open. */
  keys: () => ApiKeyRing | undefined;
  /** Serve /metrics without a key. */
  metricsPublic: boolean;
}

/** Orchestrators' probes stay open: they carry no keys. */
const OPEN_ROUTES = new Set(['/health', '/ready']);
const ADMIN_ROUTES = new Set(['/metrics']);

/** `Authorization: Bearer KEY`, as the openai clients send it. */
function bearer(req: FastifyRequest): string | undefined {
  const h = req.headers.authorization;
  if (typeof h !== 'string') return undefined;
  const m = /^Bearer\s+(\S+)\s*$/i.exec(h);
  return m?.[1];
}

/**
 * Checks every request's key before routing runs (onRequest), so an unauthenticated request
 * never reaches a handler, a body parser or the engine: 401 without a valid key, 403 for a
 * tenant key on an admin route. Keys are never logged: the logger redacts the header.
 */
export function registerAuthentication(app: FastifyInstance, options: AuthOptions): void {
  app.decorateRequest('principal', null);
  app.addHook('onRequest', async (req, reply) => {
    const keys = options.keys();
    if (!keys) return;
    const path = req.url.split('?', 1)[0];
    if (OPEN_ROUTES.has(path) || (options.metricsPublic && path === '/metrics')) return;
    void reply.header('www-authenticate', 'Bearer');
    const key = bearer(req);
    if (key === undefined) throw new AuthError('MISSING_API_KEY', 'no API key: send it as the header Authorization: Bearer KEY');
    const principal = keys.authenticate(key);
    if (!principal) throw new AuthError('INVALID_API_KEY', 'the API key is not valid (revoked, mistyped, or for another server)');
    if (ADMIN_ROUTES.has(path) && principal.role !== 'admin') throw new AuthError('PERMISSION_DENIED', `${path} needs an admin key (or start the server with --metrics-public)`);
    req.principal = principal;
  });
}

/** The engine as the request's principal may see it: admins and the open server see all. */
export function engineResolver(engine: ServingEngine): (req: FastifyRequest) => ServingEngine {
  const views = new Map<string, TenantEngineView>();
  return (req) => {
    const p = req.principal;
    if (!p || p.role === 'admin') return engine;
    let view = views.get(p.tenant);
    if (!view) views.set(p.tenant, (view = new TenantEngineView(engine, p.tenant)));
    return view;
  };
}
