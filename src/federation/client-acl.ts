import { randomBytes } from 'node:crypto';
import { FederationError } from '../errors.js';
import { CLIENT_ID_RE } from './job-spec.js';
import { FederationKeys } from './federation-keys.js';

/**
 * The Redis 7 ACL that confines one fed-client to what it must touch (federation-keys.ts):
 *
 *   read+write  <p>:fed-client-<id>:*                  its own BullMQ queue (tasks in, results out)
 *   write       <p>:fed:update:*:*:*:<id>              its own updates, never another client's
 *   read+write  <p>:fed:client:<id>                    its heartbeat;  write <p>:fed:clients (SADD)
 *   read        <p>:fed:global:*                       the global state a round starts from
 *   read+write  <p>:fed-aggregate:*                    BullMQ flow bookkeeping: a finished child
 *                                                      moves its parent (the round) on
 *
 * Another client's updates, heartbeat and queue, the job records, the noise keys of DP jobs
 * and every other key are out of reach (NOPERM). The coordinator trusts nothing a client can
 * write beyond its own: it reads each result from that client's own queue, fetches the update
 * only from the key fixed for (job, round, attempt, client) and checks its sha256, so entries
 * a client writes into the shared flow bookkeeping cannot stand in for another's update.
 * Commands: no KEYS/SCAN (no enumerating job ids), nothing administrative.
 */
export function fedClientAclRules(prefix: string, clientId: string): string[] {
  if (!CLIENT_ID_RE.test(clientId)) throw new FederationError('FED_JOB_INVALID', `client id '${clientId}' is invalid: use 1–64 letters, digits, '.', '_' or '-'`);
  const keys = new FederationKeys(prefix);
  const p = keys.prefix;
  return [
    'resetkeys',
    'resetchannels',
    `~${p}:${FederationKeys.clientQueue(clientId)}:*`,
    `%W~${keys.update('*', 0, 0, clientId).replace(':0:0:', ':*:*:')}`,
    `~${keys.client(clientId)}`,
    `%W~${keys.clients()}`,
    `%R~${keys.global('*', 0).replace(/:0$/, ':*')}`,
    `~${p}:${FederationKeys.aggregateQueue}:*`,
    '-@all',
    '+@read',
    '+@write',
    '+@scripting',
    '+@connection',
    '+@transaction',
    '+@blocking',
    '-keys',
    '-scan',
    '-randomkey',
    '-@admin',
    '-@dangerous',
    '+info',
    '+client|setname',
    '+client|getname',
    '+client|id',
  ];
}

/** A user name and a fresh password for one client, and the ACL SETUSER line that creates it. */
export function fedClientAcl(prefix: string, clientId: string): { user: string; password: string; rules: string[]; command: string } {
  const user = `lgw-client-${clientId}`;
  const password = randomBytes(24).toString('base64url');
  const rules = ['on', `>${password}`, ...fedClientAclRules(prefix, clientId)];
  return { user, password, rules, command: `ACL SETUSER ${user} ${rules.join(' ')}` };
}
