import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { LoraGatewayError, type ErrorCode } from '../errors.js';

/** OpenAI's error body: {"error": {"message", "type", "code"}}. */
export interface ErrorBody {
  error: { message: string; type: string; code: string };
}

/** Each engine error code mapped to HTTP once; everything not listed is a 400 or 500 below. */
const STATUS: Partial<Record<ErrorCode, number>> = {
  ADAPTER_NOT_FOUND: 404,
  ADAPTER_ID_INVALID: 400,
  ADAPTER_CONFIG_INVALID: 422,
  ADAPTER_UNSUPPORTED: 422,
  ADAPTER_RANK_TOO_LARGE: 422,
  ADAPTER_MODULE_UNKNOWN: 422,
  ADAPTER_SHAPE_MISMATCH: 422,
  ADAPTER_WEIGHTS_INVALID: 422,
  ADAPTER_WEIGHTS_OVERFLOW: 422,
  // the adapter's own numbers cannot be served (like a failed check): retrying cannot help, so a 4xx
  ADAPTER_OUTPUT_NOT_FINITE: 422,
  // the base model itself produced NaN / ±Inf: the server's fault, not the request's
  MODEL_OUTPUT_NOT_FINITE: 500,
  // ENOSPC / EDQUOT while storing an upload (WebDAV's Insufficient Storage)
  STORAGE_FULL: 507,
  REQUEST_INVALID: 400,
  CONTEXT_LENGTH_EXCEEDED: 400,
  QUEUE_FULL: 429,
  REQUEST_CANCELLED: 499,
  FEDERATION_DISABLED: 503,
  ENGINE_FAILED: 503,
  FED_JOB_NOT_FOUND: 404,
  FED_ROUND_NOT_FOUND: 404,
  FED_UPDATE_NOT_FOUND: 404,
  FED_JOB_FINISHED: 409,
  FED_RANK_TOO_LARGE: 422,
  FED_TARGET_MODULE_UNKNOWN: 422,
  FED_METHOD_UNKNOWN: 400,
  FED_JOB_INVALID: 400,
  FED_MIN_CLIENTS_TOO_HIGH: 400,
  ADAPTER_ID_RESERVED: 409,
  ADAPTER_ALREADY_LOADED: 400,
  UNSUPPORTED_PARAMETER: 400,
  FED_DP_INVALID: 400,
  FED_DP_BUDGET_EXCEEDED: 400,
  FED_DP_UNSUPPORTED: 400,
  FED_ROBUST_UNSUPPORTED: 400,
  MISSING_API_KEY: 401,
  INVALID_API_KEY: 401,
  PERMISSION_DENIED: 403,
  LORA_PATH_FORBIDDEN: 403,
  JSON_INVALID: 400,
  MEDIA_TYPE_UNSUPPORTED: 415,
  BODY_TOO_LARGE: 413,
  URL_TOO_LONG: 414,
  URL_INVALID: 400,
  ROUTE_NOT_FOUND: 404,
  METHOD_NOT_ALLOWED: 405,
  REQUEST_TIMEOUT: 408,
  HEADERS_TOO_LARGE: 431,
  REQUEST_MALFORMED: 400,
  SERVER_SHUTTING_DOWN: 503,
  // a stream cut because its client stopped reading (the status only labels the metric: nothing more is sent)
  CLIENT_TOO_SLOW: 499,
  INTERNAL_ERROR: 500,
};

/**
 * Errors raised by Fastify and by Node's HTTP parser rather than by our routes, each given one
 * of our codes, so every response a client can get has the same OpenAI shape and a code listed
 * in src/errors.ts (Fastify's own codes, FST_ERR_*, are an implementation detail).
 */
const FASTIFY_CODES: Record<string, ErrorCode> = {
  FST_ERR_CTP_INVALID_JSON_BODY: 'JSON_INVALID',
  FST_ERR_CTP_EMPTY_JSON_BODY: 'JSON_INVALID',
  FST_ERR_CTP_INVALID_MEDIA_TYPE: 'MEDIA_TYPE_UNSUPPORTED',
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: 'REQUEST_MALFORMED',
  FST_ERR_CTP_BODY_TOO_LARGE: 'BODY_TOO_LARGE',
  // @fastify/multipart: one uploaded file past --body-limit
  FST_REQ_FILE_TOO_LARGE: 'BODY_TOO_LARGE',
  FST_ERR_MAX_PARAM_LENGTH: 'URL_TOO_LONG',
  FST_ERR_BAD_URL: 'URL_INVALID',
};

/** When Fastify (or a plugin) raised a code not listed above, its status still says what it was. */
const BY_STATUS: Partial<Record<number, ErrorCode>> = {
  404: 'ROUTE_NOT_FOUND',
  405: 'METHOD_NOT_ALLOWED',
  408: 'REQUEST_TIMEOUT',
  413: 'BODY_TOO_LARGE',
  414: 'URL_TOO_LONG',
  415: 'MEDIA_TYPE_UNSUPPORTED',
  431: 'HEADERS_TOO_LARGE',
};

/** Our code for a 4xx error that Fastify or a plugin raised. */
export function codeOfFrameworkError(fe: FastifyError): ErrorCode {
  return (fe.code && FASTIFY_CODES[fe.code]) || BY_STATUS[fe.statusCode ?? 400] || 'REQUEST_INVALID';
}

/** OpenAI's error types: rate_limit_error (429), authentication_error (401), permission_error (403), server_error (5xx), invalid_request_error otherwise. */
export function errorType(status: number): string {
  return status === 429 ? 'rate_limit_error' : status === 401 ? 'authentication_error' : status === 403 ? 'permission_error' : status >= 500 ? 'server_error' : 'invalid_request_error';
}

export function errorBody(code: ErrorCode, message: string, type = errorType(STATUS[code] ?? 400)): ErrorBody {
  return { error: { message, type, code: code.toLowerCase() } };
}

export function statusOf(err: LoraGatewayError): number {
  return STATUS[err.code] ?? 400;
}

/** Fastify error handler: our errors by code, Fastify's mapped to ours (above), the rest 500 internal_error. */
export function handleError(err: FastifyError | Error, _req: FastifyRequest, reply: FastifyReply): void {
  if (err instanceof LoraGatewayError) {
    const status = statusOf(err);
    if (status === 429) void reply.header('retry-after', '1');
    void reply.status(status).send(errorBody(err.code, err.message));
    return;
  }
  const fe = err as FastifyError;
  if (fe.validation) {
    void reply.status(400).send(errorBody('REQUEST_INVALID', fe.message));
    return;
  }
  if (fe.statusCode && fe.statusCode >= 400 && fe.statusCode < 500) {
    const code = codeOfFrameworkError(fe);
    void reply.status(STATUS[code] ?? fe.statusCode).send(errorBody(code, fe.message));
    return;
  }
  _req.log.error(err);
  void reply.status(500).send(errorBody('INTERNAL_ERROR', 'internal server error'));
}
