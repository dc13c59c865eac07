// XLA FFI handlers for the CPU backend: the dense training step of ReLU (standard) and JumpReLU
// SAEs, its five matrix products done by a BLAS sgemm with the elementwise work between them done
// on each block while it is in cache (jsae.saes._dense_fused).
//
// dense_encode, from x (n, d) — already less b_dec —, W_enc (d, m), b_enc (m), W_dec (m, d) and
// threshold (m) (JumpReLU), in blocks of tokens:
//   pre   = x W_enc + b_enc
//   h     = relu(pre)                      (standard: as jax.nn.relu, NaN stays NaN)
//         = pre where pre > threshold, else 0   (JumpReLU; NaN gives 0, as XLA's select)
//   lin   = h W_dec                        (n, d): the reconstruction before b_dec
//   sums  = sum over tokens of h           (m)
//   fired = tokens where h != 0            (m)  (JumpReLU: where pre > threshold)
//   l0    = latents where h != 0, a token  (n)  (JumpReLU: where pre > threshold)
// pre is written out for JumpReLU only (its backward needs it); a (0,) buffer otherwise.
//
// dense_backward, from the cotangents of lin (n, d), sums (m) and l0 (n), in blocks of latents
// (each block's columns of the W_enc gradient and rows of the W_dec gradient are its own, so no
// sum depends on how blocks are shared out):
//   g_W_dec = hᵀ g_lin
//   a       = g_lin W_decᵀ + g_sums                        the activations' cotangent
//   g_pre   = a * (h > 0)  (standard: a where pre > 0, else 0)
//           = a where pre > threshold, else 0 [+ ste]   (JumpReLU)
//     ste   = rect((pre - threshold) / bandwidth) * (threshold a + g_l0) / bandwidth, rect(u) = |u| < 1/2
//   g_b_enc = sum over tokens of g_pre;  g_W_enc = xᵀ g_pre;  g_threshold = -sum over tokens of ste
// g_pre is never written out: each block's columns are formed, used for g_W_enc and dropped.
// The sgemm is loaded at run time (JsaeLoadBlas) and called single-threaded from XLA's threads.
// matmul is a product alone on the same sgemm; adam (at the end) is the step's clipped Adam update
// of one parameter in one pass, in place.
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

using jsae::ParallelFor;

// cblas_sgemm with 32-bit integers (LP64), and its enumerations.
using Sgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                       int lda, const float* b, int ldb, float beta, float* c, int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
Sgemm sgemm = nullptr;

// Block sizes: about two blocks per thread, within bounds. OpenBLAS packs its operands afresh for
// every call, so bigger blocks run its products faster (on 2 cores, 768 -> 6144, 4096 tokens: the
// encoder's product at 272 GFLOP/s in blocks of 256 tokens, 337 in blocks of 1024); the backward's
// scratch block of g_pre, tokens x latents, stays within kScratchFloats.
constexpr int64_t kMinTokenBlock = 256, kMaxTokenBlock = 1024;
constexpr int64_t kMinLatentBlock = 256, kMaxLatentBlock = 2048, kScratchFloats = int64_t{8} << 20;

int64_t BlockSize(int64_t size, int64_t threads, int64_t least, int64_t most) {
  const int64_t share = (size + 2 * threads - 1) / (2 * threads);
  return std::max<int64_t>(1, std::min(std::max(least, (share + 63) / 64 * 64), most));
}

bool Fits(int64_t v) { return v >= 0 && v <= INT32_MAX; }

ffi::Error Check(bool ok, const char* message) {
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument(message);
}

// The elementwise work of one row of a block (separate functions with restrict pointers, so
// they vectorise). Forward: pre += b_enc, the activations, their column sums and counts; returns
// the row's count of firing latents (an integer sum of 0/1 floats, which vectorises).
int32_t ReluRow(float* __restrict pre, float* __restrict act, const float* __restrict b_enc, float* __restrict sums,
                float* __restrict fired, int64_t m) {
  int32_t count = 0;
  for (int64_t j = 0; j < m; ++j) {
    const float v = pre[j] + b_enc[j];
    const float a = v < 0.f ? 0.f : v;  // jax.nn.relu: NaN stays NaN
    const float on = a != 0.f ? 1.f : 0.f;
    act[j] = a;
    sums[j] += a;
    fired[j] += on;
    count += static_cast<int32_t>(on);
  }
  return count;
}

