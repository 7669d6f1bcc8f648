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
  for (int64_t i = 0; i < batch; i++) {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (blasint)m, (blasint)n, (blasint)k, 1.0f, a + i * sa,
                ta ? (blasint)m : (blasint)k, b + i * sb, tb ? (blasint)k : (blasint)n, 0.0f, c + i * m * n, (blasint)n);
  }
  return NULL;
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
  };
  CHECK(napi_define_properties(env, exports, 3, props));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
