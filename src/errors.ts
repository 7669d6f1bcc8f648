/**
 * Every error the gateway raises on purpose carries a stable `code`, so that callers
 * (the CLI, later the HTTP API) can map it to an exit status or an HTTP status once,
 * and tests can assert on the code rather than on message wording.
 */
export type ErrorCode =
  // safetensors / checkpoint files
  | 'SAFETENSORS_TOO_SHORT'
  | 'SAFETENSORS_HEADER_PAST_EOF'
  | 'SAFETENSORS_HEADER_INVALID'
  | 'SAFETENSORS_UNKNOWN_DTYPE'
  | 'SAFETENSORS_UNSUPPORTED_DTYPE'
  | 'SAFETENSORS_SIZE_MISMATCH'
  | 'SAFETENSORS_OFFSETS_OVERLAP'
  | 'SAFETENSORS_OFFSETS_GAP'
  | 'SAFETENSORS_INDEX_INVALID'
  | 'TENSOR_MISSING'
  | 'TENSOR_SHAPE_MISMATCH'
  | 'TENSOR_NOT_FINITE'
  // model folder
  | 'MODEL_CONFIG_INVALID'
  | 'MODEL_ARCHITECTURE_UNSUPPORTED'
  | 'ROPE_SCALING_UNSUPPORTED'
  | 'MODEL_FILE_MISSING'
  | 'TOKENIZER_INVALID'
  // PEFT adapters
  | 'ADAPTER_ID_INVALID'
  | 'ADAPTER_NOT_FOUND'
  | 'ADAPTER_CONFIG_INVALID'
  | 'ADAPTER_UNSUPPORTED'
  | 'ADAPTER_RANK_TOO_LARGE'
  | 'ADAPTER_MODULE_UNKNOWN'
  | 'ADAPTER_SHAPE_MISMATCH'
  | 'ADAPTER_WEIGHTS_INVALID'
  | 'ADAPTER_WEIGHTS_OVERFLOW'
  | 'ADAPTER_OUTPUT_NOT_FINITE'
  | 'ADAPTER_ID_RESERVED'
  | 'ADAPTER_ALREADY_LOADED'
  | 'UNSUPPORTED_PARAMETER'
  // requests and configuration
  | 'REQUEST_INVALID'
  | 'REQUEST_CANCELLED'
  | 'QUEUE_FULL'
  | 'CONTEXT_LENGTH_EXCEEDED'
  | 'CONFIG_INVALID'
  | 'BACKEND_UNAVAILABLE'
  | 'ENGINE_FAILED'
  | 'MODEL_OUTPUT_NOT_FINITE'
  | 'STORAGE_FULL'
  | 'LISTEN_FAILED'
  // tenants and keys (src/tenants, src/api/authentication.ts)
  | 'MISSING_API_KEY'
  | 'INVALID_API_KEY'
  | 'PERMISSION_DENIED'
  | 'LORA_PATH_FORBIDDEN'
  | 'UNAUTHENTICATED_LISTEN_REFUSED'
  // HTTP transport and server lifecycle (src/api): Fastify's and Node's own errors get these
  | 'JSON_INVALID'
  | 'MEDIA_TYPE_UNSUPPORTED'
  | 'BODY_TOO_LARGE'
  | 'URL_TOO_LONG'
  | 'URL_INVALID'
  | 'ROUTE_NOT_FOUND'
  | 'METHOD_NOT_ALLOWED'
  | 'REQUEST_TIMEOUT'
  | 'HEADERS_TOO_LARGE'
  | 'REQUEST_MALFORMED'
  | 'SERVER_SHUTTING_DOWN'
  | 'CLIENT_TOO_SLOW'
  | 'INTERNAL_ERROR'
  // federation (src/federation)
  | 'FEDERATION_DISABLED'
  | 'FED_JOB_INVALID'
  | 'FED_METHOD_UNKNOWN'
  | 'FED_RANK_TOO_LARGE'
  | 'FED_TARGET_MODULE_UNKNOWN'
  | 'FED_MIN_CLIENTS_TOO_HIGH'
  | 'FED_CLIENT_UNKNOWN'
  | 'FED_JOB_NOT_FOUND'
  | 'FED_JOB_FINISHED'
  | 'FED_ROUND_NOT_FOUND'
  | 'FED_UPDATE_NOT_FOUND'
  | 'FED_QUORUM_NOT_MET'
  | 'FED_BASE_MISMATCH'
  | 'FED_DATA_INVALID'
  | 'FED_DP_INVALID'
  | 'FED_DP_BUDGET_EXCEEDED'
  | 'FED_DP_UNSUPPORTED'
  | 'FED_ROBUST_UNSUPPORTED'
  | 'UPDATE_REJECTED';

export class LoraGatewayError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** A model or checkpoint file is missing, corrupt or does not fit the model's config. */
export class ModelFormatError extends LoraGatewayError {
  readonly file: string;

  constructor(code: ErrorCode, file: string, message: string, options?: { cause?: unknown }) {
    super(code, `${file}: ${message}`, options);
    this.file = file;
  }
}

/** A PEFT adapter cannot be served by this model: bad files, unsupported options or shapes. */
export class AdapterError extends LoraGatewayError {}

/** A generation request is malformed or cannot fit the model. */
export class RequestError extends LoraGatewayError {}

/** Startup configuration (flags, environment) is invalid, or a backend cannot load. */
export class ConfigError extends LoraGatewayError {}

/** A request carries no valid API key, or its key may not use the route. */
export class AuthError extends LoraGatewayError {}

/** A federation job spec, round or client update is invalid, or federation is off. */
export class FederationError extends LoraGatewayError {}

/**
 * A client's update cannot be aggregated. `reason` is a stable snake_case name recorded in the
 * round record (hash_mismatch, not_safetensors, metadata_mismatch, unexpected_tensor,
 * missing_tensor, shape_mismatch, not_finite, num_examples_invalid, too_large, missing).
 */
export class UpdateRejectedError extends LoraGatewayError {
  readonly reason: string;

  constructor(reason: string, message: string, options?: { cause?: unknown }) {
    super('UPDATE_REJECTED', `${reason}: ${message}`, options);
    this.reason = reason;
  }
}

/** An error as it crosses a thread boundary (structured clone keeps neither class nor code reliably). */
export interface WireError {
  name: string;
  message: string;
  code?: ErrorCode;
  /** An UpdateRejectedError's reason. */
  reason?: string;
}

export function errorToWire(err: unknown): WireError {
  const e = err instanceof Error ? err : new Error(String(err));
  return {
    name: e.name,
    message: e.message,
    ...(err instanceof LoraGatewayError ? { code: err.code } : {}),
    ...(err instanceof UpdateRejectedError ? { reason: err.reason } : {}),
  };
}

const WIRE_CLASSES: Record<string, new (code: ErrorCode, message: string) => LoraGatewayError> = {
  AdapterError,
  RequestError,
  ConfigError,
  FederationError,
  LoraGatewayError,
};

/** The same class and code on this side (ModelFormatError and others arrive as LoraGatewayError). */
export function errorFromWire(w: WireError): Error {
  if (w.reason !== undefined) return new UpdateRejectedError(w.reason, w.message.replace(`${w.reason}: `, ''));
  if (!w.code) return Object.assign(new Error(w.message), { name: w.name });
  return new (WIRE_CLASSES[w.name] ?? LoraGatewayError)(w.code, w.message);
}