int32_t JumpRow(float* __restrict pre, float* __restrict act, const float* __restrict b_enc,
                const float* __restrict threshold, float* __restrict sums, float* __restrict fired, int64_t m) {
  int32_t count = 0;
  for (int64_t j = 0; j < m; ++j) {
    const float v = pre[j] + b_enc[j];
    const float on = v > threshold[j] ? 1.f : 0.f;
    const float a = v > threshold[j] ? v : 0.f;  // XLA makes x * (x > threshold) a select: NaN gives 0
    pre[j] = v;
    act[j] = a;
    sums[j] += a;
    fired[j] += on;
    count += static_cast<int32_t>(on);
  }
  return count;
}

// Backward: the activations' cotangent in g (plus g_sums) becomes g_pre, summed into g_b_enc (and
// the estimator's share into g_threshold).
void ReluGradRow(float* __restrict g, const float* __restrict act, const float* __restrict g_sums,
                 float* __restrict g_b_enc, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
    const float v = act[j] > 0.f ? g[j] + g_sums[j] : 0.f;
    g[j] = v;
    g_b_enc[j] += v;
  }
}

void JumpGradRow(float* __restrict g, const float* __restrict pre, const float* __restrict threshold,
                 const float* __restrict g_sums, float g_l0, float bandwidth, bool ste_to_input,
                 float* __restrict g_b_enc, float* __restrict g_threshold, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
    const float a = g[j] + g_sums[j];
    const float u = (pre[j] - threshold[j]) / bandwidth;
    const float rect = (u > -0.5f && u < 0.5f) ? 1.f : 0.f;
    const float ste = rect * ((threshold[j] * a + g_l0) / bandwidth);
    const float v = (pre[j] > threshold[j] ? a : 0.f) + (ste_to_input ? ste : 0.f);
    g[j] = v;
    g_b_enc[j] += v;
    g_threshold[j] -= ste;
  }
}

ffi::Error DenseEncode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W_enc,
                       ffi::Buffer<ffi::F32> b_enc, ffi::Buffer<ffi::F32> W_dec, ffi::Buffer<ffi::F32> threshold,
                       ffi::ResultBuffer<ffi::F32> h_out, ffi::ResultBuffer<ffi::F32> pre_out,
                       ffi::ResultBuffer<ffi::F32> lin_out, ffi::ResultBuffer<ffi::F32> sums_out,
                       ffi::ResultBuffer<ffi::F32> fired_out, ffi::ResultBuffer<ffi::F32> l0_out, bool jump) {
  if (sgemm == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "dense_encode: no BLAS loaded");
  auto xd = x.dimensions(), wd = W_enc.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("dense_encode takes x (n, d), W_enc (d, m)");
  const int64_t n = xd[0], d = xd[1], m = wd[1];
  if (auto e = Check(wd[0] == d && b_enc.element_count() == m && W_dec.element_count() == m * d &&
                         h_out->element_count() == n * m && lin_out->element_count() == n * d &&
                         sums_out->element_count() == m && fired_out->element_count() == m &&
                         l0_out->element_count() == n && Fits(n) && Fits(d) && Fits(m),
                     "dense_encode: operands of mismatched shapes");
      e.failure())
    return e;
  if (jump && (threshold.element_count() != m || pre_out->element_count() != n * m))
    return ffi::Error::InvalidArgument("dense_encode: JumpReLU needs threshold (m) and pre (n, m)");
  const float* xp = x.typed_data();
  const float* we = W_enc.typed_data();
  const float* be = b_enc.typed_data();
  const float* wdp = W_dec.typed_data();
  const float* th = jump ? threshold.typed_data() : nullptr;
  float* h = h_out->typed_data();
  float* pre = jump ? pre_out->typed_data() : h;  // standard: pre is formed in h, in place
  float* lin = lin_out->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t token_block = BlockSize(n, threads, kMinTokenBlock, kMaxTokenBlock);
  const int64_t blocks = (n + token_block - 1) / token_block;
  // Per block column sums, added in block order afterwards: the same sums whatever thread ran a block.
  std::vector<float> block_sums(blocks * m), block_fired(blocks * m);
  ParallelFor(pool, blocks, [&](int64_t b) {
    const int64_t t0 = b * token_block, rows = std::min(n, t0 + token_block) - t0;
    if (d > 0) {
      sgemm(kRowMajor, kNoTrans, kNoTrans, rows, m, d, 1.f, xp + t0 * d, d, we, m, 0.f, pre + t0 * m, m);
    } else {
      std::fill(pre + t0 * m, pre + (t0 + rows) * m, 0.f);
    }
    float* sums = block_sums.data() + b * m;
    float* fired = block_fired.data() + b * m;
    for (int64_t t = t0; t < t0 + rows; ++t) {
      float* p = pre + t * m;
      float* a = h + t * m;
      const int32_t count = jump ? JumpRow(p, a, be, th, sums, fired, m) : ReluRow(p, a, be, sums, fired, m);
      l0_out->typed_data()[t] = static_cast<float>(count);
    }
    if (m > 0) {
      sgemm(kRowMajor, kNoTrans, kNoTrans, rows, d, m, 1.f, h + t0 * m, m, wdp, d, 0.f, lin + t0 * d, d);
    } else {
      std::fill(lin + t0 * d, lin + (t0 + rows) * d, 0.f);
    }
  });
  float* sums = sums_out->typed_data();
  float* fired = fired_out->typed_data();
  std::fill(sums, sums + m, 0.f);
  std::fill(fired, fired + m, 0.f);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t j = 0; j < m; ++j) {
      sums[j] += block_sums[b * m + j];
      fired[j] += block_fired[b * m + j];
    }
  }
  return ffi::Error::Success();
}

