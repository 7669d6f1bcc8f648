import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { startServe, type ServeProcess } from '../helpers/serve-process.js';

/** Runs the CLI from source with stdout and stderr on pipes, as a script would. */
function cli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

let root: string;
let keys: string;
let server: ServeProcess | undefined;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-apikey-'));
  keys = join(root, 'keys.json');
});
after(async () => {
  await server?.stop();
  await rm(root, { recursive: true, force: true });
});

const models = (url: string, key?: string) => fetch(`${url}/v1/models`, { headers: key ? { authorization: `Bearer ${key}` } : {} });

test('api-key create --json prints one JSON line with the key once; the file holds only its SHA-256, readable by its owner alone', async () => {
  const made = await cli(['api-key', 'create', '--api-keys', keys, '--tenant', 'acme', '--json']);
  assert.equal(made.code, 0, made.stderr);
  const lines = made.stdout.trim().split('\n');
  assert.equal(lines.length, 1);
  const out = JSON.parse(lines[0]) as { key: string; tenant: string; role: string; id: string };
  assert.equal(out.tenant, 'acme');
  assert.equal(out.role, 'tenant');
  const text = await readFile(keys, 'utf8');
  assert.ok(!text.includes(out.key), 'the key itself is never stored');
  assert.equal((await stat(keys)).mode & 0o077, 0, 'no access for group or others');
  const listed = await cli(['api-key', 'list', '--api-keys', keys, '--json']);
  assert.deepEqual(
    listed.stdout
      .trim()
      .split('\n')
      .map((l) => (JSON.parse(l) as { id: string }).id),
    [out.id],
  );
  const bad = await cli(['api-key', 'create', '--api-keys', keys, '--tenant', 'no.dots']);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /^error CONFIG_INVALID: --tenant 'no\.dots' is invalid/);
});

test('serve --api-keys accepts a created key, and after api-key revoke and SIGHUP the key gets 401', async () => {
  const admin = JSON.parse((await cli(['api-key', 'create', '--api-keys', keys, '--tenant', 'ops', '--role', 'admin', '--json'])).stdout) as { key: string };
  const tenant = JSON.parse((await cli(['api-key', 'create', '--api-keys', keys, '--tenant', 'beta', '--json'])).stdout) as { key: string; id: string };
  server = await startServe(['--data', join(root, 'data'), '--port', '0', '--backend', 'wasm', '--api-keys', keys]);
  assert.match(server.text(), /API keys on: 3 key\(s\)/);
  assert.equal((await models(server.url)).status, 401);
  assert.equal((await models(server.url, tenant.key)).status, 200);
  assert.equal((await models(server.url, admin.key)).status, 200);
  const revoked = await cli(['api-key', 'revoke', '--api-keys', keys, '--id', tenant.id]);
  assert.equal(revoked.code, 0, revoked.stderr);
  assert.match(revoked.stdout, /^revoked key_[0-9a-f]{12} \(tenant beta, tenant\)\n$/);
  server.child.kill('SIGHUP');
  await server.waitFor((e) => /SIGHUP: API keys re-read: 2 key/.test(e.msg));
  assert.equal((await models(server.url, tenant.key)).status, 401);
  assert.equal((await models(server.url, admin.key)).status, 200);
  const line = await server.waitFor((e) => e.msg === 'request' && e.tenant === 'beta');
  assert.equal(line.keyId, tenant.id, "request lines name the key's tenant and id");
  const logged = JSON.stringify(server.entries);
  for (const k of [admin.key, tenant.key]) assert.ok(!logged.includes(k), 'no key is ever logged');
  await server.stop();
  server = undefined;
});

test('serve refuses a non-loopback address without keys in one line, exit 1, unless --allow-unauthenticated', async () => {
  const r = await cli(['serve', '--data', join(root, 'data'), '--host', '0.0.0.0', '--port', '0', '--backend', 'wasm']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^error UNAUTHENTICATED_LISTEN_REFUSED: refusing to listen on 0\.0\.0\.0 without API keys/m);
  assert.ok(!/\n\s+at /.test(r.stderr), 'no stack trace');
});

test('fed-client-acl --json prints the ACL user, a fresh password and the ACL SETUSER line for one client', async () => {
  const r = await cli(['fed-client-acl', '--client-id', 'acme.w1', '--federation-prefix', 'p1', '--json']);
  assert.equal(r.code, 0, r.stderr);
  const acl = JSON.parse(r.stdout) as { user: string; password: string; rules: string[]; command: string };
  assert.equal(acl.user, 'lgw-client-acme.w1');
  assert.ok(acl.password.length >= 24);
  assert.ok(acl.rules.includes('~p1:fed-client-acme.w1:*'));
  assert.ok(acl.rules.includes('%W~p1:fed:update:*:*:*:acme.w1'));
  assert.equal(acl.command, `ACL SETUSER ${acl.user} ${acl.rules.join(' ')}`);
});
