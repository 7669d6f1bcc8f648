/*
 * lora-gateway's native matrix products: a Node-API binding of OpenBLAS's cblas_sgemm, called by
 * the BatchMatMul kernel that src/model/backend/native-matmul.ts registers for the wasm backend.
 * Operands are Float32Array views straight into the wasm heap (no copy); OpenBLAS runs its own
 * thread pool, so one call uses every core.
 *
 *   sgemmBatch(a, b, c, batch, m, n, k, transA, transB, strideA, strideB)
 *     for i < batch:  C_i [m, n] = op(A_i) · op(B_i),   row-major,
 *     A_i = a + i·strideA (op(A_i) is [m, k]),  B_i = b + i·strideB (op(B_i) is [k, n]),
 *     C_i = c + i·m·n.  A stride of 0 broadcasts one matrix over the batch.
 */
#include <node_api.h>
#include <cblas.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

extern char *openblas_get_config(void);
extern int openblas_get_num_threads(void);
extern char *openblas_get_corename(void);

#define CHECK(call)                                                   \
  do {                                                                \
    if ((call) != napi_ok) {                                          \
      napi_throw_error(env, NULL, "lora_gateway_blas: " #call " failed"); \
      return NULL;                                                    \
    }                                                                 \
  } while (0)

static float *f32(napi_env env, napi_value v, size_t *length) {
  napi_typedarray_type type;
  void *data;
  if (napi_get_typedarray_info(env, v, &type, length, &data, NULL, NULL) != napi_ok || type != napi_float32_array) return NULL;
  return (float *)data;
}

static napi_value sgemm_batch(napi_env env, napi_callback_info info) {
  size_t argc = 11;
  napi_value argv[11];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc != 11) {
    napi_throw_type_error(env, NULL, "sgemmBatch(a, b, c, batch, m, n, k, transA, transB, strideA, strideB)");
    return NULL;
  }
  size_t la, lb, lc;
  float *a = f32(env, argv[0], &la), *b = f32(env, argv[1], &lb), *c = f32(env, argv[2], &lc);
  if (!a || !b || !c) {
    napi_throw_type_error(env, NULL, "a, b and c must be Float32Arrays");
    return NULL;
  }
  int64_t batch, m, n, k, sa, sb;
  bool ta, tb;
  CHECK(napi_get_value_int64(env, argv[3], &batch));
  CHECK(napi_get_value_int64(env, argv[4], &m));
  CHECK(napi_get_value_int64(env, argv[5], &n));
  CHECK(napi_get_value_int64(env, argv[6], &k));
  CHECK(napi_get_value_bool(env, argv[7], &ta));
  CHECK(napi_get_value_bool(env, argv[8], &tb));
  CHECK(napi_get_value_int64(env, argv[9], &sa));
  CHECK(napi_get_value_int64(env, argv[10], &sb));
  /* bounds: every matrix the loop touches must lie inside its view */
  if (batch < 1 || m < 1 || n < 1 || k < 1 || sa < 0 || sb < 0 || (size_t)((batch - 1) * sa + m * k) > la || (size_t)((batch - 1) * sb + k * n) > lb ||
      (size_t)(batch * m * n) > lc) {
    napi_throw_range_error(env, NULL, "sgemmBatch: shapes or strides exceed the arrays");
    return NULL;
  }
  if (m == 1) {
    /* one row: sgemv streams B once (measured on a 2-core EPYC, Haswell kernels, 512×1408:
     * sgemm at m = 1 reads 18 GB/s, sgemv 84 GB/s). The row is contiguous either way (lda = m = 1
     * when transposed); y = op(B)ᵀ·x, so B [k, n] is read transposed and Bᵀ [n, k] as it is. */
    for (int64_t i = 0; i < batch; i++) {
      if (tb) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (blasint)n, (blasint)k, 1.0f, b + i * sb, (blasint)k, a + i * sa, 1, 0.0f, c + i * n, 1);
      } else {
        cblas_sgemv(CblasRowMajor, CblasTrans, (blasint)k, (blasint)n, 1.0f, b + i * sb, (blasint)n, a + i * sa, 1, 0.0f, c + i * n, 1);
      }
    }
    return NULL;
  }
  if (!tb && batch >= 4 && m <= 8 && k * n <= 65536) {
    /* many tiny products (decode attention: per row and kv head, [g, d]·[d, C] and [g, C]·[C, d]):
     * a cblas call costs ~2 µs of setup each, more than the arithmetic, so they run here, each
     * row of C accumulated over k with the row of B contiguous (vectorized over n) */
    for (int64_t i = 0; i < batch; i++) {
      const float *A = a + i * sa, *Bm = b + i * sb;
      float *C = c + i * m * n;
      for (int64_t r = 0; r < m; r++) {
        float *cr = C + r * n;
        for (int64_t j = 0; j < n; j++) cr[j] = 0.0f;
        for (int64_t p = 0; p < k; p++) {
          const float av = ta ? A[p * m + r] : A[r * k + p];
          const float *br = Bm + p * n;
          for (int64_t j = 0; j < n; j++) cr[j] += av * br[j];
        }
      }
    }
    return NULL;
  }
  for (int64_t i = 0; i < batch; i++) {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (blasint)m, (blasint)n, (blasint)k, 1.0f, a + i * sa,
                ta ? (blasint)m : (blasint)k, b + i * sb, tb ? (blasint)k : (blasint)n, 0.0f, c + i * m * n, (blasint)n);
  }
  return NULL;
}


