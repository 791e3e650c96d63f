// Native CPU kernels of the fused halting unit of training (sact/halting_fused.py, issue 24).
//
// One unit n of a dense ACT / SACT training run: the halting branch (SACT: the local BN,
// activation and k x k one-output-channel convolution; the global term is computed by the
// caller with torch ops, it is [B, C]), the halting step of sact.act.halting_step and the
// accumulation out + p^n * x, forward and backward, in four ops:
//
//   halting_train_stats          one pass over x: the local BN's batch statistics (running
//                                statistics updated as nn.BatchNorm2d), folded scale / shift,
//                                and the per-image channel means (the global term's input);
//   halting_train_forward        per image: the tap planes, the logits, h = sigmoid, the
//                                halting step, new_out = out + p * x;
//   halting_train_backward_step  per position: d p = g_out . x (+ the weight's own gradient),
//                                the halting step's backward, d logit = dh * h * (1 - h);
//   halting_train_backward_x     the transposed taps, the activation's and the BN's backward
//                                (two passes: the batch reductions, then dx), the tap weights'
//                                gradient, and dx = g_out * p + dBN + d pooled / HW.
//
// Features x [B, C, H, W] are contiguous NCHW or channels-last (the other feature tensors
// share x's layout); the state tensors are [B, H, W] (SACT) or [B] (ACT), of x's dtype.
// Images run in parallel. Reductions are summed per row in x's dtype (SIMD), per image in
// double, and over images in image order: results do not depend on the number of threads.
//
// Taps: w9 [9, C] (the 3 x 3 local convolution; tap t = ky * 3 + kx sits at offset
// off_t = (ky - 1, kx - 1)). Per image, Y[t][q] = w9[t] . a[q] (a = act(scale * x + shift) at
// position q) and the logit at p is sum_t Y[t][p + off_t] over the taps inside the image (the
// reference pads a, the activated map, with zeros). The backward spreads d logit the other way:
// G[t][q] = d logit[q - off_t], d a[q] = sum_t G[t][q] * w9[t], d w9[t] = sum_q G[t][q] a[q].

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

using at::Tensor;

namespace {

// B images of H x W positions and C channels; element (b, p, c) of a feature tensor.
struct Geom {
  int64_t B, C, H, W, HW;
  bool cl;  // channels-last: x[b][p][c]; NCHW: x[b][c][p]
};

Geom geometry(const Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "x must be a [B, C, H, W] CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  Geom g{x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) * x.size(3), false};
  if (!x.is_contiguous()) {
    TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "x must be contiguous NCHW or channels-last");
    g.cl = true;
  }
  return g;
}

// A feature tensor in x's layout (or empty: absent).
void check_like(const Tensor& t, const Tensor& x, const Geom& g, const char* name) {
  if (t.numel() == 0) return;
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device().is_cpu() &&
                  t.is_contiguous(g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
              name, " must have x's shape, dtype and memory format");
}

// A small tensor of x's dtype with n entries (or empty: absent), made contiguous.
Tensor small(const Tensor& t, const Tensor& x, int64_t n, const char* name) {
  if (t.numel() == 0) return t;
  TORCH_CHECK(t.numel() == n && t.scalar_type() == x.scalar_type() && t.device().is_cpu(), name, " must have ", n,
              " entries of x's dtype");
  return t.contiguous();
}

