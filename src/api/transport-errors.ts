import type { Socket } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { errorBody, type ErrorBody } from './http-errors.js';

/**
 * Answers 404 route_not_found, or 405 method_not_allowed with `Allow` when the path exists under
 * other methods (Fastify itself answers 404 for both). Routes are recorded as they are added, so
 * call this before registering any.
 */
export function installNotFound(app: FastifyInstance): void {
  const routes: { pattern: RegExp; methods: string[] }[] = [];
  app.addHook('onRoute', (r) => {
    // `:id` matches one path segment, `*` the rest, as find-my-way matches them
    const source = r.url.replace(/[.+?^${}()|[\]\\]/g, '\\$&').replace(/:[^/]+/g, '[^/]+').replace(/\*/g, '.*');
    routes.push({ pattern: new RegExp(`^${source}/?$`), methods: [r.method].flat().map(String) });
  });
  app.setNotFoundHandler((req, reply) => {
    const path = req.url.split('?')[0];
    const allowed = [...new Set(routes.filter((r) => r.pattern.test(path)).flatMap((r) => r.methods))];
    if (allowed.length > 0) {
      void reply
        .status(405)
        .header('allow', allowed.join(', '))
        .send(errorBody('METHOD_NOT_ALLOWED', `${req.method} is not allowed on ${path}: use ${allowed.join(' or ')}`));
      return;
    }
    void reply.status(404).send(errorBody('ROUTE_NOT_FOUND', `no route ${req.method} ${path}`));
  });
}

/**
 * Node's parser errors, which never reach a route: a request whose headers or body did not
 * arrive within --header-timeout / --request-timeout (408), headers over Node's size limit
 * (431), bytes that are not HTTP (400). Written straight to the socket, then closed (as Node's
 * and Fastify's default handlers do), in our error shape.
 */
export function clientErrorHandler(err: NodeJS.ErrnoException, socket: Socket): void {
  // a connection reset: there is nobody to answer
  if (err.code === 'ECONNRESET' || socket.destroyed) return;
  const [status, reason, body] =
    err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
      ? [408, 'Request Timeout', errorBody('REQUEST_TIMEOUT', 'the request did not arrive in time (its headers within --header-timeout, all of it within --request-timeout)')]
      : err.code === 'HPE_HEADER_OVERFLOW'
        ? [431, 'Request Header Fields Too Large', errorBody('HEADERS_TOO_LARGE', 'the request headers exceed the largest size accepted')]
        : [400, 'Bad Request', errorBody('REQUEST_MALFORMED', `the request is not valid HTTP (${err.code ?? err.message})`)];
  if (socket.writable) socket.write(rawResponse(status, reason, body));
  socket.destroy();
}

function rawResponse(status: number, reason: string, body: ErrorBody): string {
  const json = JSON.stringify(body);
  return `HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(json)}\r\nConnection: close\r\n\r\n${json}`;
}