ffi::Error DenseBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W_dec,
                         ffi::Buffer<ffi::F32> h_in, ffi::Buffer<ffi::F32> pre_in, ffi::Buffer<ffi::F32> threshold,
                         ffi::Buffer<ffi::F32> g_lin, ffi::Buffer<ffi::F32> g_sums, ffi::Buffer<ffi::F32> g_l0,
                         ffi::ResultBuffer<ffi::F32> g_W_enc, ffi::ResultBuffer<ffi::F32> g_b_enc,
                         ffi::ResultBuffer<ffi::F32> g_W_dec, ffi::ResultBuffer<ffi::F32> g_threshold, bool jump,
                         float bandwidth, bool ste_to_input) {
  if (sgemm == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "dense_backward: no BLAS loaded");
  auto xd = x.dimensions(), hd = h_in.dimensions();
  if (xd.size() != 2 || hd.size() != 2) return ffi::Error::InvalidArgument("dense_backward takes x (n, d), h (n, m)");
  const int64_t n = xd[0], d = xd[1], m = hd[1];
  if (auto e = Check(hd[0] == n && W_dec.element_count() == m * d && g_lin.element_count() == n * d &&
                         g_sums.element_count() == m && g_l0.element_count() == n &&
                         g_W_enc->element_count() == d * m && g_b_enc->element_count() == m &&
                         g_W_dec->element_count() == m * d && g_threshold->element_count() == m && Fits(n) &&
                         Fits(d) && Fits(m),
                     "dense_backward: operands of mismatched shapes");
      e.failure())
    return e;
  if (jump && (threshold.element_count() != m || pre_in.element_count() != n * m))
    return ffi::Error::InvalidArgument("dense_backward: JumpReLU needs threshold (m) and pre (n, m)");
  const float* xp = x.typed_data();
  const float* wdp = W_dec.typed_data();
  const float* h = h_in.typed_data();
  const float* pre = jump ? pre_in.typed_data() : nullptr;
  const float* th = jump ? threshold.typed_data() : nullptr;
  const float* gl = g_lin.typed_data();
  const float* gs = g_sums.typed_data();
  const float* g0 = g_l0.typed_data();
  float* gwe = g_W_enc->typed_data();
  float* gbe = g_b_enc->typed_data();
  float* gwd = g_W_dec->typed_data();
  float* gth = g_threshold->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t most = std::max<int64_t>(64, std::min(kMaxLatentBlock, kScratchFloats / std::max<int64_t>(1, n)));
  const int64_t latent_block = BlockSize(m, threads, std::min(kMinLatentBlock, most), most);
  const int64_t blocks = (m + latent_block - 1) / latent_block;
  ParallelFor(pool, blocks, [&](int64_t b) {
    const int64_t j0 = b * latent_block, cols = std::min(m, j0 + latent_block) - j0;
    thread_local std::vector<float> scratch;
    scratch.resize(n * cols);
    float* a = scratch.data();  // (n, cols): the activations' cotangent, then g_pre
    if (n > 0 && d > 0) {
      sgemm(kRowMajor, kTrans, kNoTrans, cols, d, n, 1.f, h + j0, m, gl, d, 0.f, gwd + j0 * d, d);
      sgemm(kRowMajor, kNoTrans, kTrans, n, cols, d, 1.f, gl, d, wdp + j0 * d, d, 0.f, a, cols);
    } else {
      std::fill(gwd + j0 * d, gwd + (j0 + cols) * d, 0.f);
      std::fill(a, a + n * cols, 0.f);
    }
    float* gb = gbe + j0;
    float* gt = gth + j0;
    std::fill(gb, gb + cols, 0.f);
    std::fill(gt, gt + cols, 0.f);
    const float* s = gs + j0;
    for (int64_t t = 0; t < n; ++t) {
      float* row = a + t * cols;
      if (jump) {
        JumpGradRow(row, pre + t * m + j0, th + j0, s, g0[t], bandwidth, ste_to_input, gb, gt, cols);
      } else {
        ReluGradRow(row, h + t * m + j0, s, gb, cols);
      }
    }
    if (n > 0 && d > 0) {
      sgemm(kRowMajor, kTrans, kNoTrans, d, cols, n, 1.f, xp, d, a, cols, 0.f, gwe + j0, m);
    } else {
      for (int64_t i = 0; i < d; ++i) std::fill(gwe + i * m + j0, gwe + i * m + j0 + cols, 0.f);
    }
  });
  return ffi::Error::Success();
}