template <typename T>
T* ptr(const Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
inline T act(T z, T slope) {
  return z > T(0) ? z : z * slope;  // identity: slope 1; ReLU: 0; leaky ReLU
}

template <typename T>
inline T act_grad(T z, T slope) {
  return z > T(0) ? T(1) : slope;
}

// The 3 x 3 taps (the reference's local convolution; other sizes take the torch ops).
constexpr int64_t kSize = 3, kTaps = kSize * kSize;

// Offset of tap t (rows, columns).
inline void tap_offset(int64_t t, int64_t& dy, int64_t& dx) {
  dy = t / kSize - kSize / 2;
  dx = t % kSize - kSize / 2;
}

// The nine tap rows w9[t] [C].
template <typename T>
struct Taps {
  const T* w[kTaps];
  Taps(const T* w9, int64_t C) {
    for (int64_t t = 0; t < kTaps; ++t) w[t] = w9 + t * C;
  }
};

// Positions per block of the tap planes: nine accumulators of kBlock positions stay in registers.
constexpr int64_t kBlock = 8;

// Y [9][HW] = the tap planes of image xb: Y[t][q] = sum_c w9[t][c] * act(scale[c] * x[q][c] + shift[c]).
// arow: scratch [C][Wp] (Wp = W rounded up to kBlock), one activated row, channel-major.
template <typename T>
void tap_planes(const Geom& g, const T* xb, const T* scale, const T* shift, T slope, const T* w9, T* Y, T* arow) {
  const int64_t C = g.C, W = g.W, HW = g.HW, Wp = (W + kBlock - 1) / kBlock * kBlock;
  for (int64_t y = 0; y < g.H; ++y) {
    if (g.cl) {
      for (int64_t xx = 0; xx < W; ++xx) {
        const T* xp = xb + (y * W + xx) * C;
        for (int64_t c = 0; c < C; ++c) arow[c * Wp + xx] = act(scale[c] * xp[c] + shift[c], slope);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const T* xp = xb + c * HW + y * W;
        T* a = arow + c * Wp;
        for (int64_t xx = 0; xx < W; ++xx) a[xx] = act(scale[c] * xp[xx] + shift[c], slope);
      }
    }
    for (int64_t x0 = 0; x0 < W; x0 += kBlock) {
      T acc[kTaps][kBlock] = {};
      for (int64_t c = 0; c < C; ++c) {
        const T* a = arow + c * Wp + x0;  // lanes past W: zeros (never written), never stored
#pragma GCC unroll 9
        for (int64_t t = 0; t < kTaps; ++t) {
          const T wc = w9[t * C + c];
#pragma omp simd
          for (int64_t l = 0; l < kBlock; ++l) acc[t][l] += wc * a[l];
        }
      }
      const int64_t nb = std::min(kBlock, W - x0);
      for (int64_t t = 0; t < kTaps; ++t) {
        T* dst = Y + t * HW + y * W + x0;
        if (nb == kBlock) {  // a fixed-size copy: vector stores (a variable one becomes `rep movs`)
          for (int64_t l = 0; l < kBlock; ++l) dst[l] = acc[t][l];
        } else {
          for (int64_t l = 0; l < nb; ++l) dst[l] = acc[t][l];
        }
      }
    }
  }
}

// L [HW] = base + sum_t Y[t][p + off_t] over the taps inside the image.
template <typename T>
void shift_sum(const Geom& g, const T* Y, T base, T* L) {
  const int64_t H = g.H, W = g.W;
  std::fill(L, L + g.HW, base);
  for (int64_t t = 0; t < kTaps; ++t) {
    int64_t dy, dx;
    tap_offset(t, dy, dx);
    const int64_t x0 = std::max<int64_t>(0, -dx), x1 = std::min(W, W - dx);
    for (int64_t y = std::max<int64_t>(0, -dy); y < std::min(H, H - dy); ++y) {
      const T* src = Y + t * g.HW + (y + dy) * W + dx;
      T* dst = L + y * W;
      for (int64_t xx = x0; xx < x1; ++xx) dst[xx] += src[xx];
    }
  }
}

// The adjoint of shift_sum: G [K][HW], G[t][q] = gl[q - off_t] (0 where q - off_t is outside).
template <typename T>
void shift_spread(const Geom& g, const T* gl, T* G) {
  const int64_t H = g.H, W = g.W;
  for (int64_t t = 0; t < kTaps; ++t) {
    int64_t dy, dx;
    tap_offset(t, dy, dx);
    T* Gt = G + t * g.HW;
    std::fill(Gt, Gt + g.HW, T(0));
    const int64_t x0 = std::max<int64_t>(0, dx), x1 = std::min(W, W + dx);
    for (int64_t y = std::max<int64_t>(0, dy); y < std::min(H, H + dy); ++y) {
      const T* src = gl + (y - dy) * W - dx;
      T* dst = Gt + y * W;
      for (int64_t xx = x0; xx < x1; ++xx) dst[xx] = src[xx];
    }
  }
}

// ---------------------------------------------------------------------------------------
// halting_train_stats
// ---------------------------------------------------------------------------------------

template <typename T>
void stats_impl(const Geom& g, const T* x, const T* weight, const T* bias, T* rmean, T* rvar, double momentum,
                double eps, T* scale, T* shift, T* mean, T* invstd, T* pooled) {
  const int64_t B = g.B, C = g.C, HW = g.HW;
  // Sums of x - k (k: x at the first position of image 0) avoid E[x^2] - E[x]^2 cancelling.
  std::vector<double> k(C), s1(B * C), s2(B * C);
  for (int64_t c = 0; c < C; ++c) k[c] = static_cast<double>(x[g.cl ? c : c * HW]);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* a1 = s1.data() + b * C;
      double* a2 = s2.data() + b * C;
      std::fill(a1, a1 + C, 0.0);
      std::fill(a2, a2 + C, 0.0);
      const T* xb = x + b * C * HW;
      if (g.cl) {
        for (int64_t p = 0; p < HW; ++p) {
          const T* xp = xb + p * C;
          for (int64_t c = 0; c < C; ++c) {
            const double d = static_cast<double>(xp[c]) - k[c];
            a1[c] += d;
            a2[c] += d * d;
          }
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const T* xp = xb + c * HW;
          const double kc = k[c];
          double u = 0, v = 0;
#pragma omp simd reduction(+ : u, v)
          for (int64_t p = 0; p < HW; ++p) {
            const double d = static_cast<double>(xp[p]) - kc;
            u += d;
            v += d * d;
          }
          a1[c] = u;
          a2[c] = v;
        }
      }
      for (int64_t c = 0; c < C; ++c) pooled[b * C + c] = static_cast<T>(k[c] + a1[c] / HW);
    }
  });
  if (weight == nullptr) return;
  const double n = static_cast<double>(B * HW);
  for (int64_t c = 0; c < C; ++c) {
    double u = 0, v = 0;
    for (int64_t b = 0; b < B; ++b) u += s1[b * C + c], v += s2[b * C + c];
    const double m1 = u / n, var = std::max(v / n - m1 * m1, 0.0), mu = k[c] + m1;
    const double is = 1.0 / std::sqrt(var + eps), sc = static_cast<double>(weight[c]) * is;
    mean[c] = static_cast<T>(mu);
    invstd[c] = static_cast<T>(is);
    scale[c] = static_cast<T>(sc);
    shift[c] = static_cast<T>(static_cast<double>(bias[c]) - mu * sc);
    // nn.BatchNorm2d's running statistics: momentum, unbiased variance
    rmean[c] = static_cast<T>(momentum * mu + (1 - momentum) * static_cast<double>(rmean[c]));
    rvar[c] = static_cast<T>(momentum * var * n / (n - 1) + (1 - momentum) * static_cast<double>(rvar[c]));
  }
}

