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
  REQUEST_TOO_LARGE: 413,
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
};

export function errorBody(code: string, message: string, type = 'invalid_request_error'): ErrorBody {
  return { error: { message, type, code: code.toLowerCase() } };
}

export function statusOf(err: LoraGatewayError): number {
  return STATUS[err.code] ?? 400;
}

/** Fastify error handler: engine errors by code, schema/body errors as 400/413, the rest 500. */
export function handleError(err: FastifyError | Error, _req: FastifyRequest, reply: FastifyReply): void {
  if (err instanceof LoraGatewayError) {
    const status = statusOf(err);
    if (status === 429) void reply.header('retry-after', '1');
    const type = status === 429 ? 'rate_limit_error' : status === 401 ? 'authentication_error' : status === 403 ? 'permission_error' : status >= 500 ? 'server_error' : 'invalid_request_error';
    void reply.status(status).send(errorBody(err.code, err.message, type));
    return;
  }
  const fe = err as FastifyError;
  if (fe.validation) {
    void reply.status(400).send(errorBody('request_invalid', fe.message));
    return;
  }
  if (fe.statusCode && fe.statusCode >= 400 && fe.statusCode < 500) {
    // Fastify's and its plugins' own errors (body parsing, content type, size, multipart) carry
    // FST_* codes: answers name them with this API's codes, keeping Fastify's status and message
    const code: ErrorCode = fe.statusCode === 413 ? 'REQUEST_TOO_LARGE' : 'REQUEST_INVALID';
    void reply.status(fe.statusCode).send(errorBody(code, fe.message));
    return;
  }
  _req.log.error(err);
  void reply.status(500).send(errorBody('internal_error', 'internal server error', 'server_error'));
}