// c (n, m) = a (n, d) b (d, m): the product alone, in blocks of rows of a, one single-threaded
// sgemm per block on XLA's threads (the sparse TopK step's encoder product: on a 2-core AMD EPYC
// XLA's own ran 4096 x 768 x 16384 at ~90 GFLOP/s, the BLAS at ~160).
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c_out) {
  if (sgemm == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "matmul: no BLAS loaded");
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("matmul takes a (n, d), b (d, m)");
  const int64_t n = ad[0], d = ad[1], m = bd[1];
  if (auto e = Check(bd[0] == d && c_out->element_count() == n * m && Fits(n) && Fits(d) && Fits(m),
                     "matmul: operands of mismatched shapes");
      e.failure())
    return e;
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  float* c = c_out->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t row_block = BlockSize(n, threads, kMinTokenBlock, kMaxTokenBlock);
  ParallelFor(pool, (n + row_block - 1) / row_block, [&](int64_t block) {
    const int64_t r0 = block * row_block, rows = std::min(n, r0 + row_block) - r0;
    if (d > 0) {
      sgemm(kRowMajor, kNoTrans, kNoTrans, rows, m, d, 1.f, ap + r0 * d, d, bp, m, 0.f, c + r0 * m, m);
    } else {
      std::fill(c + r0 * m, c + (r0 + rows) * m, 0.f);
    }
  });
  return ffi::Error::Success();
}