// x [B, C, H, W]; weight, bias, running_mean, running_var [C] (empty: no BN, only the pooled
// means). Returns (scale, shift, mean, invstd) [C] of the BN in training mode (BN(x) = scale *
// x + shift; empty without BN) and pooled [B, C] = mean_hw(x); updates the running statistics.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> halting_train_stats(Tensor x, Tensor weight, Tensor bias,
                                                                       Tensor running_mean, Tensor running_var,
                                                                       double momentum, double eps) {
  const Geom g = geometry(x);
  TORCH_CHECK(g.B * g.HW > 1, "halting_train_stats: batch statistics need more than one value per channel");
  const bool bn = weight.numel() > 0;
  const auto opt = x.options();
  Tensor scale = at::empty({bn ? g.C : 0}, opt), shift = at::empty_like(scale), mean = at::empty_like(scale),
         invstd = at::empty_like(scale), pooled = at::empty({g.B, g.C}, opt);
  if (bn) {
    for (const Tensor* t : {&weight, &bias, &running_mean, &running_var}) {
      TORCH_CHECK(t->numel() == g.C && t->scalar_type() == x.scalar_type() && t->is_contiguous() && t->device().is_cpu(),
                  "BN parameters and running statistics must be contiguous [C] tensors of x's dtype");
    }
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "halting_train_stats", [&] {
    stats_impl<scalar_t>(g, x.data_ptr<scalar_t>(), ptr<scalar_t>(weight), ptr<scalar_t>(bias),
                         ptr<scalar_t>(running_mean), ptr<scalar_t>(running_var), momentum, eps, ptr<scalar_t>(scale),
                         ptr<scalar_t>(shift), ptr<scalar_t>(mean), ptr<scalar_t>(invstd), pooled.data_ptr<scalar_t>());
  });
  return {scale, shift, mean, invstd, pooled};
}

// ---------------------------------------------------------------------------------------
// halting_train_forward
// ---------------------------------------------------------------------------------------

template <typename T>
struct StepArgs {  // sact.act.halting_step: state before (in) and after (out) the unit, [S]
  const T *cs, *rem, *pc;
  const bool* fin;
  const int64_t* nu;
  T *cs2, *rem2, *pc2, *wt;
  bool* fin2;
  int64_t* nu2;
  T thr;  // 1 - eps, compared in the state's dtype as halting_step does

  // The step at position s with halting probability h; returns the weight p^n.
  T operator()(int64_t s, T h) const {
    const T c = cs[s] + h;
    const bool cur = c >= thr;
    const T hh = cur ? T(0) : h;
    const T w = (cur && !fin[s]) ? rem[s] : hh;  // just halted: the remainder
    cs2[s] = c;
    rem2[s] = rem[s] - hh;
    pc2[s] = pc[s] + (cur ? w : T(1));
    fin2[s] = cur;
    nu2[s] = nu[s] + (fin[s] ? 0 : 1);
    wt[s] = w;
    return w;
  }
};

