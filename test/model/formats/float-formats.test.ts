import { test } from 'node:test';
import assert from 'node:assert/strict';
import { bf16BitsToF32, f16BitsToF32, f32ToBf16Bits, f32ToF16Bits } from '../../../src/model/formats/float-formats.js';

function bitsOf(a: Float32Array): number[] {
  return [...new Uint32Array(a.buffer, a.byteOffset, a.length)];
}

function f32FromBits(bits: number[]): Float32Array {
  return new Float32Array(new Uint32Array(bits).buffer);
}
// ---- float formats -----------------------------------------------------------------------

/** Obvious f16 decoder for reference: (-1)^s · 2^(e-15) · 1.m, or 2^-14 · 0.m for e = 0. */
function f16Reference(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0x1f) return m ? NaN : s * Infinity;
  return e === 0 ? s * 2 ** -14 * (m / 1024) : s * 2 ** (e - 15) * (1 + m / 1024);
}

test('F16 decoding matches a reference decoder for all 65536 bit patterns, and re-encodes to the same bits', () => {
  const all = new Uint16Array(65536).map((_, i) => i);
  const dec = f16BitsToF32(all);
  const back = f32ToF16Bits(dec);
  for (let h = 0; h < 65536; h++) {
    const want = f16Reference(h);
    if (Number.isNaN(want)) {
      assert.ok(Number.isNaN(dec[h]), `0x${h.toString(16)}`);
      assert.ok((back[h] & 0x7c00) === 0x7c00 && (back[h] & 0x3ff) !== 0, `NaN 0x${h.toString(16)} re-encodes as NaN`);
    } else {
      assert.ok(Object.is(dec[h], want), `0x${h.toString(16)}: ${dec[h]} != ${want}`);
      assert.equal(back[h], h);
    }
  }
});

test('F16 subnormals, infinities, NaN and -0 decode to the exact float32 values', () => {
  const dec = f16BitsToF32(new Uint16Array([0x0001, 0x03ff, 0x0400, 0x7c00, 0xfc00, 0x7e00, 0x8000, 0x8001, 0x7bff]));
  assert.equal(dec[0], 2 ** -24);
  assert.equal(dec[1], 1023 * 2 ** -24);
  assert.equal(dec[2], 2 ** -14);
  assert.equal(dec[3], Infinity);
  assert.equal(dec[4], -Infinity);
  assert.ok(Number.isNaN(dec[5]));
  assert.ok(Object.is(dec[6], -0));
  assert.equal(dec[7], -(2 ** -24));
  assert.equal(dec[8], 65504);
});

test('BF16 decodes as the top 16 bits of a float32, including subnormals, infinity and NaN', () => {
  const src = new Uint16Array([0x3f80, 0x0001, 0x7f80, 0xffc0, 0x8000, 0xc060]);
  assert.deepEqual(bitsOf(bf16BitsToF32(src)), [...src].map((h) => (h << 16) >>> 0));
  const dec = bf16BitsToF32(src);
  assert.equal(dec[0], 1);
  assert.equal(dec[1], 2 ** -133);
  assert.equal(dec[2], Infinity);
  assert.ok(Number.isNaN(dec[3]));
  assert.ok(Object.is(dec[4], -0));
  assert.equal(dec[5], -3.5);
});

test('f32 to F16 rounds to nearest, ties to even, at chosen values including overflow and subnormals', () => {
  const cases: [number, number][] = [
    [1 + 2 ** -11, 0x3c00], // tie between 1 (even) and 1+2^-10: down
    [1 + 3 * 2 ** -11, 0x3c02], // tie between 0x3c01 (odd) and 0x3c02: up
    [1 + 2 ** -11 + 2 ** -20, 0x3c01], // just above the tie: up
    [65519, 0x7bff],
    [65520, 0x7c00], // tie between 65504 (odd mantissa) and 2^16: up, to inf
    [1e10, 0x7c00],
    [-1e10, 0xfc00],
    [2 ** -25, 0x0000], // tie between 0 (even) and the smallest subnormal
    [Math.fround(2 ** -25 + 2 ** -40), 0x0001],
    [3 * 2 ** -25, 0x0002], // tie between subnormals 1 and 2
    [2 ** -14 - 2 ** -25, 0x0400], // tie between the largest subnormal (odd) and the smallest normal
    [2 ** -26, 0x0000],
    [-1e-10, 0x8000],
    [-0, 0x8000],
    [Infinity, 0x7c00],
  ];
  const got = f32ToF16Bits(new Float32Array(cases.map((c) => c[0])));
  cases.forEach(([x, want], i) => assert.equal(got[i], want, `${x} -> 0x${got[i].toString(16)}, want 0x${want.toString(16)}`));
  const nan = f32ToF16Bits(f32FromBits([0x7fc00000, 0x7f800001, 0xffc00000]));
  for (const h of nan) assert.ok((h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0, `0x${h.toString(16)} is NaN`);
});

test('f32 to F16 and BF16 round every midpoint between neighbouring values to the even one', () => {
  for (const [bits, decode, encode] of [
    [0x7c00, f16BitsToF32, f32ToF16Bits],
    [0x7f80, bf16BitsToF32, f32ToBf16Bits],
  ] as const) {
    // All positive finite values a < b that are neighbours; their midpoint is exact in f32.
    const values = decode(new Uint16Array(bits).map((_, i) => i));
    const mids = new Float32Array(bits - 1);
    for (let h = 0; h + 1 < bits; h++) mids[h] = (values[h] + values[h + 1]) / 2;
    const midBits = new Uint32Array(mids.buffer);
    const above = new Float32Array(new Uint32Array(midBits).map((b) => b + 1).buffer);
    const below = new Float32Array(new Uint32Array(midBits).map((b) => b - 1).buffer);
    const [m, up, down] = [encode(mids), encode(above), encode(below)];
    for (let h = 0; h + 1 < bits; h++) {
      assert.equal(m[h], h % 2 === 0 ? h : h + 1, `midpoint after 0x${h.toString(16)}`);
      assert.equal(up[h], h + 1);
      if (h > 0) assert.equal(down[h], h);
    }
  }
});

test('f32 to BF16 rounds to nearest even, overflows to inf, keeps -0 and keeps NaN a NaN', () => {
  const input = new Float32Array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -0, 3.4028234663852886e38, -Infinity]);
  assert.deepEqual([...f32ToBf16Bits(input)], [0x3f80, 0x3f82, 0x3f81, 0x8000, 0x7f80, 0xff80]);
  // A NaN whose payload is only in the low 16 bits must not truncate to inf.
  const nan = f32ToBf16Bits(f32FromBits([0x7f800001, 0xff800100, 0x7fc00000]));
  for (const h of nan) assert.ok((h & 0x7f80) === 0x7f80 && (h & 0x7f) !== 0, `0x${h.toString(16)} is NaN`);
  assert.equal(nan[1] & 0x8000, 0x8000);
});
