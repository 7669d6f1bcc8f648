/**
 * How tenants own things, in one place. Adapter ids are global in the store, so a tenant's
 * adapter `x` is stored as `<tenant>~x`: two tenants may both have an `x`, one tenant's upload
 * can never land on another's, and a tenant is shown only the part after the `~`. Plain ids
 * (no `~`) belong to no tenant: the open server's adapters, `--adapter-dir`'s, an admin's.
 *
 * Federation clients are named `<tenant>.<name>` (client ids allow '.', tenant names do not),
 * so a tenant's jobs train only on its own clients' data, and an admin provisions a client's
 * Redis ACL user from its id alone (see fedClientAclRules).
 */

/** 1–64 letters, digits, '_' or '-', starting with a letter or digit: no '.', no '~'. */
export const TENANT_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
export const TENANT_SEPARATOR = '~';

export function isTenantName(name: string): boolean {
  return TENANT_RE.test(name);
}

/** `<tenant>~<id>`: the store id of a tenant's adapter. */
export function qualifyAdapterId(tenant: string, id: string): string {
  return `${tenant}${TENANT_SEPARATOR}${id}`;
}

/** The owning tenant of a store id (undefined for a plain id) and the id its tenant sees. */
export function splitAdapterId(storeId: string): { tenant: string | undefined; name: string } {
  const at = storeId.indexOf(TENANT_SEPARATOR);
  if (at < 0) return { tenant: undefined, name: storeId };
  return { tenant: storeId.slice(0, at), name: storeId.slice(at + 1) };
}

/** A federation client belongs to tenant T when its id is `T.<name>`. */
export function clientBelongsTo(tenant: string, clientId: string): boolean {
  return clientId.startsWith(`${tenant}.`) && clientId.length > tenant.length + 1;
}