/*
 * Heterogeneous-adapter LoRA for one projection (S-LoRA's MBGMM/MBGMV, Punica's SGMV): rows
 * [start, start+count) of x [T, in] use participant p, whose lora_A is aT_p [in, r_p] and
 * lora_B bT_p [r_p, out], both read where they already are (no stacked copy):
 *   out[t] = s_p · (x[t] · aT_p) · bT_p   for t in a segment of p,   0 for rows in no segment.
 * Segments of 8 rows or more go through two sgemm calls; shorter ones (decode: one row per
 * sequence) through plain loops, which the compiler vectorizes, since a BLAS call per row costs
 * more than the row's 2·r·(in+out) flops.
 *
 *   loraSgmv(x, out, T, in, out, segments Int32Array [start, count, p]*, aT[], bT[], ranks Int32Array, scales Float32Array)
 */
static napi_value lora_sgmv(napi_env env, napi_callback_info info) {
  size_t argc = 11;
  napi_value argv[11];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc != 10 && argc != 11) {
    napi_throw_type_error(env, NULL, "loraSgmv(x, out, T, inF, outF, segments, aT, bT, ranks, scales[, base])");
    return NULL;
  }
  size_t lx, lo, lseg, lr, ls;
  float *x = f32(env, argv[0], &lx), *out = f32(env, argv[1], &lo);
  int64_t T, inF, outF;
  CHECK(napi_get_value_int64(env, argv[2], &T));
  CHECK(napi_get_value_int64(env, argv[3], &inF));
  CHECK(napi_get_value_int64(env, argv[4], &outF));
  napi_typedarray_type type;
  void *segData, *rankData, *scaleData;
  CHECK(napi_get_typedarray_info(env, argv[5], &type, &lseg, &segData, NULL, NULL));
  if (type != napi_int32_array) goto bad;
  CHECK(napi_get_typedarray_info(env, argv[8], &type, &lr, &rankData, NULL, NULL));
  if (type != napi_int32_array) goto bad;
  float *scales = f32(env, argv[9], &ls);
  float *base = NULL;
  if (argc == 11) {
    napi_valuetype bt;
    CHECK(napi_typeof(env, argv[10], &bt));
    if (bt != napi_null && bt != napi_undefined) {
      size_t lb0;
      base = f32(env, argv[10], &lb0);
      if (!base || lb0 < (size_t)(T * outF)) goto bad;
    }
  }
  if (!x || !out || !scales || ls != lr || lseg % 3 != 0 || (size_t)(T * inF) > lx || (size_t)(T * outF) > lo) goto bad;
  uint32_t na, nb;
  CHECK(napi_get_array_length(env, argv[6], &na));
  CHECK(napi_get_array_length(env, argv[7], &nb));
  if (na != lr || nb != lr) goto bad;
  const int32_t *seg = (const int32_t *)segData, *ranks = (const int32_t *)rankData;
  float **as = malloc(sizeof(float *) * (lr + 1)), **bs = malloc(sizeof(float *) * (lr + 1));
  int32_t maxRank = 1;
  for (uint32_t p = 0; p < lr; p++) {
    napi_value va, vb;
    size_t la, lb;
    napi_get_element(env, argv[6], p, &va);
    napi_get_element(env, argv[7], p, &vb);
    as[p] = f32(env, va, &la);
    bs[p] = f32(env, vb, &lb);
    if (!as[p] || !bs[p] || ranks[p] < 1 || la < (size_t)(inF * ranks[p]) || lb < (size_t)(ranks[p] * outF)) {
      free(as);
      free(bs);
      goto bad;
    }
    if (ranks[p] > maxRank) maxRank = ranks[p];
  }
  for (size_t i = 0; i < lseg; i += 3) {
    if (seg[i] < 0 || seg[i + 1] < 0 || seg[i] + seg[i + 1] > T || seg[i + 2] < 0 || (size_t)seg[i + 2] >= lr) {
      free(as);
      free(bs);
      goto bad;
    }
  }
  /* out starts as the base (the projection's own output, so y + Σ deltas is formed here with no
   * [T, out] delta tensor in between) or as zeros; every segment then accumulates into it */
  if (base) memcpy(out, base, sizeof(float) * (size_t)(T * outF));
  else memset(out, 0, sizeof(float) * (size_t)(T * outF));
  int64_t maxCount = 0;
  for (size_t i = 0; i < lseg; i += 3) if (seg[i + 1] > maxCount) maxCount = seg[i + 1];
  float *u = malloc(sizeof(float) * (size_t)(maxCount > 0 ? maxCount : 1) * maxRank);
  for (size_t i = 0; i < lseg; i += 3) {
    const int64_t start = seg[i], count = seg[i + 1];
    const int32_t p = seg[i + 2], r = ranks[p];
    const float *A = as[p], *B = bs[p], s = scales[p];
    const float *X = x + start * inF;
    float *Y = out + start * outF;
    if (count == 0) continue;
    if (count >= 8) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)count, r, (blasint)inF, 1.0f, X, (blasint)inF, A, r, 0.0f, u, r);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)count, (blasint)outF, r, s, u, r, B, (blasint)outF, 1.0f, Y, (blasint)outF);
      continue;
    }
    for (int64_t t = 0; t < count; t++) {
      const float *xr = X + t * inF;
      float *yr = Y + t * outF;
      for (int32_t j = 0; j < r; j++) u[j] = 0.0f;
      /* u = x · aT: aT rows are contiguous in r */
      for (int64_t k = 0; k < inF; k++) {
        const float xv = xr[k];
        const float *ar = A + k * r;
        for (int32_t j = 0; j < r; j++) u[j] += xv * ar[j];
      }
      /* y = s · u · bT: bT rows are contiguous in out */
      for (int32_t j = 0; j < r; j++) {
        const float uj = s * u[j];
        const float *br = B + (int64_t)j * outF;
        for (int64_t o = 0; o < outF; o++) yr[o] += uj * br[o];
      }
    }
  }
  free(u);
  free(as);
  free(bs);
  return NULL;
