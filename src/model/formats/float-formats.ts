/**
 * Bit-exact conversions between float32 and the 16-bit float formats checkpoints are stored
 * in. Everything works on raw bit patterns (Uint32Array views of the float32 data), so NaN
 * payloads and -0 survive and no value goes through float64 rounding.
 *
 *   f16  = s:1 e:5  m:10, bias 15;  e=0 subnormal (m·2^-24), e=31 inf/NaN
 *   bf16 = s:1 e:8  m:7,  bias 127; exactly the top 16 bits of an f32
 */

/** f16 bits → f32 bits for all 65536 inputs; 256 KiB, built on first use. */
let f16Table: Uint32Array | undefined;

function f16ToF32BitsTable(): Uint32Array {
  if (f16Table) return f16Table;
  const table = new Uint32Array(65536);
  for (let h = 0; h < 65536; h++) table[h] = f16BitsToF32Bits(h);
  f16Table = table;
  return table;
}

/** One f16 bit pattern → the f32 bit pattern of the same value. */
function f16BitsToF32Bits(h: number): number {
  const sign = (h & 0x8000) << 16;
  const exp = (h >>> 10) & 0x1f;
  let mant = h & 0x3ff;
  if (exp === 0x1f) {
    // inf (mant 0) or NaN: keep the payload in the top mantissa bits, as hardware does.
    return (sign | 0x7f800000 | (mant << 13)) >>> 0;
  }
  if (exp !== 0) {
    // normal: rebias 15 → 127
    return (sign | ((exp + 112) << 23) | (mant << 13)) >>> 0;
  }
  if (mant === 0) return sign >>> 0; // ±0
  // Subnormal m·2^-24 is a normal f32: shift the leading 1 up to the implicit-bit position.
  let e = 113; // exponent field of 2^-14, the value of bit 10 once normalised
  while ((mant & 0x400) === 0) {
    mant <<= 1;
    e--;
  }
  return (sign | (e << 23) | ((mant & 0x3ff) << 13)) >>> 0;
}

/** Decodes f16 bit patterns into `dst` (same length), exactly. */
export function decodeF16Into(src: Uint16Array, dst: Float32Array): void {
  const table = f16ToF32BitsTable();
  const out = new Uint32Array(dst.buffer, dst.byteOffset, dst.length);
  for (let i = 0; i < src.length; i++) out[i] = table[src[i]];
}

/** Decodes bf16 bit patterns into `dst` (same length): each is the top half of an f32. */
export function decodeBf16Into(src: Uint16Array, dst: Float32Array): void {
  const out = new Uint32Array(dst.buffer, dst.byteOffset, dst.length);
  for (let i = 0; i < src.length; i++) out[i] = src[i] << 16;
}

export function f16BitsToF32(src: Uint16Array): Float32Array {
  const dst = new Float32Array(src.length);
  decodeF16Into(src, dst);
  return dst;
}

export function bf16BitsToF32(src: Uint16Array): Float32Array {
  const dst = new Float32Array(src.length);
  decodeBf16Into(src, dst);
  return dst;
}

/**
 * f32 → f16, rounding to nearest, ties to even. Values past the f16 range become ±inf,
 * values below half the smallest subnormal (2^-25) become ±0, NaN stays a quiet NaN
 * with the top of its payload.
 */
export function f32ToF16Bits(src: Float32Array): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const dst = new Uint16Array(src.length);
  for (let i = 0; i < bits.length; i++) dst[i] = f32BitsToF16Bits(bits[i]);
  return dst;
}

function f32BitsToF16Bits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) {
    // 0x200 sets the quiet bit, so a NaN whose payload sits only in the low 13 bits stays NaN.
    return mant === 0 ? sign | 0x7c00 : sign | 0x7e00 | (mant >>> 13);
  }
  const e = exp - 112; // f16 exponent field if the value were normal
  if (e >= 31) return sign | 0x7c00;
  if (e > 0) {
    const h = (e << 10) | (mant >>> 13);
    const rest = mant & 0x1fff;
    // A carry out of the mantissa correctly bumps the exponent, up to inf.
    const up = rest > 0x1000 || (rest === 0x1000 && (h & 1) === 1);
    return sign | (h + (up ? 1 : 0));
  }
  // Subnormal result: m16 = M·2^(exp-126) with M the 24-bit significand, i.e. M >> (14 - e).
  // At e = -10 the value is in [2^-25, 2^-24): exactly 2^-25 ties to 0, anything above rounds up.
  if (e < -10) return sign;
  const m = mant | 0x800000;
  const shift = 14 - e;
  const h = m >>> shift;
  const rest = m & ((1 << shift) - 1);
  const half = 1 << (shift - 1);
  const up = rest > half || (rest === half && (h & 1) === 1);
  return sign | (h + (up ? 1 : 0));
}

/** f32 → bf16, rounding to nearest, ties to even; NaN stays a quiet NaN. */
export function f32ToBf16Bits(src: Float32Array): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const dst = new Uint16Array(src.length);
  for (let i = 0; i < bits.length; i++) {
    const x = bits[i];
    if ((x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff) !== 0) {
      // Truncating could drop the whole payload and turn NaN into inf; force the quiet bit.
      dst[i] = (x >>> 16) | 0x40;
    } else {
      // Adding 0x7fff plus the lowest kept bit rounds half to even; overflow carries to inf.
      dst[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
    }
  }
  return dst;
}