// One Adam step after a global-norm clip, as optax.chain(clip_by_global_norm, scale_by_adam)
// and apply_updates compute it, element by element in one pass: coefficients holds
// [keep (1: the norm is below the clip), norm, max_norm, 1 - b1, b1, 1 - b2, b2,
//  1 - b1^count, 1 - b2^count, eps, -lr] as float32.
void AdamRange(const float* __restrict p, const float* __restrict g, const float* __restrict m,
               const float* __restrict v, const float* c, float* __restrict p_out, float* __restrict m_out,
               float* __restrict v_out, int64_t begin, int64_t end) {
  const bool keep = c[0] != 0.f;
  const float norm = c[1], max_norm = c[2], one_b1 = c[3], b1 = c[4], one_b2 = c[5], b2 = c[6];
  const float correction1 = c[7], correction2 = c[8], eps = c[9], neg_lr = c[10];
  for (int64_t i = begin; i < end; ++i) {
    const float gc = keep ? g[i] : (g[i] / norm) * max_norm;
    const float mu = one_b1 * gc + b1 * m[i];
    const float nu = one_b2 * (gc * gc) + b2 * v[i];
    const float direction = (mu / correction1) / (std::sqrt(nu / correction2 + 0.f) + eps);
    m_out[i] = mu;
    v_out[i] = nu;
    p_out[i] = p[i] + neg_lr * direction;
  }
}

ffi::Error Adam(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> m,
                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> coefficients, ffi::ResultBuffer<ffi::F32> p_out,
                ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> v_out) {
  const int64_t size = p.element_count();
  if (g.element_count() != size || m.element_count() != size || v.element_count() != size ||
      p_out->element_count() != size || m_out->element_count() != size || v_out->element_count() != size ||
      coefficients.element_count() != 11)
    return ffi::Error::InvalidArgument("adam: parameters, gradients and moments of one shape, 11 coefficients");
  constexpr int64_t kChunk = int64_t{1} << 16;
  const int64_t chunks = (size + kChunk - 1) / kChunk;
  ParallelFor(pool, chunks, [&](int64_t b) {
    AdamRange(p.typed_data(), g.typed_data(), m.typed_data(), v.typed_data(), coefficients.typed_data(),
              p_out->typed_data(), m_out->typed_data(), v_out->typed_data(), b * kChunk,
              std::min(size, (b + 1) * kChunk));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsaeAdamF32, Adam,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // p
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::F32>>()  // m
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coefficients
                                  .Ret<ffi::Buffer<ffi::F32>>()  // p
                                  .Ret<ffi::Buffer<ffi::F32>>()  // m
                                  .Ret<ffi::Buffer<ffi::F32>>());  // v

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsaeMatmulF32, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Ret<ffi::Buffer<ffi::F32>>());  // c

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsaeDenseEncodeF32, DenseEncode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W_enc
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_enc
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W_dec
                                  .Arg<ffi::Buffer<ffi::F32>>()  // threshold
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // pre
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lin
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sums
                                  .Ret<ffi::Buffer<ffi::F32>>()  // fired
                                  .Ret<ffi::Buffer<ffi::F32>>()  // l0
                                  .Attr<bool>("jump"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsaeDenseBackwardF32, DenseBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W_dec
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pre
                                  .Arg<ffi::Buffer<ffi::F32>>()  // threshold
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_lin
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_sums
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_l0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // g_W_enc
                                  .Ret<ffi::Buffer<ffi::F32>>()  // g_b_enc
                                  .Ret<ffi::Buffer<ffi::F32>>()  // g_W_dec
                                  .Ret<ffi::Buffer<ffi::F32>>()  // g_threshold
                                  .Attr<bool>("jump")
                                  .Attr<float>("bandwidth")
                                  .Attr<bool>("ste_to_input"));

// Load the sgemm the handlers call: `sgemm_name` from the shared library at `path`, made
// single-threaded with `threads_name(1)` where given (the handlers share work over XLA's threads).
// 1 on success, 0 (the handlers then fail with an error) otherwise.
extern "C" int JsaeLoadBlas(const char* path, const char* sgemm_name, const char* threads_name) {
  void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) return 0;
  auto found = reinterpret_cast<Sgemm>(dlsym(library, sgemm_name));
  if (found == nullptr) return 0;
  if (threads_name != nullptr && threads_name[0] != '\0') {
    auto set_threads = reinterpret_cast<void (*)(int)>(dlsym(library, threads_name));
    if (set_threads == nullptr) return 0;
    set_threads(1);
  }
  sgemm = found;
  return 1;
}
