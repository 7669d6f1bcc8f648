import assert from 'node:assert/strict';
import { LoraGatewayError, ModelFormatError, UpdateRejectedError, type ErrorCode } from '../../src/errors.js';

/** assert.rejects/throws predicate: a ModelFormatError with this code whose message mentions each string. */
export function hasCode(code: ErrorCode, ...mentions: string[]) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof ModelFormatError, `expected ModelFormatError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    for (const m of mentions) assert.ok(err.message.includes(m), `message '${err.message}' should mention '${m}'`);
    return true;
  };
}

/** assert.rejects/throws predicate: an UpdateRejectedError with this reason whose message mentions each string. */
export function rejects(reason: string, ...mentions: string[]) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof UpdateRejectedError, `expected UpdateRejectedError, got ${String(err)}`);
    assert.equal(err.reason, reason, err.message);
    for (const m of mentions) assert.ok(err.message.includes(m), `'${err.message}' should mention '${m}'`);
    return true;
  };
}

/** assert.rejects/throws predicate: any LoraGatewayError with this code whose message mentions each string. */
export function withCode(code: ErrorCode, ...mentions: string[]) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof LoraGatewayError, `expected LoraGatewayError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    for (const m of mentions) assert.ok(err.message.includes(m), `message '${err.message}' should mention '${m}'`);
    return true;
  };
}