// nb = ob + wv[p] * xb (nb = wv[p] * xb without ob), one image.
template <typename T>
void accumulate(const Geom& g, const T* xb, const T* ob, T* nb, const T* wv) {
  const int64_t C = g.C, HW = g.HW;
  if (g.cl) {
    for (int64_t p = 0; p < HW; ++p) {
      const T w = wv[p];
      const T* xp = xb + p * C;
      T* np = nb + p * C;
      if (ob) {
        const T* op = ob + p * C;
        for (int64_t c = 0; c < C; ++c) np[c] = op[c] + w * xp[c];
      } else {
        for (int64_t c = 0; c < C; ++c) np[c] = w * xp[c];
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const T* xp = xb + c * HW;
      T* np = nb + c * HW;
      if (ob) {
        const T* op = ob + c * HW;
        for (int64_t p = 0; p < HW; ++p) np[p] = op[p] + wv[p] * xp[p];
      } else {
        for (int64_t p = 0; p < HW; ++p) np[p] = wv[p] * xp[p];
      }
    }
  }
}

// SACT: the logits [B, H, W] into z (the tap planes and their shifted sum, per image).
template <typename T>
void logits_impl(const Geom& g, const T* x, const T* scale, const T* shift, T slope, const T* w9, const T* glob,
                 T* z) {
  const int64_t C = g.C, HW = g.HW;
  at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> Y(kTaps * HW), arow(C * (g.W + kBlock));
    for (int64_t b = b0; b < b1; ++b) {
      tap_planes(g, x + b * C * HW, scale, shift, slope, w9, Y.data(), arow.data());
      shift_sum(g, Y.data(), glob[b], z + b * HW);
    }
  });
}

// The halting step with h [S] (null: h = 1) and the accumulation, per image.
template <typename T>
void step_impl(const Geom& g, const T* x, const T* out, T* nout, const T* h, bool spatial, const StepArgs<T>& step) {
  const int64_t CHW = g.C * g.HW, HW = g.HW;
  at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> wv(HW);
    for (int64_t b = b0; b < b1; ++b) {
      if (spatial) {
        for (int64_t p = 0; p < HW; ++p) wv[p] = step(b * HW + p, h ? h[b * HW + p] : T(1));
      } else {
        std::fill(wv.begin(), wv.end(), step(b, h ? h[b] : T(1)));
      }
      accumulate(g, x + b * CHW, out ? out + b * CHW : nullptr, nout + b * CHW, wv.data());
    }
  });
}

// x, out [B, C, H, W] (out empty: the first unit); SACT: scale, shift [C] (the local BN folded),
// w9 [9, C] the taps, glob [B] the global term plus the local bias; ACT: w9 empty, glob [B]
// the logits; the last unit: w9 and glob empty (h = 1). State [S] (cumsum, remainder,
// ponder, finished, num_units). Returns (out + p * x, cumsum, remainder, ponder, finished,
// num_units after the unit, p [S], h [S] (empty for the last unit)).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> halting_train_forward(
    Tensor x, Tensor out, Tensor scale, Tensor shift, double slope, Tensor w9, Tensor glob, Tensor cumsum,
    Tensor remainder, Tensor ponder, Tensor finished, Tensor num_units, double eps) {
  const Geom g = geometry(x);
  check_like(out, x, g, "out");
  const bool spatial = cumsum.dim() == 3;
  const int64_t S = spatial ? g.B * g.HW : g.B;
  TORCH_CHECK(spatial ? cumsum.sizes() == at::IntArrayRef({g.B, g.H, g.W}) : cumsum.sizes() == at::IntArrayRef({g.B}),
              "the state must be [B, H, W] (SACT) or [B] (ACT)");
  cumsum = small(cumsum, x, S, "cumsum");
  remainder = small(remainder, x, S, "remainder");
  ponder = small(ponder, x, S, "ponder");
  TORCH_CHECK(cumsum.numel() == S && remainder.numel() == S && ponder.numel() == S, "state tensors must have S entries");
  TORCH_CHECK(finished.numel() == S && finished.scalar_type() == at::kBool, "finished must be bool [S]");
  TORCH_CHECK(num_units.numel() == S && num_units.scalar_type() == at::kLong, "num_units must be int64 [S]");
  finished = finished.contiguous();
  num_units = num_units.contiguous();
  const int64_t K = w9.numel() ? kTaps : 0;
  TORCH_CHECK(K == 0 || (spatial && w9.dim() == 2 && w9.size(0) == kTaps && w9.size(1) == g.C),
              "w9 must be [9, C] (SACT only)");
  TORCH_CHECK(!spatial || (K > 0) == (glob.numel() > 0), "SACT: w9 and glob go together");
  w9 = small(w9, x, K * g.C, "w9");
  glob = small(glob, x, g.B, "glob");
  if (K) {
    scale = small(scale, x, g.C, "scale");
    shift = small(shift, x, g.C, "shift");
    TORCH_CHECK(scale.numel() == g.C && shift.numel() == g.C, "scale and shift must have C entries");
  }
  Tensor nout = at::empty_like(x), cs2 = at::empty_like(cumsum), rem2 = at::empty_like(cumsum),
         pc2 = at::empty_like(cumsum), wt = at::empty_like(cumsum), fin2 = at::empty_like(finished),
         nu2 = at::empty_like(num_units);
  Tensor h = glob.numel() ? (spatial ? at::empty_like(cumsum) : glob.clone()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "halting_train_forward", [&] {
    using T = scalar_t;
    if (K) {
      logits_impl<T>(g, x.data_ptr<T>(), scale.data_ptr<T>(), shift.data_ptr<T>(), static_cast<T>(slope),
                     w9.data_ptr<T>(), glob.data_ptr<T>(), h.data_ptr<T>());
    }
    const StepArgs<T> step{cumsum.data_ptr<T>(),    remainder.data_ptr<T>(),   ponder.data_ptr<T>(),
                           finished.data_ptr<bool>(), num_units.data_ptr<int64_t>(), cs2.data_ptr<T>(),
                           rem2.data_ptr<T>(),      pc2.data_ptr<T>(),         wt.data_ptr<T>(),
                           fin2.data_ptr<bool>(),   nu2.data_ptr<int64_t>(),   static_cast<T>(1.0 - eps)};
    if (h.numel()) at::sigmoid_(h);  // ATen's vectorised sigmoid
    step_impl<T>(g, x.data_ptr<T>(), ptr<T>(out), nout.data_ptr<T>(), ptr<T>(h), spatial, step);
  });
  return {nout, cs2, rem2, pc2, fin2, nu2, wt, h};
}

