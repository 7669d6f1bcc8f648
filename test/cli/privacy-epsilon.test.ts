import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { test } from 'node:test';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** The CLI as a user runs it, through pipes; resolves with the exit code instead of throwing. */
async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'privacy-epsilon', ...args]);
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

test("privacy-epsilon --json prints one line {epsilon, order} with Opacus's reference ε", async () => {
  const { code, stdout } = await cli('--sample-rate', '0.04', '--noise-multiplier', '1.5', '--steps', '2250', '--delta', '1e-5', '--json');
  assert.equal(code, 0);
  const lines = stdout.trim().split('\n');
  assert.equal(lines.length, 1);
  const out = JSON.parse(lines[0]) as { epsilon: number; order: number };
  assert.deepEqual(Object.keys(out).sort(), ['epsilon', 'order']);
  assert.ok(Math.abs(out.epsilon - 7.32911117143) < 5e-8, String(out.epsilon));
  assert.ok(out.order > 1);
});

test('privacy-epsilon --target-epsilon prints the smallest noise multiplier that meets it (to 0.01 in ε)', async () => {
  const { code, stdout } = await cli('--sample-rate', '0.04', '--target-epsilon', '8', '--steps', '2000', '--delta', '1e-5', '--json');
  assert.equal(code, 0);
  const out = JSON.parse(stdout) as { epsilon: number; order: number; noise_multiplier: number };
  assert.ok(Math.abs(out.noise_multiplier - 1.3562) < 5e-5, String(out.noise_multiplier));
  assert.ok(out.epsilon <= 8 && out.epsilon > 7.99, String(out.epsilon));
});

test('privacy-epsilon without --json says ε and the order in one line', async () => {
  const { code, stdout } = await cli('--sample-rate', '0.01', '--noise-multiplier', '1.1', '--steps', '10000', '--delta', '1e-5');
  assert.equal(code, 0);
  assert.match(stdout, /^ε = [0-9.]+ at RDP order [0-9.]+ \(q = 0\.01, σ = 1\.1, 10000 steps, δ = 0\.00001\)\n$/);
});

test('privacy-epsilon refuses missing or invalid parameters with exit code 2 and a message naming them', async () => {
  const missing = await cli('--sample-rate', '0.04', '--steps', '10', '--delta', '1e-5');
  assert.equal(missing.code, 2);
  assert.match(missing.stderr, /--noise-multiplier or --target-epsilon/);
  const bad = await cli('--sample-rate', '1.5', '--noise-multiplier', '1', '--steps', '10', '--delta', '1e-5');
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--sample-rate must be a number in \(0, 1\]/);
  const unknown = await cli('--sample-rate', '0.1', '--noise-multiplier', '1', '--steps', '10', '--delta', '1e-5', '--epochs', '3');
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /epochs/);
});
