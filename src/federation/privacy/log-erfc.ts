import erfc from '@stdlib/math-base-special-erfc';
import erfcx from '@stdlib/math-base-special-erfcx';

/**
 * log(erfc(x)) accurate in both tails: erfc itself where it is not small, and
 * log erfc(x) = −x² + log(erfcx(x)) (erfcx(x) = e^{x²}·erfc(x), the scaled complement) where
 * erfc would underflow or lose its relative precision. Opacus takes log(2) + log_ndtr(−x√2)
 * from SciPy for the same quantity.
 */
export function logErfc(x: number): number {
  if (Number.isNaN(x)) return NaN;
  if (x < 1) return Math.log(erfc(x));
  return -x * x + Math.log(erfcx(x));
}