// ---------------------------------------------------------------------------------------
// halting_train_backward_step
// ---------------------------------------------------------------------------------------

// d [HW] = sum_c go[p][c] * x[p][c], one image.
template <typename T>
void dot_positions(const Geom& g, const T* gob, const T* xb, T* d) {
  const int64_t C = g.C, HW = g.HW;
  if (g.cl) {
    for (int64_t p = 0; p < HW; ++p) {
      const T* a = gob + p * C;
      const T* v = xb + p * C;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < C; ++c) s += a[c] * v[c];
      d[p] = s;
    }
  } else {
    std::fill(d, d + HW, T(0));
    for (int64_t c = 0; c < C; ++c) {
      const T* a = gob + c * HW;
      const T* v = xb + c * HW;
      for (int64_t p = 0; p < HW; ++p) d[p] += a[p] * v[p];
    }
  }
}

// The gradients of halting_train_forward's state outputs and weight (any may be empty: zero),
// its h and finished (cur) and the finished state before it -> (d logit [S] (empty without h),
// d remainder [S], d logit summed per image [B] (empty without h)). The gradients of cumsum and ponder
// pass through unchanged (the caller's). See step_backward in halting_fused.py.
std::tuple<Tensor, Tensor, Tensor> halting_train_backward_step(Tensor g_out, Tensor x, Tensor g_weight, Tensor g_cumsum,
                                                       Tensor g_rem, Tensor g_ponder, Tensor h, Tensor cur,
                                                       Tensor finished) {
  const Geom g = geometry(x);
  check_like(g_out, x, g, "g_out");
  const bool spatial = cur.dim() == 3;
  const int64_t S = spatial ? g.B * g.HW : g.B;
  TORCH_CHECK(cur.numel() == S && finished.numel() == S && cur.scalar_type() == at::kBool &&
                  finished.scalar_type() == at::kBool,
              "cur, finished must be bool [S]");
  cur = cur.contiguous();
  finished = finished.contiguous();
  g_weight = small(g_weight, x, S, "g_weight");
  g_cumsum = small(g_cumsum, x, S, "g_cumsum");
  g_rem = small(g_rem, x, S, "g_rem");
  g_ponder = small(g_ponder, x, S, "g_ponder");
  h = small(h, x, S, "h");
  Tensor drem = at::empty(cur.sizes(), x.options()), glogit = h.numel() ? at::empty_like(drem) : h;
  Tensor gimg = at::empty({h.numel() ? g.B : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "halting_train_backward_step", [&] {
    using T = scalar_t;
    const T *go = ptr<T>(g_out), *xp = x.data_ptr<T>(), *gw = ptr<T>(g_weight), *gc = ptr<T>(g_cumsum),
            *gr = ptr<T>(g_rem), *gp = ptr<T>(g_ponder), *hp = ptr<T>(h);
    const bool *cp = cur.data_ptr<bool>(), *fp = finished.data_ptr<bool>();
    T *dr = drem.data_ptr<T>(), *gl = ptr<T>(glogit), *gi = ptr<T>(gimg);
    const int64_t HW = g.HW, CHW = g.C * g.HW;
    at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> d(HW, T(0));
      for (int64_t b = b0; b < b1; ++b) {
        if (go) dot_positions(g, go + b * CHW, xp + b * CHW, d.data());
        // the step backward at position s, with dw = d p^n (from the weight and the accumulation)
        auto back = [&](int64_t s, T dw) {
          const T dh = (gc ? gc[s] : T(0)) + (cp[s] ? T(0) : dw - (gr ? gr[s] : T(0)));
          dr[s] = (gr ? gr[s] : T(0)) + (cp[s] && !fp[s] ? dw + (gp ? gp[s] : T(0)) : T(0));  // just halted
          if (gl) gl[s] = dh * hp[s] * (T(1) - hp[s]);  // through the sigmoid
        };
        if (spatial) {
          for (int64_t p = 0; p < HW; ++p) back(b * HW + p, (gw ? gw[b * HW + p] : T(0)) + d[p]);
          if (gi) {
            double s = 0;
            for (int64_t p = 0; p < HW; ++p) s += gl[b * HW + p];
            gi[b] = static_cast<T>(s);
          }
        } else {
          double s = 0;
          for (int64_t p = 0; p < HW; ++p) s += d[p];
          back(b, (gw ? gw[b] : T(0)) + static_cast<T>(s));
          if (gi) gi[b] = gl[b];
        }
      }
    });
  });
  return {glogit, drem, gimg};
}

