import assert from 'node:assert/strict';
import { ModelFormatError, type ErrorCode } from '../../src/errors.js';

/** assert.rejects/throws predicate: a ModelFormatError with this code whose message mentions each string. */
export function hasCode(code: ErrorCode, ...mentions: string[]) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof ModelFormatError, `expected ModelFormatError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    for (const m of mentions) assert.ok(err.message.includes(m), `message '${err.message}' should mention '${m}'`);
    return true;
  };
}
