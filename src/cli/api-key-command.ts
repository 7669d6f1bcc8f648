import { LoraGatewayError } from '../errors.js';
import { createApiKey, readApiKeyFile, revokeApiKeys, type Role } from '../tenants/api-key-file.js';

export interface ApiKeyFlags {
  'api-keys'?: string;
  tenant?: string;
  role?: string;
  id?: string;
  key?: string;
  json?: boolean;
}

/**
 * `lora-gateway api-key create|revoke|list --api-keys FILE …`. create prints the new key once
 * (it is not stored, only its hash); a running server reads the file again on SIGHUP.
 */
export async function apiKeyCommand(action: string | undefined, flags: ApiKeyFlags, out: (s: string) => void): Promise<void> {
  const file = flags['api-keys'];
  if (!file) throw new LoraGatewayError('REQUEST_INVALID', 'api-key needs --api-keys FILE');
  if (action === 'create') {
    if (!flags.tenant) throw new LoraGatewayError('REQUEST_INVALID', 'api-key create needs --tenant NAME');
    const role = (flags.role ?? 'tenant') as Role;
    if (role !== 'admin' && role !== 'tenant') throw new LoraGatewayError('REQUEST_INVALID', `--role must be admin or tenant, got '${flags.role}'`);
    const { key, entry } = await createApiKey(file, flags.tenant, role);
    if (flags.json) out(`${JSON.stringify({ key, tenant: entry.tenant, role: entry.role, id: entry.id })}\n`);
    else out(`${key}\n`);
    return;
  }
  if (action === 'revoke') {
    if (!flags.id && !flags.key && !flags.tenant) throw new LoraGatewayError('REQUEST_INVALID', 'api-key revoke needs --id KEY_ID, --key KEY or --tenant NAME');
    const removed = await revokeApiKeys(file, { id: flags.id, key: flags.key, tenant: flags.tenant });
    if (removed.length === 0) throw new LoraGatewayError('REQUEST_INVALID', 'no key matched: nothing revoked');
    if (flags.json) out(`${JSON.stringify({ revoked: removed.map((e) => ({ id: e.id, tenant: e.tenant, role: e.role })) })}\n`);
    else for (const e of removed) out(`revoked ${e.id} (tenant ${e.tenant}, ${e.role})\n`);
    return;
  }
  if (action === 'list') {
    const keys = await readApiKeyFile(file, { allowMissing: true });
    const rows = keys.map((e) => ({ id: e.id, tenant: e.tenant, role: e.role, created_at: e.created_at }));
    if (flags.json) for (const r of rows) out(`${JSON.stringify(r)}\n`);
    else for (const r of rows) out(`${r.id}\t${r.tenant}\t${r.role}\t${r.created_at}\n`);
    return;
  }
  throw new LoraGatewayError('REQUEST_INVALID', `api-key needs an action: create, revoke or list (got '${action ?? ''}')`);
}