// ---------------------------------------------------------------------------------------
// halting_train_backward_x
// ---------------------------------------------------------------------------------------

template <typename T>
struct LocalBack {  // the local branch's tensors for the backward (w9 null: no local branch)
  const T *scale, *shift, *mean, *w9;
  T slope;
};

// The nine taps' gradients G[t][q] at position q of the planes Gb; false if all are zero.
template <typename T>
inline bool taps_at(const T* Gb, int64_t HW, int64_t q, T* gq) {
  bool any = false;
  for (int64_t t = 0; t < kTaps; ++t) any |= (gq[t] = Gb[t * HW + q]) != T(0);
  return any;
}

// Pass 1, one image: part [(2 + 9) * C] (double) = the sums over positions q of dz and
// dz * (x - mean) per channel and G[t][q] * a[q][c] per tap and channel (dz: the gradient of
// the BN output, a = act(BN(x))). row: scratch of the same size (one row's sums in T).
template <typename T>
void local_sums(const Geom& g, const LocalBack<T>& lb, const T* xb, const T* Gb, double* part, T* row) {
  const int64_t C = g.C, W = g.W, HW = g.HW, n = (2 + kTaps) * C;
  const Taps<T> tw(lb.w9, C);
  const T *sc = lb.scale, *sh = lb.shift, *mu = lb.mean, sl = lb.slope;
  std::fill(part, part + n, 0.0);
  for (int64_t y = 0; y < g.H; ++y) {
    std::fill(row, row + n, T(0));
    T *sdz = row, *sdx = row + C, *sw[kTaps];
    for (int64_t t = 0; t < kTaps; ++t) sw[t] = row + (2 + t) * C;
    if (g.cl) {  // per position, vectorised over the channels
      for (int64_t xx = 0; xx < W; ++xx) {
        const int64_t q = y * W + xx;
        T gq[kTaps];
        if (!taps_at(Gb, HW, q, gq)) continue;
        const T* xp = xb + q * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T ga = gq[0] * tw.w[0][c] + gq[1] * tw.w[1][c] + gq[2] * tw.w[2][c] + gq[3] * tw.w[3][c] +
                       gq[4] * tw.w[4][c] + gq[5] * tw.w[5][c] + gq[6] * tw.w[6][c] + gq[7] * tw.w[7][c] +
                       gq[8] * tw.w[8][c];
          const T z = sc[c] * xp[c] + sh[c], a = act(z, sl), dz = ga * act_grad(z, sl);
          sdz[c] += dz;
          sdx[c] += dz * (xp[c] - mu[c]);
          sw[0][c] += gq[0] * a, sw[1][c] += gq[1] * a, sw[2][c] += gq[2] * a;
          sw[3][c] += gq[3] * a, sw[4][c] += gq[4] * a, sw[5][c] += gq[5] * a;
          sw[6][c] += gq[6] * a, sw[7][c] += gq[7] * a, sw[8][c] += gq[8] * a;
        }
      }
    } else {  // per channel, vectorised along the row
      const T* G[kTaps];
      for (int64_t t = 0; t < kTaps; ++t) G[t] = Gb + t * HW + y * W;
      for (int64_t c = 0; c < C; ++c) {
        const T* xp = xb + c * HW + y * W;
        const T scc = sc[c], shc = sh[c], muc = mu[c];
        T wc[kTaps];
        for (int64_t t = 0; t < kTaps; ++t) wc[t] = tw.w[t][c];
        T u = 0, v = 0, s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, s8 = 0;
#pragma omp simd reduction(+ : u, v, s0, s1, s2, s3, s4, s5, s6, s7, s8)
        for (int64_t xx = 0; xx < W; ++xx) {
          const T ga = wc[0] * G[0][xx] + wc[1] * G[1][xx] + wc[2] * G[2][xx] + wc[3] * G[3][xx] +
                       wc[4] * G[4][xx] + wc[5] * G[5][xx] + wc[6] * G[6][xx] + wc[7] * G[7][xx] +
                       wc[8] * G[8][xx];
          const T z = scc * xp[xx] + shc, a = act(z, sl), dz = ga * act_grad(z, sl);
          u += dz;
          v += dz * (xp[xx] - muc);
          s0 += G[0][xx] * a, s1 += G[1][xx] * a, s2 += G[2][xx] * a;
          s3 += G[3][xx] * a, s4 += G[4][xx] * a, s5 += G[5][xx] * a;
          s6 += G[6][xx] * a, s7 += G[7][xx] * a, s8 += G[8][xx] * a;
        }
        const T s[kTaps] = {s0, s1, s2, s3, s4, s5, s6, s7, s8};
        sdz[c] += u;
        sdx[c] += v;
        for (int64_t t = 0; t < kTaps; ++t) sw[t][c] += s[t];
      }
    }
    for (int64_t i = 0; i < n; ++i) part[i] += static_cast<double>(row[i]);
  }
}