bad:
  napi_throw_range_error(env, NULL, "loraSgmv: arrays, shapes or segments do not fit");
  return NULL;
}



/*
 * e^x for x ≤ 0 in float32, written so the compiler vectorizes it (glibc's expf is a call per
 * element): x = n·ln2 + r with |r| ≤ ln2/2 (ln2 split in two for an exact product), e^r by its
 * degree-6 Taylor polynomial (Horner; truncation < 2e-8 relative), times 2^n built in the
 * exponent bits. Arguments below −87 are clamped there (e^−87 ≈ 1.6e-38, nothing beside the
 * row's maximum term, which is 1).
 */
static inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  /* round to nearest by the 1.5·2^23 trick (no libm call, so the loop vectorizes) */
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  union { uint32_t u; float f; } scale = { .u = (uint32_t)((int32_t)n + 127) << 23 };
  return p * scale.f;
}

/*
 * log Σ exp(x) of one logits row, max-shifted, summed in double: the logprob of every sampled
 * token needs it over the whole vocabulary, and V8's Math.exp took ~0.9 ms per 50k-token row
 * (60 ms of every decode step at batch 64). exp_nonpositive adds ~1e-7 relative error per
 * term, below the float32 rounding of the logits themselves.
 */
static napi_value log_sum_exp(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  size_t n;
  float *x = argc == 1 ? f32(env, argv[0], &n) : NULL;
  if (!x) {
    napi_throw_type_error(env, NULL, "logSumExp(Float32Array)");
    return NULL;
  }
  float max = -INFINITY;
  for (size_t i = 0; i < n; i++) max = x[i] > max ? x[i] : max;
  /* terms in float chunks (a vectorized loop), summed in double over 8 independent lanes */
  float chunk[1024];
  double lanes[8] = {0};
  for (size_t base = 0; base < n; base += 1024) {
    const size_t m = n - base < 1024 ? n - base : 1024;
    for (size_t i = 0; i < m; i++) chunk[i] = exp_nonpositive(x[base + i] - max);
    size_t i = 0;
    for (; i + 8 <= m; i += 8)
      for (int l = 0; l < 8; l++) lanes[l] += (double)chunk[i + l];
    for (; i < m; i++) lanes[0] += (double)chunk[i];
  }
  double sum = 0.0;
  for (int l = 0; l < 8; l++) sum += lanes[l];
  CHECK(napi_create_double(env, (double)max + log(sum), &result));
  return result;
}

static napi_value describe(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value obj, v;
  CHECK(napi_create_object(env, &obj));
  CHECK(napi_create_string_utf8(env, openblas_get_config(), NAPI_AUTO_LENGTH, &v));
  CHECK(napi_set_named_property(env, obj, "config", v));
  CHECK(napi_create_string_utf8(env, openblas_get_corename(), NAPI_AUTO_LENGTH, &v));
  CHECK(napi_set_named_property(env, obj, "core", v));
  CHECK(napi_create_int32(env, openblas_get_num_threads(), &v));
  CHECK(napi_set_named_property(env, obj, "threads", v));
  return obj;
}

static napi_value set_threads(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t n;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  CHECK(napi_get_value_int32(env, argv[0], &n));
  if (n >= 1) openblas_set_num_threads(n);
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"sgemmBatch", NULL, sgemm_batch, NULL, NULL, NULL, napi_default, NULL},
      {"describe", NULL, describe, NULL, NULL, NULL, napi_default, NULL},
      {"setThreads", NULL, set_threads, NULL, NULL, NULL, napi_default, NULL},
      {"loraSgmv", NULL, lora_sgmv, NULL, NULL, NULL, napi_default, NULL},
      {"logSumExp", NULL, log_sum_exp, NULL, NULL, NULL, napi_default, NULL},
  };
  CHECK(napi_define_properties(env, exports, 5, props));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