// Pass 2, one image: dx = go * wv[p] + beta + (with the local branch) scale * dz + alpha * x
// (beta [C]: this image's, with the pooled term).
template <typename T>
void dx_image(const Geom& g, const LocalBack<T>& lb, const T* xb, const T* gob, const T* Gb, const T* wv,
              const T* alpha, const T* beta, T* dxb) {
  const int64_t C = g.C, HW = g.HW;
  const bool local = lb.w9 != nullptr;
  const T *sc = lb.scale, *sh = lb.shift, sl = lb.slope;
  if (g.cl) {
    const Taps<T> tw(local ? lb.w9 : beta, local ? C : 0);
    for (int64_t q = 0; q < HW; ++q) {
      const T w = wv[q];
      const T* xp = xb + q * C;
      const T* gp = gob ? gob + q * C : nullptr;
      T* dp = dxb + q * C;
      T gq[kTaps];
      if (gp) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dp[c] = gp[c] * w + beta[c];
      } else {
        std::copy(beta, beta + C, dp);
      }
      if (!local) continue;
      if (!taps_at(Gb, HW, q, gq)) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dp[c] += alpha[c] * xp[c];
        continue;
      }
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T ga = gq[0] * tw.w[0][c] + gq[1] * tw.w[1][c] + gq[2] * tw.w[2][c] + gq[3] * tw.w[3][c] +
                     gq[4] * tw.w[4][c] + gq[5] * tw.w[5][c] + gq[6] * tw.w[6][c] + gq[7] * tw.w[7][c] +
                     gq[8] * tw.w[8][c];
        const T z = sc[c] * xp[c] + sh[c];
        dp[c] += alpha[c] * xp[c] + sc[c] * ga * act_grad(z, sl);
      }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* xp = xb + c * HW;
    const T* gp = gob ? gob + c * HW : nullptr;
    T* dp = dxb + c * HW;
    const T bc = beta[c];
    if (!local) {
      for (int64_t p = 0; p < HW; ++p) dp[p] = (gp ? gp[p] * wv[p] : T(0)) + bc;
      continue;
    }
    const T scc = sc[c], shc = sh[c], al = alpha[c];
    const T* G[kTaps];
    T wc[kTaps];
    for (int64_t t = 0; t < kTaps; ++t) G[t] = Gb + t * HW, wc[t] = lb.w9[t * C + c];
#pragma omp simd
    for (int64_t p = 0; p < HW; ++p) {
      const T ga = wc[0] * G[0][p] + wc[1] * G[1][p] + wc[2] * G[2][p] + wc[3] * G[3][p] + wc[4] * G[4][p] +
                   wc[5] * G[5][p] + wc[6] * G[6][p] + wc[7] * G[7][p] + wc[8] * G[8][p];
      const T z = scc * xp[p] + shc;
      dp[p] = (gp ? gp[p] * wv[p] : T(0)) + scc * ga * act_grad(z, sl) + al * xp[p] + bc;
    }
  }
}

// g_out [B, C, H, W] (empty: zero), weight [S] = p^n, g_logit [S] (empty without a branch);
// SACT: scale, shift, mean, invstd [C] of the local BN, w9 [9, C] (empty for ACT: no local
// branch); dpool [B, C] the gradient of the pooled means (empty: zero).
// Returns (dx, d BN weight [C], d BN bias [C], d w9 [9, C]) (the last three empty without w9).
std::tuple<Tensor, Tensor, Tensor, Tensor> halting_train_backward_x(Tensor g_out, Tensor x, Tensor weight,
                                                                    Tensor g_logit, Tensor scale, Tensor shift,
                                                                    double slope, Tensor w9, Tensor mean,
                                                                    Tensor invstd, Tensor dpool) {
  const Geom g = geometry(x);
  check_like(g_out, x, g, "g_out");
  const int64_t B = g.B, C = g.C, HW = g.HW;
  const bool spatial = weight.dim() == 3;
  const int64_t S = spatial ? B * HW : B;
  weight = small(weight, x, S, "weight");
  TORCH_CHECK(weight.numel() == S, "weight must have one entry per position (SACT) or image (ACT)");
  dpool = small(dpool, x, B * C, "dpool");
  const int64_t K = w9.numel() ? kTaps : 0;
  TORCH_CHECK(K == 0 || (spatial && w9.dim() == 2 && w9.size(0) == kTaps && w9.size(1) == C),
              "w9 must be [9, C] (SACT only)");
  if (K) {
    w9 = small(w9, x, K * C, "w9");
    g_logit = small(g_logit, x, S, "g_logit");
    scale = small(scale, x, C, "scale");
    shift = small(shift, x, C, "shift");
    mean = small(mean, x, C, "mean");
    invstd = small(invstd, x, C, "invstd");
    TORCH_CHECK(g_logit.numel() == S && scale.numel() == C && shift.numel() == C && mean.numel() == C &&
                    invstd.numel() == C,
                "SACT: g_logit [S] and the BN's scale, shift, mean, invstd [C] are needed");
  }
  Tensor dx = at::empty_like(x);
  Tensor dlw = at::empty({K ? C : 0}, x.options()), dlb = at::empty_like(dlw), dw9 = at::empty({K, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "halting_train_backward_x", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *go = ptr<T>(g_out), *wp = weight.data_ptr<T>(), *dpp = ptr<T>(dpool);
    const int64_t CHW = C * HW, n = (2 + K) * C;
    std::vector<T> G(K * B * HW), alpha(C, T(0)), beta0(C, T(0));
    const LocalBack<T> lb{ptr<T>(scale), ptr<T>(shift), ptr<T>(mean), ptr<T>(w9), static_cast<T>(slope)};
    if (K) {
      std::vector<double> part(B * n);
      const T* gl = g_logit.data_ptr<T>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<T> row(n);
        for (int64_t b = b0; b < b1; ++b) {
          T* Gb = G.data() + b * K * HW;
          shift_spread(g, gl + b * HW, Gb);
          local_sums(g, lb, xp + b * CHW, Gb, part.data() + b * n, row.data());
        }
      });
      std::vector<double> tot(n, 0.0);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < n; ++i) tot[i] += part[b * n + i];
      // BN backward: dx = scale * (dz - sum(dz) / N - xhat * sum(dz * xhat) / N) = scale * dz + alpha * x + beta0
      const double N = static_cast<double>(B * HW);
      T *pw = dlw.data_ptr<T>(), *pb = dlb.data_ptr<T>(), *pw9 = dw9.data_ptr<T>();
      const T *sp = scale.data_ptr<T>(), *ip = invstd.data_ptr<T>(), *mp = mean.data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) {
        const double is = ip[c], dgamma = is * tot[C + c], dbeta = tot[c], sc = sp[c];
        const double al = -sc * is * dgamma / N;
        pw[c] = static_cast<T>(dgamma);
        pb[c] = static_cast<T>(dbeta);
        alpha[c] = static_cast<T>(al);
        beta0[c] = static_cast<T>(-sc * dbeta / N - al * static_cast<double>(mp[c]));
      }
      for (int64_t i = 0; i < K * C; ++i) pw9[i] = static_cast<T>(tot[2 * C + i]);
    }
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> beta(C), wv(HW);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t c = 0; c < C; ++c) beta[c] = beta0[c] + (dpp ? dpp[b * C + c] / static_cast<T>(HW) : T(0));
        if (spatial) std::copy(wp + b * HW, wp + (b + 1) * HW, wv.begin());
        else std::fill(wv.begin(), wv.end(), wp[b]);
        dx_image(g, lb, xp + b * CHW, go ? go + b * CHW : nullptr, K ? G.data() + b * K * HW : nullptr, wv.data(),
                 alpha.data(), beta.data(), dx.data_ptr<T>() + b * CHW);
      }
    });
  });
  return {dx, dlw, dlb, dw9};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sact_native, m) {
  m.def("halting_train_stats(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("halting_train_forward(Tensor x, Tensor out, Tensor scale, Tensor shift, float slope, Tensor w9, "
        "Tensor glob, Tensor cumsum, Tensor remainder, Tensor ponder, Tensor finished, Tensor num_units, "
        "float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("halting_train_backward_step(Tensor g_out, Tensor x, Tensor g_weight, Tensor g_cumsum, Tensor g_rem, "
        "Tensor g_ponder, Tensor h, Tensor cur, Tensor finished) -> (Tensor, Tensor, Tensor)");
  m.def("halting_train_backward_x(Tensor g_out, Tensor x, Tensor weight, Tensor g_logit, Tensor scale, "
        "Tensor shift, float slope, Tensor w9, Tensor mean, Tensor invstd, Tensor dpool) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sact_native, CPU, m) {
  m.impl("halting_train_stats", &halting_train_stats);
  m.impl("halting_train_forward", &halting_train_forward);
  m.impl("halting_train_backward_step", &halting_train_backward_step);
  m.impl("halting_train_backward_x", &halting_train_backward_x);
}
