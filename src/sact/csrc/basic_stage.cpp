// Native whole-stage executor of the reference's CIFAR stages (sact/sparse/native_stage.py).
//
// One call runs a whole sact.AdaptiveStage of sact.units.PreActBasicUnit in eval mode: the
// loop over units, the SACT (per position) or ACT (per image) halting branch after each unit,
// the halting recurrence of sact.act.halting_step and the weighted sum of the unit outputs.
// It must compute what sact.AdaptiveStage.forward computes (tests/test_sparse_native_stage.py
// compares them in float64 to 1e-9 and against the pure-PyTorch sparse engine).
//
// Layout. One image at a time, everything channels-last in per-team scratch that stays in
// L2: X (H, W, C) the features and R (H, W, C) a unit's conv2 output; P, T, Q (H+2, W+2, C)
// the inputs of the 3x3 convolutions with a one-pixel zero border (zero padding comes after
// BN + activation, as in TF "SAME"): P = act1(bn1(X)) (conv1's input), T = act2(bn2(conv1(P)))
// (conv2's input; bn2 folded into conv1), Q = act(local_bn(X)) (the halting branch's input).
// Masks are (H+2, W+2) bytes with a zero border: A the positions still running, D =
// dilate3x3(A) (where conv1 runs), D2 = dilate3x3(D) (where P is needed).
//
// Unit n >= 1: P at D2 (the previous unit's epilogue already wrote it where that unit ran),
// conv1 at D, conv2 at A, then the residual X += R with the per-image channel sums of the
// change (the halting branch's global term), Q and the next unit's P at A; the halting
// branch, the recurrence and the weighted sum at A. Unit 0 runs everywhere: P0 =
// act1(bn1(x)) at the input resolution, conv1 with the unit's stride and TF "SAME" padding
// (0 top-left / 1 bottom-right on even sizes), conv2 + the option-A shortcut (average pool
// over the stride, clipped at odd sizes like avg_pool2d(ceil_mode=True), and zero channel
// padding), or the pre-activation itself with activate_before_residual.
//
// Convolutions are direct, no im2col: a register-blocked micro-kernel computes a block of
// output positions times N*NV output channels (GCC vector extensions: AVX-512 with
// -march=native where the CPU has it, narrower vectors elsewhere; about 16 accumulators),
// broadcasting each input value of each tap and channel. Runs of consecutive positions of a
// row give affine blocks (16 or 8 positions); the rest of every run is queued and computed
// in gathered blocks that take positions from several runs and rows, so sparse masks and
// short rows still fill whole blocks.
//
// Threads. Batches of at least `threads` images: one image per thread at a time (no
// synchronisation). The remaining images (batch 1, or the last batch % threads images): all
// threads on one image, rows split by work, four barriers per unit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

using at::Tensor;

// Internal vector-returning helpers: without AVX the ABI note of GCC is irrelevant here.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

// ---------------------------------------------------------------------------------------
// Vectors (GCC / Clang vector extensions).

template <typename T, int N>
struct VecT {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};

template <typename V, typename T>
inline V vload(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void vstore(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// ---------------------------------------------------------------------------------------
// Direct 3x3 convolution micro-kernel.
//
// out[p*os + j] = act(bias[j] + sum_{ky, kx, ci} in[ky*rs + kx*cin + p*ps + ci] * w[((3*ky + kx)*cin + ci)*ldw + j])
// for p < P, j < N*NV, act(v) = v > 0 ? v : slope*v. `in` points at the top-left tap of the
// first position; ps = PS when PS > 0 (compile-time position step), else ps_rt.

// Affine block: P consecutive positions, position step ps (PS > 0: compile-time).
template <typename T>
using AffineFn = void (*)(const T*, int64_t, int64_t, int, const T*, int64_t, const T*, T, T*, int64_t);

template <typename T, int N, int NV, int P, int PS>
void conv_affine(const T* __restrict in, int64_t rs, int64_t ps_rt, int cin, const T* __restrict w, int64_t ldw,
                 const T* __restrict bias, T slope, T* __restrict out, int64_t os) {
  using V = typename VecT<T, N>::type;
  const int64_t ps = PS > 0 ? PS : ps_rt;
  V acc[P][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const V b = vload<V>(bias + v * N);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) acc[p][v] = b;
  }
  for (int k = 0; k < 9; ++k) {
    const T* ip = in + (k / 3) * rs + (k % 3) * cin;
    const T* wp = w + static_cast<int64_t>(k) * cin * ldw;
    for (int ci = 0; ci < cin; ++ci) {
      V wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = vload<V>(wp + v * N);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const T a = ip[p * ps];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[p][v] += a * wv[v];
      }
      ++ip;
      wp += ldw;
    }
  }
  const V zero = {};
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const V r = acc[p][v];
      vstore(out + p * os + v * N, r > zero ? r : r * slope);
    }
  }
}

// Gathered block: P arbitrary positions, top-left taps at in + off[p], outputs at out + oo[p].
// Positions from several runs and rows share one block, so short runs (sparse masks, small
// maps) still get full blocks.
template <typename T>
using GatherFn = void (*)(const T*, const int32_t*, int64_t, int, const T*, int64_t, const T*, T, T*, const int32_t*);

template <typename T, int N, int NV, int P>
void conv_gather(const T* __restrict in, const int32_t* __restrict off, int64_t rs, int cin, const T* __restrict w,
                 int64_t ldw, const T* __restrict bias, T slope, T* __restrict out, const int32_t* __restrict oo) {
  using V = typename VecT<T, N>::type;
  V acc[P][NV];
  int64_t o[P];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) o[p] = off[p];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const V b = vload<V>(bias + v * N);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) acc[p][v] = b;
  }
  for (int k = 0; k < 9; ++k) {
    const T* ip = in + (k / 3) * rs + (k % 3) * cin;
    const T* wp = w + static_cast<int64_t>(k) * cin * ldw;
    for (int ci = 0; ci < cin; ++ci) {
      V wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = vload<V>(wp + v * N);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const T a = ip[o[p]];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[p][v] += a * wv[v];
      }
      ++ip;
      wp += ldw;
    }
  }
  const V zero = {};
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const V r = acc[p][v];
      vstore(out + oo[p] + v * N, r > zero ? r : r * slope);
    }
  }
}

// Block sizes: 16 (affine) / 12 (gathered) positions for one vector of output channels per
// slice, 8 for two (about 16 accumulators), then 8, 4, 2, 1 for the last gathered positions.
constexpr int kGather = 5;
// Gaps of at most this many positions between two runs are computed too (results unused).
constexpr int kGap = 2;

template <typename T>
struct Slice {
  int j0 = 0;  // first output channel
  AffineFn<T> affine = nullptr;
  GatherFn<T> gather[kGather] = {};
};

template <typename T>
struct ConvPlan {
  int cin = 0, cout = 0;
  int64_t ps = 0;  // input elements between consecutive output positions (stride * cin)
  int pa = 16;     // positions of an affine block
  int pg[kGather] = {12, 8, 4, 2, 1};  // positions of the gathered blocks
  std::vector<Slice<T>> slices;
};

template <typename T, int N, int NV, int PA, int PS>
void fill_slice(Slice<T>& s, int pg0) {
  s.affine = conv_affine<T, N, NV, PA, PS>;
  s.gather[0] = pg0 == 12 ? conv_gather<T, N, NV, 12> : conv_gather<T, N, NV, 8>;
  s.gather[1] = conv_gather<T, N, NV, 8>;
  s.gather[2] = conv_gather<T, N, NV, 4>;
  s.gather[3] = conv_gather<T, N, NV, 2>;
  s.gather[4] = conv_gather<T, N, NV, 1>;
}

// Compile-time position steps for the channel counts of the reference's networks; other
// steps (and odd channel counts) use the same kernel with a run-time step.
template <typename T, int N, int NV, int PA>
void fill_slice_ps(Slice<T>& s, int64_t ps, int pg0) {
  if (N < 4) return fill_slice<T, N, NV, PA, 0>(s, pg0);
  switch (ps) {
    case 8: return fill_slice<T, N, NV, PA, 8>(s, pg0);
    case 16: return fill_slice<T, N, NV, PA, 16>(s, pg0);
    case 32: return fill_slice<T, N, NV, PA, 32>(s, pg0);
    case 64: return fill_slice<T, N, NV, PA, 64>(s, pg0);
    default: return fill_slice<T, N, NV, PA, 0>(s, pg0);
  }
}

template <typename T, int N>
void plan_lanes(ConvPlan<T>& pl) {
  const int nvec = pl.cout / N;
  const bool wide = nvec >= 2;  // slices of two vectors: blocks of 8 positions
  pl.pa = wide ? 8 : 16;
  pl.pg[0] = wide ? 8 : 12;
  for (int v = 0; v < nvec;) {
    Slice<T> s;
    s.j0 = v * N;
    const int nv = nvec - v >= 2 ? 2 : 1;
    if (nv == 2) {
      fill_slice_ps<T, N, 2, 8>(s, pl.ps, pl.pg[0]);
    } else if (wide) {
      fill_slice_ps<T, N, 1, 8>(s, pl.ps, pl.pg[0]);
    } else {
      fill_slice_ps<T, N, 1, 16>(s, pl.ps, pl.pg[0]);
    }
    v += nv;
    pl.slices.push_back(s);
  }
}

template <typename T>
ConvPlan<T> make_plan(int cin, int cout, int stride) {
  ConvPlan<T> pl;
  pl.cin = cin;
  pl.cout = cout;
  pl.ps = static_cast<int64_t>(stride) * cin;
  constexpr int maxn = 64 / static_cast<int>(sizeof(T));  // one 512-bit vector
  if (maxn >= 16 && cout % 16 == 0) {
    plan_lanes<T, (maxn >= 16 ? 16 : 8)>(pl);
  } else if (cout % 8 == 0) {
    plan_lanes<T, 8>(pl);
  } else if (cout % 4 == 0) {
    plan_lanes<T, 4>(pl);
  } else if (cout % 2 == 0) {
    plan_lanes<T, 2>(pl);
  } else {
    plan_lanes<T, 1>(pl);
  }
  return pl;
}

// One convolution over a set of output positions given as runs: whole affine blocks within a
// run, the rest of each run queued and computed in gathered blocks. Offsets are in elements:
// `io` = top-left tap of the run's first position in `in`, `oo` = its output in `out`
// (consecutive positions: +ps in the input, +cout in the output).
template <typename T>
struct ConvJob {
  const ConvPlan<T>& pl;
  const T* in;
  int64_t rs;
  const T* w;
  const T* bias;
  T slope;
  T* out;
  int32_t* qi;  // queued input offsets (room for pl.pg[0])
  int32_t* qo;  // queued output offsets
  int n = 0;

  void gather(int g, const int32_t* gi, const int32_t* go) const {
    for (const Slice<T>& s : pl.slices)
      s.gather[g](in, gi, rs, pl.cin, w + s.j0, pl.cout, bias + s.j0, slope, out + s.j0, go);
  }

  void run(int64_t io, int64_t oo, int L) {
    int i = 0;
    for (; i + pl.pa <= L; i += pl.pa) {
      for (const Slice<T>& s : pl.slices)
        s.affine(in + io + i * pl.ps, rs, pl.ps, pl.cin, w + s.j0, pl.cout, bias + s.j0, slope,
                 out + oo + static_cast<int64_t>(i) * pl.cout + s.j0, pl.cout);
    }
    for (; i < L; ++i) {
      qi[n] = static_cast<int32_t>(io + i * pl.ps);
      qo[n] = static_cast<int32_t>(oo + static_cast<int64_t>(i) * pl.cout);
      if (++n == pl.pg[0]) {
        gather(0, qi, qo);
        n = 0;
      }
    }
  }

  void flush() {
    int done = 0;
    while (done < n) {
      int g = 0;
      while (pl.pg[g] > n - done) ++g;
      gather(g, qi + done, qo + done);
      done += pl.pg[g];
    }
    n = 0;
  }
};

// ---------------------------------------------------------------------------------------
// Small helpers.

template <typename T>
inline T lrelu(T v, T slope) {
  return v > T(0) ? v : v * slope;
}

// Calls f(std::integral_constant<int, N>{}) with the widest vector length N (at most 64 bytes,
// at least 16) that divides C, or N = 0 when none does (scalar code).
template <typename T, typename F>
inline void with_lanes(int C, F&& f) {
  constexpr int n64 = 64 / sizeof(T), n32 = 32 / sizeof(T), n16 = 16 / sizeof(T);
  if (C % n64 == 0) return f(std::integral_constant<int, n64>{});
  if (C % n32 == 0) return f(std::integral_constant<int, n32>{});
  if (C % n16 == 0) return f(std::integral_constant<int, n16>{});
  return f(std::integral_constant<int, 0>{});
}

// Sum of the lanes of a vector (a tree of half-vector additions).
template <typename T, int N>
inline T hsum(const typename VecT<T, N>::type& v) {
  if constexpr (N <= 2) {
    T s = v[0];
    for (int i = 1; i < N; ++i) s += v[i];
    return s;
  } else {
    using H = typename VecT<T, N / 2>::type;
    H lo, hi;
    __builtin_memcpy(&lo, &v, sizeof(H));
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return hsum<T, N / 2>(lo + hi);
  }
}

// The SACT branch's local 3x3 convolution (one output channel, no bias) at L consecutive
// positions: q = top-left tap of the first one in Q (rows rs apart), wl (9, C). Blocks of 8
// positions share each weight vector and keep 8 independent accumulators.
template <typename T, int N, int B>
inline void local_logits_block(const T* q, int64_t rs, int C, const T* wl, T* out) {
  using V = typename VecT<T, N>::type;
  V acc[B];
#pragma GCC unroll 8
  for (int i = 0; i < B; ++i) acc[i] = V{};
  for (int k = 0; k < 9; ++k) {
    const T* a = q + (k / 3) * rs + static_cast<int64_t>(k % 3) * C;
    const T* w = wl + k * C;
    for (int c = 0; c < C; c += N) {
      const V wv = vload<V>(w + c);
#pragma GCC unroll 8
      for (int i = 0; i < B; ++i) acc[i] += vload<V>(a + static_cast<int64_t>(i) * C + c) * wv;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < B; ++i) out[i] = hsum<T, N>(acc[i]);
}

template <typename T>
void local_logits(const T* q, int64_t rs, int C, const T* wl, int L, T* out) {
  bool done = false;
  with_lanes<T>(C, [&](auto lanes) {
    constexpr int N = decltype(lanes)::value;
    if constexpr (N > 0) {
      int i = 0;
      for (; i + 8 <= L; i += 8) local_logits_block<T, N, 8>(q + static_cast<int64_t>(i) * C, rs, C, wl, out + i);
      for (; i + 2 <= L; i += 2) local_logits_block<T, N, 2>(q + static_cast<int64_t>(i) * C, rs, C, wl, out + i);
      if (i < L) local_logits_block<T, N, 1>(q + static_cast<int64_t>(i) * C, rs, C, wl, out + i);
      done = true;
    }
  });
  if (done) return;
  for (int i = 0; i < L; ++i) {
    T acc = 0;
    for (int k = 0; k < 9; ++k) {
      const T* a = q + (k / 3) * rs + static_cast<int64_t>(i + k % 3) * C;
      const T* w = wl + k * C;
      for (int c = 0; c < C; ++c) acc += a[c] * w[c];
    }
    out[i] = acc;
  }
}

// z[i] = sigmoid(z[i]) = 1 / (1 + exp(-z[i])).
template <typename T>
inline void sigmoid_inplace(T* z, int n) {
  for (int i = 0; i < n; ++i) z[i] = T(1) / (T(1) + std::exp(-z[i]));
}

// float32: a vectorised exp (Cephes' expf polynomial, about 1 ulp) instead of n calls of expf;
// z has room for n rounded up to a multiple of 16.
template <>
inline void sigmoid_inplace<float>(float* z, int n) {
  using V = VecT<float, 16>::type;
  using VI = VecT<int32_t, 16>::type;
  // Whole vectors: z must have room for n rounded up to 16 (the lanes past n are garbage).
  int i = 0;
  for (; i < n; i += 16) {
    V v = -vload<V>(z + i);
    v = v < V{} + 88.3762626647949f ? v : V{} + 88.3762626647949f;
    v = v > V{} - 87.3365447504f ? v : V{} - 87.3365447504f;
    // n = round(v / ln 2), r = v - n ln 2 (in two parts)
    const V t = v * 1.44269504088896341f;
    const V nf = (t + 12582912.0f) - 12582912.0f;
    V r = v - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    V p = V{} + 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
    const VI e = (__builtin_convertvector(nf, VI) + 127) << 23;
    V scale;
    __builtin_memcpy(&scale, &e, sizeof(V));
    vstore(z + i, 1.0f / (1.0f + p * scale));
  }
  (void)i;
}

// The epilogue of a unit's second convolution at L consecutive positions (rows of C):
// X += R (R null: X is already complete), S += R (sum_x: S += X instead), then the inputs of
// the next convolutions from the new X: Q = act_l(sl*X + tl) (the halting branch; Q null: none)
// and P = act1(s1*X + t1) (the next unit's pre-activation; P null: none).
template <typename T>
struct Epilogue {
  const T *sl = nullptr, *tl = nullptr;
  T slope_l = 0;
  T* Q = nullptr;
  const T *s1 = nullptr, *t1 = nullptr;
  T slope1 = 0;
  T* P = nullptr;
};

template <typename T, int N>
void residual_run_v(T* X, const T* R, int L, int C, bool sum_x, T* S, const Epilogue<T>& e) {
  using V = typename VecT<T, N>::type;
  const V zero = {};
  for (int c = 0; c < C; c += N) {
    V acc = vload<V>(S + c);
    const V sl = e.Q ? vload<V>(e.sl + c) : zero, tl = e.Q ? vload<V>(e.tl + c) : zero;
    const V s1 = e.P ? vload<V>(e.s1 + c) : zero, t1 = e.P ? vload<V>(e.t1 + c) : zero;
    for (int i = 0; i < L; ++i) {
      const int64_t o = static_cast<int64_t>(i) * C + c;
      V x = vload<V>(X + o);
      if (R) {
        const V r = vload<V>(R + o);
        x = x + r;
        vstore(X + o, x);
        acc += sum_x ? x : r;
      } else {
        acc += x;
      }
      if (e.Q) {
        const V q = sl * x + tl;
        vstore(e.Q + o, q > zero ? q : q * e.slope_l);
      }
      if (e.P) {
        const V p = s1 * x + t1;
        vstore(e.P + o, p > zero ? p : p * e.slope1);
      }
    }
    vstore(S + c, acc);
  }
}

template <typename T>
void residual_run(T* X, const T* R, int L, int C, bool sum_x, T* S, const Epilogue<T>& e) {
  bool done = false;
  with_lanes<T>(C, [&](auto lanes) {
    constexpr int N = decltype(lanes)::value;
    if constexpr (N > 0) {
      residual_run_v<T, N>(X, R, L, C, sum_x, S, e);
      done = true;
    }
  });
  if (done) return;
  for (int i = 0; i < L; ++i) {
    T* x = X + static_cast<int64_t>(i) * C;
    const T* r = R ? R + static_cast<int64_t>(i) * C : nullptr;
    for (int c = 0; c < C; ++c) {
      if (r) x[c] = x[c] + r[c];
      S[c] += (r && !sum_x) ? r[c] : x[c];
      if (e.Q) e.Q[i * C + c] = lrelu(e.sl[c] * x[c] + e.tl[c], e.slope_l);
      if (e.P) e.P[i * C + c] = lrelu(e.s1[c] * x[c] + e.t1[c], e.slope1);
    }
  }
}

// dst[c] = act(s[c] * src[c] + t[c]) (leaky ReLU with `slope`), c < n, for m rows of n
// (src rows `ss` apart, dst rows n apart).
template <typename T>
void affine_act_rows(T* dst, const T* src, int64_t ss, const T* sc, const T* sh, T slope, int n, int m) {
  with_lanes<T>(n, [&](auto lanes) {
    constexpr int N = decltype(lanes)::value;
    if constexpr (N > 0) {
      using V = typename VecT<T, N>::type;
      const V zero = {};
      for (int c = 0; c < n; c += N) {
        const V a = vload<V>(sc + c), b = vload<V>(sh + c);
        for (int i = 0; i < m; ++i) {
          const V v = a * vload<V>(src + i * ss + c) + b;
          vstore(dst + static_cast<int64_t>(i) * n + c, v > zero ? v : v * slope);
        }
      }
    } else {
      for (int i = 0; i < m; ++i)
        for (int c = 0; c < n; ++c) dst[static_cast<int64_t>(i) * n + c] = lrelu(sc[c] * src[i * ss + c] + sh[c], slope);
    }
  });
}

// The option-A shortcut plus the residual of one output position: dst[c] = mean over the k
// window rows a[j] (k = 1 or 4, in avg_pool2d's order) + r[c], c < n.
template <typename T>
void shortcut_add(T* dst, const T* a0, const T* a1, const T* a2, const T* a3, int k, const T* r, int n) {
  with_lanes<T>(n, [&](auto lanes) {
    constexpr int N = decltype(lanes)::value;
    if constexpr (N > 0) {
      using V = typename VecT<T, N>::type;
      for (int c = 0; c < n; c += N) {
        V v = vload<V>(a0 + c);
        if (k == 4) v = (((v + vload<V>(a1 + c)) + vload<V>(a2 + c)) + vload<V>(a3 + c)) / T(4);
        vstore(dst + c, v + vload<V>(r + c));
      }
    } else {
      for (int c = 0; c < n; ++c)
        dst[c] = (k == 4 ? (((a0[c] + a1[c]) + a2[c]) + a3[c]) / T(4) : a0[c]) + r[c];
    }
  });
}

// Rows [y0, y1) of part `tid` of `nt`: contiguous parts with about equal sum of cost[y] + 1.
inline void split_rows(const int* cost, int H, int nt, int tid, int& y0, int& y1) {
  if (nt == 1) {
    y0 = 0;
    y1 = H;
    return;
  }
  int64_t total = 0;
  for (int y = 0; y < H; ++y) total += cost[y] + 1;
  auto bound = [&](int t) {
    if (t <= 0) return 0;
    if (t >= nt) return H;
    int64_t acc = 0;
    int y = 0;
    while (y < H && acc * nt < total * t) acc += cost[y++] + 1;
    return y;
  };
  y0 = bound(tid);
  y1 = bound(tid + 1);
}

// Calls f(x0, length) for every run of non-zero bytes of m[0 .. W).
template <typename F>
inline void for_runs(const uint8_t* m, int W, F&& f) {
  int x = 0;
  while (x < W) {
    while (x < W && !m[x]) ++x;
    if (x >= W) break;
    const int s = x;
    while (x < W && m[x]) ++x;
    f(s, x - s);
  }
}

// Like for_runs, but runs separated by at most `gap` zero bytes are merged (the convolutions
// compute those few extra positions, whose results nobody reads, to get longer runs).
template <typename F>
inline void for_merged_runs(const uint8_t* m, int W, int gap, F&& f) {
  int start = -1, end = 0;
  for_runs(m, W, [&](int x0, int L) {
    if (start >= 0 && x0 - end > gap) {
      f(start, end - start);
      start = -1;
    }
    if (start < 0) start = x0;
    end = x0 + L;
  });
  if (start >= 0) f(start, end - start);
}

// ---------------------------------------------------------------------------------------
// Stage description (parsed from the meta tensor built by native_stage.py).

enum MetaField : int64_t {
  kVersion = 0,
  kMode,      // 0 SACT, 1 ACT
  kUnits,     // U
  kCin0,      // input channels of unit 0
  kC,         // channels of the stage
  kStride0,   // stride of unit 0 (1 or 2)
  kAbr0,      // unit 0 uses the pre-activation as its shortcut
  kHeader,
};
constexpr int64_t kMetaVersion = 1;
constexpr int kUnitFields = 8;  // s1, t1, w1, b1, w2, b2, slope1, slope2 (offsets into weights)
constexpr int kHaltFields = 10;  // sl, tl, wl, bl, slope_l, sg, tg, wg, bg, slope_g (-1: absent)

template <typename T>
struct UnitW {
  const T *s1, *t1, *w1, *b1, *w2, *b2;
  T slope1, slope2;
};

template <typename T>
struct HaltW {
  const T *sl, *tl, *wl, *sg, *tg, *wg;
  T bl, slope_l, bg, slope_g;
};

template <typename T>
struct Stage {
  bool sact;
  int U, cin0, C, stride0;
  bool abr0;
  T thr;  // 1 - eps in the data type, as halting_step compares
  std::vector<UnitW<T>> units;
  std::vector<HaltW<T>> halts;
};

template <typename T>
Stage<T> parse_stage(const Tensor& weights, const Tensor& meta, double eps) {
  const int64_t* m = meta.data_ptr<int64_t>();
  const int64_t nm = meta.numel();
  TORCH_CHECK(nm >= kHeader && m[kVersion] == kMetaVersion, "basic_stage: bad meta tensor");
  Stage<T> s;
  s.sact = m[kMode] == 0;
  s.U = static_cast<int>(m[kUnits]);
  s.cin0 = static_cast<int>(m[kCin0]);
  s.C = static_cast<int>(m[kC]);
  s.stride0 = static_cast<int>(m[kStride0]);
  s.abr0 = m[kAbr0] != 0;
  s.thr = static_cast<T>(1.0 - eps);
  TORCH_CHECK(s.U >= 1 && s.cin0 >= 1 && s.C >= s.cin0 && (s.C - s.cin0) % 2 == 0, "basic_stage: bad stage shape");
  TORCH_CHECK(s.stride0 == 1 || s.stride0 == 2, "basic_stage: unit 0 stride must be 1 or 2");
  TORCH_CHECK(nm == kHeader + s.U * kUnitFields + (s.U - 1) * kHaltFields, "basic_stage: meta has the wrong length");
  const T* w = weights.data_ptr<T>();
  const int64_t nw = weights.numel();
  auto at = [&](int64_t off, int64_t len) -> const T* {
    TORCH_CHECK(off >= 0 && off + len <= nw, "basic_stage: weight offset out of range");
    return w + off;
  };
  const int C = s.C;
  for (int n = 0; n < s.U; ++n) {
    const int64_t* f = m + kHeader + n * kUnitFields;
    const int cin = n == 0 ? s.cin0 : C;
    UnitW<T> u;
    u.s1 = at(f[0], cin);
    u.t1 = at(f[1], cin);
    u.w1 = at(f[2], 9 * cin * C);
    u.b1 = at(f[3], C);
    u.w2 = at(f[4], 9 * C * C);
    u.b2 = at(f[5], C);
    u.slope1 = *at(f[6], 1);
    u.slope2 = *at(f[7], 1);
    s.units.push_back(u);
  }
  for (int n = 0; n + 1 < s.U; ++n) {
    const int64_t* f = m + kHeader + s.U * kUnitFields + n * kHaltFields;
    HaltW<T> h{};
    if (s.sact) {
      h.sl = at(f[0], C);
      h.tl = at(f[1], C);
      h.wl = at(f[2], 9 * C);
      h.bl = *at(f[3], 1);
      h.slope_l = *at(f[4], 1);
    }
    h.sg = at(f[5], C);
    h.tg = at(f[6], C);
    h.wg = at(f[7], C);
    h.bg = *at(f[8], 1);
    h.slope_g = *at(f[9], 1);
    s.halts.push_back(h);
  }
  return s;
}

// ---------------------------------------------------------------------------------------
// Geometry and scratch.

struct Geo {
  int B, Hin, Win, H, W;  // input and output (stage) resolution
  int Hp, Wp, Hpin, Wpin;  // padded sizes (one-pixel border)
  int pt, pl;              // TF "SAME" padding before, unit 0's conv1
  int HW;
};

inline int same_pad_before(int size, int stride) {
  const int out = (size + stride - 1) / stride;
  const int total = std::max((out - 1) * stride + 3 - size, 0);
  return total / 2;
}

inline Geo make_geo(int B, int Hin, int Win, int stride) {
  Geo g;
  g.B = B;
  g.Hin = Hin;
  g.Win = Win;
  g.H = (Hin + stride - 1) / stride;
  g.W = (Win + stride - 1) / stride;
  g.Hp = g.H + 2;
  g.Wp = g.W + 2;
  g.Hpin = Hin + 2;
  g.Wpin = Win + 2;
  g.pt = same_pad_before(Hin, stride);
  g.pl = same_pad_before(Win, stride);
  g.HW = g.H * g.W;
  return g;
}

constexpr int64_t kAlign = 64;

inline int64_t align_up(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Byte layout of one thread's share of the scratch: the team part (used by the whole team
// in row-split mode) and the private part.
struct Layout {
  int64_t P0, P, Tb, Q, X, R, cs, rem, Spart, A, A2;  // team
  int64_t D, D2, S, logit, runs, queue, ones, cnt;  // private
  int64_t total;
};

inline Layout make_layout(const Geo& g, int cin0, int C, int nt, int64_t esz) {
  Layout l;
  int64_t o = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = o;
    o += align_up(bytes);
    return at;
  };
  const int64_t padded = static_cast<int64_t>(g.Hp) * g.Wp;
  l.P0 = take(static_cast<int64_t>(g.Hpin) * g.Wpin * cin0 * esz);
  l.P = take(padded * C * esz);
  l.Tb = take(padded * C * esz);
  l.Q = take(padded * C * esz);
  l.X = take(static_cast<int64_t>(g.HW) * C * esz);
  l.R = take(static_cast<int64_t>(g.HW) * C * esz);
  l.cs = take(g.HW * esz);
  l.rem = take(g.HW * esz);
  l.Spart = take(static_cast<int64_t>(nt) * C * esz);
  l.A = take(padded);
  l.A2 = take(padded);
  l.D = take(padded);
  l.D2 = take(padded);
  l.S = take(C * esz);
  l.logit = take((g.W + 16) * esz);  // slack: the vectorised sigmoid rounds up
  l.runs = take(2 * static_cast<int64_t>(g.W) * sizeof(int));
  l.queue = take(2 * 16 * sizeof(int32_t));
  l.ones = take(g.W + 2);
  l.cnt = take(4 * static_cast<int64_t>(g.H) * sizeof(int));
  l.total = o;
  return l;
}

// ---------------------------------------------------------------------------------------
// The per-image executor.

template <typename T>
struct Outputs {
  T* feat;          // (B, H, W, C)
  T* ponder;        // SACT (B, H, W); ACT (B)
  int64_t* nunits;  // SACT (B, H, W); ACT (B)
  T* dist;          // SACT (B, U, H, W); ACT (B, U)
  int64_t* counts;  // SACT (2, U, B): positions active / dilated per unit and image
};

template <typename T>
struct Input {
  const T* p;
  int64_t sb, sc, sy, sx;  // element strides of x (B, C, H, W)
};

template <typename T>
struct Team {
  T *P0, *P, *Tb, *Q, *X, *R, *cs, *rem, *Spart;
  uint8_t *A, *A2;  // running positions: this unit's and the next unit's
};

template <typename T>
struct Priv {
  uint8_t *D, *D2, *ones;
  T *S, *logit;
  int32_t *qi, *qo;  // queued positions of a convolution
  int* runs;  // (start, length) pairs of one row
  int *cntA, *cntD, *cntD2, *cntAll;
};

template <typename T>
Team<T> team_at(char* base, const Layout& l) {
  Team<T> t;
  t.P0 = reinterpret_cast<T*>(base + l.P0);
  t.P = reinterpret_cast<T*>(base + l.P);
  t.Tb = reinterpret_cast<T*>(base + l.Tb);
  t.Q = reinterpret_cast<T*>(base + l.Q);
  t.X = reinterpret_cast<T*>(base + l.X);
  t.R = reinterpret_cast<T*>(base + l.R);
  t.cs = reinterpret_cast<T*>(base + l.cs);
  t.rem = reinterpret_cast<T*>(base + l.rem);
  t.Spart = reinterpret_cast<T*>(base + l.Spart);
  t.A = reinterpret_cast<uint8_t*>(base + l.A);
  t.A2 = reinterpret_cast<uint8_t*>(base + l.A2);
  return t;
}

template <typename T>
Priv<T> priv_at(char* base, const Layout& l, const Geo& g) {
  Priv<T> p;
  p.D = reinterpret_cast<uint8_t*>(base + l.D);
  p.D2 = reinterpret_cast<uint8_t*>(base + l.D2);
  p.ones = reinterpret_cast<uint8_t*>(base + l.ones);
  p.qi = reinterpret_cast<int32_t*>(base + l.queue);
  p.qo = p.qi + 16;
  p.S = reinterpret_cast<T*>(base + l.S);
  p.logit = reinterpret_cast<T*>(base + l.logit);
  p.runs = reinterpret_cast<int*>(base + l.runs);
  int* c = reinterpret_cast<int*>(base + l.cnt);
  p.cntA = c;
  p.cntD = c + g.H;
  p.cntD2 = c + 2 * g.H;
  p.cntAll = c + 3 * g.H;
  return p;
}

// Zero the one-pixel border of a (Hp, Wp, c) buffer (rows y0..y1 of the border only in
// row-split mode would be fussy: the border is tiny, one thread does all of it).
template <typename E>
void zero_border(E* buf, int Hp, int Wp, int c) {
  std::memset(buf, 0, sizeof(E) * Wp * c);
  std::memset(buf + static_cast<int64_t>(Hp - 1) * Wp * c, 0, sizeof(E) * Wp * c);
  for (int y = 1; y < Hp - 1; ++y) {
    E* row = buf + static_cast<int64_t>(y) * Wp * c;
    std::memset(row, 0, sizeof(E) * c);
    std::memset(row + static_cast<int64_t>(Wp - 1) * c, 0, sizeof(E) * c);
  }
}

// 3x3 dilation of a padded mask (zero border kept), rows [y0, y1) (interior coordinates).
inline void dilate_rows(const uint8_t* in, uint8_t* out, int H, int W, int Wp, int y0, int y1) {
  for (int y = y0; y < y1; ++y) {
    const uint8_t* a = in + static_cast<int64_t>(y) * Wp;  // row above (padded row y)
    const uint8_t* b = a + Wp;
    const uint8_t* c = b + Wp;
    uint8_t* o = out + static_cast<int64_t>(y + 1) * Wp + 1;
    for (int x = 0; x < W; ++x) {
      o[x] = a[x] | a[x + 1] | a[x + 2] | b[x] | b[x + 1] | b[x + 2] | c[x] | c[x + 1] | c[x + 2];
    }
  }
}

inline void count_rows(const uint8_t* m, int H, int W, int Wp, int* cnt) {
  for (int y = 0; y < H; ++y) {
    const uint8_t* r = m + static_cast<int64_t>(y + 1) * Wp + 1;
    int s = 0;
    for (int x = 0; x < W; ++x) s += r[x];
    cnt[y] = s;
  }
}

template <typename T>
struct Ctx {
  const Stage<T>& st;
  const Geo& g;
  const Input<T>& in;
  const Outputs<T>& out;
  const ConvPlan<T>& plan0;  // unit 0's conv1 (cin0 -> C, stride0)
  const ConvPlan<T>& plan;   // every other convolution (C -> C, stride 1)
};

// Barrier of a team: OpenMP's when the team is the whole parallel region, else nothing.
struct Sync {
  bool on;
  void operator()() const {
    if (on) {
#pragma omp barrier
    }
  }
};

// Optional profile of the calling thread 0: seconds per unit and phase, summed over the
// images it ran (row U: [images, 0, ...]). Columns:
enum ProfCol { kMask = 0, kPre, kConv1, kConv2, kHalt, kWait, kActive, kDilated, kProfCols };

struct Prof {
  double* p = nullptr;
  std::chrono::steady_clock::time_point t;
  void start() {
    if (p) t = std::chrono::steady_clock::now();
  }
  void lap(int row, int col) {
    if (!p) return;
    const auto n = std::chrono::steady_clock::now();
    p[row * kProfCols + col] += std::chrono::duration<double>(n - t).count();
    t = n;
  }
  void add(int row, int col, double v) {
    if (p) p[row * kProfCols + col] += v;
  }
};

// The halting step of sact.act.halting_step at one running position (finished == false):
// returns the weight of the unit's output and whether the position halts here.
template <typename T>
inline T halting_step(T h, T thr, T& cs, T& rem, T& ponder, int64_t& nu, bool& halted) {
  cs = cs + h;
  halted = cs >= thr;
  nu += 1;
  if (halted) {
    ponder = ponder + rem;  // h is zeroed: the remainder stays
    return rem;
  }
  ponder = ponder + T(1);
  rem = rem - h;
  return h;
}

// Halting branch, recurrence and weighted sum at the running positions of row y: every
// position when `ar` is null, else the runs of non-zero bytes of ar (W bytes). an (W bytes)
// gets 1 where a position runs on (left alone elsewhere). `hw` null: the last unit (h = 1).
// `first`: unit 0 (the state starts at cs = 0, R = 1, ponder = 1, N = 0). dist: this unit's
// (H, W) plane of the distribution.
template <typename T>
void halt_row(const Ctx<T>& cx, Team<T>& tm, Priv<T>& pv, const HaltW<T>* hw, T gl, bool first, int y,
              const uint8_t* ar, uint8_t* an, T* feat, T* ponder, int64_t* nunits, T* dist) {
  const int C = cx.st.C, W = cx.g.W, Wp = cx.g.Wp;
  int nr = 0, n = 0;
  if (ar == nullptr) {
    pv.runs[0] = 0;
    pv.runs[1] = W;
    nr = 1;
    n = W;
  } else {
    for_runs(ar, W, [&](int x0, int L) {
      pv.runs[2 * nr] = x0;
      pv.runs[2 * nr + 1] = L;
      ++nr;
      n += L;
    });
  }
  if (n == 0) return;
  T* z = pv.logit;
  if (hw) {
    const int64_t rs = static_cast<int64_t>(Wp) * C;
    for (int j = 0, o = 0; j < nr; o += pv.runs[2 * j + 1], ++j) {
      const int x0 = pv.runs[2 * j];
      local_logits(tm.Q + (static_cast<int64_t>(y) * Wp + x0) * C, rs, C, hw->wl, pv.runs[2 * j + 1], z + o);
    }
    for (int i = 0; i < n; ++i) z[i] = (z[i] + hw->bl) + gl;
    sigmoid_inplace(z, n);
  } else {
    for (int i = 0; i < n; ++i) z[i] = T(1);
  }
  const T thr = cx.st.thr;
  for (int j = 0, o = 0; j < nr; o += pv.runs[2 * j + 1], ++j) {
    const int x0 = pv.runs[2 * j], L = pv.runs[2 * j + 1];
    const int p0 = y * W + x0;
    const T* h = z + o;
    T* cs = tm.cs + p0;
    T* rem = tm.rem + p0;
    T* pc = ponder + p0;
    int64_t* nu = nunits + p0;
    T* d = dist + p0;
    uint8_t* a = an + x0;
    for (int i = 0; i < L; ++i) {
      // sact.act.halting_step at a running position
      const T c = (first ? T(0) : cs[i]) + h[i];
      const T r = first ? T(1) : rem[i];
      const bool halted = c >= thr;
      cs[i] = c;
      d[i] = halted ? r : h[i];
      pc[i] = (first ? T(1) : pc[i]) + (halted ? r : T(1));
      rem[i] = halted ? r : r - h[i];
      nu[i] = (first ? 0 : nu[i]) + 1;
      a[i] = halted ? 0 : 1;
    }
    const T* x = tm.X + static_cast<int64_t>(p0) * C;
    T* out = feat + static_cast<int64_t>(p0) * C;
    for (int i = 0; i < L; ++i) {
      const T w = d[i];
      if (first) {
#pragma GCC ivdep
        for (int c = 0; c < C; ++c) out[i * C + c] = w * x[i * C + c];
      } else {
#pragma GCC ivdep
        for (int c = 0; c < C; ++c) out[i * C + c] = out[i * C + c] + w * x[i * C + c];
      }
    }
  }
}

// Runs the stage on image b with a team of nt threads (this one is tid).
template <typename T>
void run_image(const Ctx<T>& cx, Team<T>& tm, Priv<T>& pv, int b, int tid, int nt, bool first, const Sync& bar,
               Prof& pr) {
  const Stage<T>& st = cx.st;
  const Geo& g = cx.g;
  const int C = st.C, U = st.U, H = g.H, W = g.W, Wp = g.Wp, HW = g.HW;
  const int cin0 = st.cin0;
  const int64_t rsC = static_cast<int64_t>(Wp) * C;
  const T one = T(1);
  T* feat = cx.out.feat + static_cast<int64_t>(b) * HW * C;
  int y0, y1;
  int prow = 0;  // profile row: the unit being run
  auto sync = [&](int col) {
    pr.lap(prow, col);
    bar();
    pr.lap(prow, kWait);
  };
  pr.start();
  pr.add(U, 0, 1.0);

  if (first) {
    if (tid == 0) {
      zero_border(tm.P0, g.Hpin, g.Wpin, cin0);
      zero_border(tm.P, g.Hp, Wp, C);
      zero_border(tm.Tb, g.Hp, Wp, C);
      zero_border(tm.Q, g.Hp, Wp, C);
      zero_border(tm.A, g.Hp, Wp, 1);
      zero_border(tm.A2, g.Hp, Wp, 1);
    }
    zero_border(pv.D, g.Hp, Wp, 1);
    zero_border(pv.D2, g.Hp, Wp, 1);
    std::memset(pv.ones, 1, W + 2);
    for (int y = 0; y < H; ++y) pv.cntAll[y] = W;
  }

  // ---- unit 0, every position ----
  const UnitW<T>& u0 = st.units[0];
  {
    // P0 = act1(bn1(x)) at the input resolution (rows split evenly).
    const int hin = g.Hin;
    const int a = static_cast<int>(static_cast<int64_t>(hin) * tid / nt);
    const int e = static_cast<int>(static_cast<int64_t>(hin) * (tid + 1) / nt);
    const T* xb = cx.in.p + b * cx.in.sb;
    for (int y = a; y < e; ++y) {
      T* dst = tm.P0 + (static_cast<int64_t>(y + 1) * g.Wpin + 1) * cin0;
      const T* src = xb + y * cx.in.sy;
      if (cx.in.sc == 1) {
        affine_act_rows(dst, src, cx.in.sx, u0.s1, u0.t1, u0.slope1, cin0, g.Win);
      } else {
        for (int x = 0; x < g.Win; ++x) {
          for (int c = 0; c < cin0; ++c)
            dst[x * cin0 + c] = lrelu(u0.s1[c] * src[x * cx.in.sx + c * cx.in.sc] + u0.t1[c], u0.slope1);
        }
      }
    }
  }
  sync(kPre);
  // conv1 (stride s, TF SAME) -> T at every output position.
  split_rows(pv.cntAll, H, nt, tid, y0, y1);
  {
    const int s = st.stride0;
    ConvJob<T> job{cx.plan0, tm.P0, static_cast<int64_t>(g.Wpin) * cin0, u0.w1, u0.b1, u0.slope2, tm.Tb, pv.qi, pv.qo};
    for (int y = y0; y < y1; ++y) {
      // top-left tap of output (y, 0): input (s*y - pt, -pl), +1 for the border
      job.run((static_cast<int64_t>(s * y - g.pt + 1) * g.Wpin + (1 - g.pl)) * cin0,
              (static_cast<int64_t>(y + 1) * Wp + 1) * C, W);
    }
    job.flush();
  }
  sync(kConv1);
  // conv2 + shortcut -> X; channel sums; the halting branch's and unit 1's inputs.
  T* Sp = tm.Spart + static_cast<int64_t>(tid) * C;
  std::fill(Sp, Sp + C, T(0));
  // The epilogue after unit n's conv2 also prepares unit n + 1's pre-activation P.
  auto epilogue = [&](int n, int64_t pos) {
    Epilogue<T> e;
    if (n + 1 < U) {
      if (st.sact) {
        const HaltW<T>& hw = st.halts[n];
        e.sl = hw.sl;
        e.tl = hw.tl;
        e.slope_l = hw.slope_l;
        e.Q = tm.Q + pos;
      }
      const UnitW<T>& un = st.units[n + 1];
      e.s1 = un.s1;
      e.t1 = un.t1;
      e.slope1 = un.slope1;
      e.P = tm.P + pos;
    }
    return e;
  };
  {
    const int s = st.stride0;
    const int pad = (C - cin0) / 2;
    // the shortcut's source: the pre-activation (activate_before_residual) or the input
    const T* sb = st.abr0 ? tm.P0 + (static_cast<int64_t>(g.Wpin) + 1) * cin0 : cx.in.p + b * cx.in.sb;
    const int64_t s_y = st.abr0 ? static_cast<int64_t>(g.Wpin) * cin0 : cx.in.sy;
    const int64_t s_x = st.abr0 ? cin0 : cx.in.sx;
    const int64_t s_c = st.abr0 ? 1 : cx.in.sc;
    ConvJob<T> job{cx.plan, tm.Tb, rsC, u0.w2, u0.b2, one, tm.R, pv.qi, pv.qo};
    for (int y = y0; y < y1; ++y) job.run(static_cast<int64_t>(y) * rsC, static_cast<int64_t>(y) * W * C, W);
    job.flush();
    for (int y = y0; y < y1; ++y) {
      for (int x = 0; x < W; ++x) {
        const T* r = tm.R + (static_cast<int64_t>(y) * W + x) * C;
        T* xo = tm.X + (static_cast<int64_t>(y) * W + x) * C;
        // X = shortcut + r: the option-A shortcut is zero outside channels [pad, pad + cin0)
        for (int c = 0; c < pad; ++c) xo[c] = T(0) + r[c];
        for (int c = pad + cin0; c < C; ++c) xo[c] = T(0) + r[c];
        const int ya = s * y, yb = std::min(s * y + s, g.Hin);
        const int xa = s * x, xe = std::min(s * x + s, g.Win);
        const int cnt = (yb - ya) * (xe - xa);
        const T* a = sb + ya * s_y + xa * s_x;
        T* xp = xo + pad;
        const T* rp = r + pad;
        if (s_c == 1 && (cnt == 1 || cnt == 4)) {
          shortcut_add(xp, a, a + s_x, a + s_y, a + s_y + s_x, cnt, rp, cin0);
        } else {
          for (int c = 0; c < cin0; ++c) {
            T sum = 0;
            for (int yy = 0; yy < yb - ya; ++yy)
              for (int xx = 0; xx < xe - xa; ++xx) sum += a[yy * s_y + xx * s_x + c * s_c];
            xp[c] = (cnt == 1 ? sum : sum / static_cast<T>(cnt)) + rp[c];
          }
        }
      }
      residual_run(tm.X + static_cast<int64_t>(y) * W * C, static_cast<const T*>(nullptr), W, C, true, Sp,
                   epilogue(0, (static_cast<int64_t>(y + 1) * Wp + 1) * C));
    }
  }
  sync(kConv2);
  // Sums of the whole image (every thread the same, in the same order).
  std::fill(pv.S, pv.S + C, T(0));
  auto add_sums = [&]() {
    for (int t = 0; t < nt; ++t) {
      const T* sp = tm.Spart + static_cast<int64_t>(t) * C;
      for (int c = 0; c < C; ++c) pv.S[c] += sp[c];
    }
  };
  add_sums();

  auto global_logit = [&](const HaltW<T>& hw) {
    T acc = 0;
    for (int c = 0; c < C; ++c) {
      const T mean = pv.S[c] / static_cast<T>(HW);
      acc += hw.wg[c] * lrelu(hw.sg[c] * mean + hw.tg[c], hw.slope_g);
    }
    return acc + hw.bg;
  };

  // ---- ACT: one position per image, every unit everywhere until the image halts ----
  if (!st.sact) {
    T cs = 0, rem = 1, ponder = 1;
    int64_t nu = 0;
    T* dist = cx.out.dist + static_cast<int64_t>(b) * U;
    for (int n = 0; n < U; ++n) {
      prow = n;
      if (n > 0) {
        const UnitW<T>& u = st.units[n];
        // P (this unit's pre-activation) was written by the previous unit's epilogue.
        {
          ConvJob<T> job{cx.plan, tm.P, rsC, u.w1, u.b1, u.slope2, tm.Tb, pv.qi, pv.qo};
          for (int y = y0; y < y1; ++y)
            job.run(static_cast<int64_t>(y) * rsC, (static_cast<int64_t>(y + 1) * Wp + 1) * C, W);
          job.flush();
        }
        sync(kConv1);
        std::fill(Sp, Sp + C, T(0));
        {
          ConvJob<T> job{cx.plan, tm.Tb, rsC, u.w2, u.b2, one, tm.R, pv.qi, pv.qo};
          for (int y = y0; y < y1; ++y) job.run(static_cast<int64_t>(y) * rsC, static_cast<int64_t>(y) * W * C, W);
          job.flush();
        }
        for (int y = y0; y < y1; ++y) {
          const int64_t o = static_cast<int64_t>(y) * W * C;
          residual_run(tm.X + o, tm.R + o, W, C, false, Sp, epilogue(n, (static_cast<int64_t>(y + 1) * Wp + 1) * C));
        }
        sync(kConv2);
        add_sums();
      }
      T h = one;
      if (n < U - 1) h = T(1) / (T(1) + std::exp(-global_logit(st.halts[n])));
      bool halted;
      const T wgt = halting_step(h, st.thr, cs, rem, ponder, nu, halted);
      for (int y = y0; y < y1; ++y) {
        const T* xi = tm.X + static_cast<int64_t>(y) * W * C;
        T* o = feat + static_cast<int64_t>(y) * W * C;
        if (n == 0) {
#pragma GCC ivdep
          for (int i = 0; i < W * C; ++i) o[i] = wgt * xi[i];
        } else {
#pragma GCC ivdep
          for (int i = 0; i < W * C; ++i) o[i] = o[i] + wgt * xi[i];
        }
      }
      if (tid == 0) dist[n] = wgt;
      if (halted) {
        if (tid == 0) {
          for (int m = n + 1; m < U; ++m) dist[m] = T(0);
          cx.out.ponder[b] = ponder;
          cx.out.nunits[b] = nu;
        }
        break;
      }
      sync(kHalt);  // X is read by the next unit's convolutions on any thread
    }
    sync(kHalt);  // the team's scratch is reused by the next image
    return;
  }

  // ---- SACT ----
  T* ponder = cx.out.ponder + static_cast<int64_t>(b) * HW;
  int64_t* nunits = cx.out.nunits + static_cast<int64_t>(b) * HW;
  T* dist_b = cx.out.dist + static_cast<int64_t>(b) * U * HW;
  int64_t* cnt_active = cx.out.counts;                                    // (U, B)
  int64_t* cnt_dilated = cx.out.counts + static_cast<int64_t>(U) * g.B;  // (U, B)
  if (tid == 0) {
    cnt_active[b] = HW;
    cnt_dilated[b] = 0;
  }
  uint8_t* Acur = tm.A;    // running at the current unit
  uint8_t* Anext = tm.A2;  // running at the next unit (written by the halting phase)
  const uint8_t* Aprev = nullptr;  // updated by the previous unit (P is ready there); null: all
  auto mrow = [&](auto* m, int y) { return m + static_cast<int64_t>(y + 1) * Wp + 1; };
  // Halting after unit 0, every position (rows y0..y1 of the plain split).
  {
    const HaltW<T>* hw = U > 1 ? &st.halts[0] : nullptr;
    const T gl = hw ? global_logit(*hw) : T(0);
    for (int y = y0; y < y1; ++y)
      halt_row(cx, tm, pv, hw, gl, true, y, nullptr, mrow(Acur, y), feat, ponder, nunits, dist_b);
  }
  sync(kHalt);

  for (int n = 1; n < U; ++n) {
    prow = n;
    const UnitW<T>& u = st.units[n];
    const HaltW<T>* hw = n < U - 1 ? &st.halts[n] : nullptr;
    // Masks (every thread its own copy, from the shared Acur).
    count_rows(Acur, H, W, Wp, pv.cntA);
    int64_t na = 0;
    for (int y = 0; y < H; ++y) na += pv.cntA[y];
    T* dist_n = dist_b + static_cast<int64_t>(n) * HW;
    if (na == 0) {
      // Everything halted: the remaining units and branches touch nothing.
      split_rows(pv.cntAll, H, nt, tid, y0, y1);
      for (int m = n; m < U; ++m) {
        std::fill(dist_b + static_cast<int64_t>(m) * HW + y0 * W, dist_b + static_cast<int64_t>(m) * HW + y1 * W, T(0));
        if (tid == 0) {
          cnt_active[static_cast<int64_t>(m) * g.B + b] = 0;
          cnt_dilated[static_cast<int64_t>(m) * g.B + b] = 0;
        }
      }
      break;
    }
    const bool full = na == HW;
    const uint8_t* D = full ? nullptr : pv.D;
    const uint8_t* D2 = full ? nullptr : pv.D2;
    const int* cntD = pv.cntAll;
    const int* cntD2 = pv.cntAll;
    int64_t nd = HW;
    if (!full) {
      dilate_rows(Acur, pv.D, H, W, Wp, 0, H);
      dilate_rows(pv.D, pv.D2, H, W, Wp, 0, H);
      count_rows(pv.D, H, W, Wp, pv.cntD);
      count_rows(pv.D2, H, W, Wp, pv.cntD2);
      cntD = pv.cntD;
      cntD2 = pv.cntD2;
      nd = 0;
      for (int y = 0; y < H; ++y) nd += pv.cntD[y];
    }
    if (tid == 0) {
      cnt_active[static_cast<int64_t>(n) * g.B + b] = na;
      cnt_dilated[static_cast<int64_t>(n) * g.B + b] = nd;
    }
    auto row_of = [&](const uint8_t* m, int y) -> const uint8_t* { return m ? mrow(m, y) : pv.ones; };
    // Partitions of this unit's phases.
    int p1a, p1b, p2a, p2b, p3a, p3b;
    split_rows(cntD2, H, nt, tid, p1a, p1b);
    split_rows(cntD, H, nt, tid, p2a, p2b);
    split_rows(pv.cntA, H, nt, tid, p3a, p3b);
    pr.lap(n, kMask);
    pr.add(n, kActive, static_cast<double>(na) / HW);
    pr.add(n, kDilated, static_cast<double>(nd) / HW);

    // Phase 1: the inputs at frozen positions: P = act1(bn1(X)) at D2 outside Aprev (the
    // previous unit's epilogue wrote the rest), Q = act(bn(X)) at D outside Acur.
    if (Aprev != nullptr || (hw && !full)) {
      for (int y = p1a; y < p1b; ++y) {
        const uint8_t* d2 = row_of(D2, y);
        const uint8_t* pr_ = Aprev ? mrow(Aprev, y) : nullptr;
        const uint8_t* d = row_of(D, y);
        const uint8_t* a = mrow(Acur, y);
        for (int x = 0; x < W; ++x) {
          const bool need_p = d2[x] && pr_ && !pr_[x];
          const bool need_q = hw && d[x] && !a[x];
          if (!need_p && !need_q) continue;
          const T* xi = tm.X + (static_cast<int64_t>(y) * W + x) * C;
          const int64_t o = (static_cast<int64_t>(y + 1) * Wp + x + 1) * C;
          if (need_p) {
            T* p = tm.P + o;
#pragma GCC ivdep
            for (int c = 0; c < C; ++c) p[c] = lrelu(u.s1[c] * xi[c] + u.t1[c], u.slope1);
          }
          if (need_q) {
            T* q = tm.Q + o;
#pragma GCC ivdep
            for (int c = 0; c < C; ++c) q[c] = lrelu(hw->sl[c] * xi[c] + hw->tl[c], hw->slope_l);
          }
        }
      }
    }
    sync(kPre);
    // Phase 2: conv1 (bn2 folded) + act2 at D -> T.
    {
      ConvJob<T> job{cx.plan, tm.P, rsC, u.w1, u.b1, u.slope2, tm.Tb, pv.qi, pv.qo};
      for (int y = p2a; y < p2b; ++y) {
        for_merged_runs(row_of(D, y), W, kGap, [&](int x0, int L) {
          job.run((static_cast<int64_t>(y) * Wp + x0) * C, (static_cast<int64_t>(y + 1) * Wp + x0 + 1) * C, L);
        });
      }
      job.flush();
    }
    sync(kConv1);
    // Phase 3: conv2 at Acur -> R, then the residual, the sums of the change, Q at Acur and
    // the next unit's P at Acur.
    std::fill(Sp, Sp + C, T(0));
    {
      ConvJob<T> job{cx.plan, tm.Tb, rsC, u.w2, u.b2, one, tm.R, pv.qi, pv.qo};
      for (int y = p3a; y < p3b; ++y) {
        for_merged_runs(mrow(Acur, y), W, kGap, [&](int x0, int L) {
          job.run((static_cast<int64_t>(y) * Wp + x0) * C, (static_cast<int64_t>(y) * W + x0) * C, L);
        });
      }
      job.flush();
    }
    for (int y = p3a; y < p3b; ++y) {
      for_runs(mrow(Acur, y), W, [&](int x0, int L) {
        const int64_t o = (static_cast<int64_t>(y) * W + x0) * C;
        residual_run(tm.X + o, tm.R + o, L, C, false, Sp, epilogue(n, (static_cast<int64_t>(y + 1) * Wp + x0 + 1) * C));
      });
    }
    sync(kConv2);
    add_sums();
    // Phase 4: halting at Acur, the recurrence, the weighted sum; Anext = still running.
    const T gl = hw ? global_logit(*hw) : T(0);
    for (int y = p3a; y < p3b; ++y) {
      std::fill(dist_n + static_cast<int64_t>(y) * W, dist_n + static_cast<int64_t>(y + 1) * W, T(0));
      uint8_t* an = mrow(Anext, y);
      std::memset(an, 0, W);
      halt_row(cx, tm, pv, hw, gl, false, y, mrow(Acur, y), an, feat, ponder, nunits, dist_n);
    }
    sync(kHalt);
    Aprev = full ? nullptr : Acur;  // null: this unit ran everywhere, P is ready everywhere
    std::swap(Acur, Anext);
  }
  sync(kMask);  // the team's scratch is reused by the next image
}

template <typename T>
void basic_stage_impl(const Tensor& x, const Tensor& weights, const Tensor& meta, Tensor& scratch, double eps,
                      int64_t threads, const Tensor& feat, const Tensor& ponder, const Tensor& nunits, const Tensor& dist,
                      const Tensor& counts, double* profile) {
  const Stage<T> st = parse_stage<T>(weights, meta, eps);
  const Geo g = make_geo(static_cast<int>(x.size(0)), static_cast<int>(x.size(2)), static_cast<int>(x.size(3)),
                         st.stride0);
  const int nt = static_cast<int>(std::max<int64_t>(threads, 1));
  const Layout l = make_layout(g, st.cin0, st.C, nt, sizeof(T));
  TORCH_CHECK(scratch.nbytes() >= static_cast<size_t>(l.total * nt) + kAlign, "basic_stage: scratch too small");
  char* base = static_cast<char*>(scratch.data_ptr());
  base += (kAlign - reinterpret_cast<uintptr_t>(base) % kAlign) % kAlign;

  const ConvPlan<T> plan0 = make_plan<T>(st.cin0, st.C, st.stride0);
  const ConvPlan<T> plan = make_plan<T>(st.C, st.C, 1);
  Input<T> in{x.data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  Outputs<T> out{feat.data_ptr<T>(), ponder.data_ptr<T>(), nunits.data_ptr<int64_t>(), dist.data_ptr<T>(),
                 st.sact ? counts.data_ptr<int64_t>() : nullptr};
  Ctx<T> cx{st, g, in, out, plan0, plan};
  const int B = g.B;
  const int per_thread = nt > 1 ? (B / nt) * nt : B;  // images run one per thread

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();
    char* mine = base + static_cast<int64_t>(tid) * l.total;
    Team<T> own = team_at<T>(mine, l);
    Priv<T> pv = priv_at<T>(mine, l, g);
    bool first = true;
    const Sync none{false};
    Prof pr;
    if (tid == 0) pr.p = profile;
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < per_thread; ++b) {
      run_image(cx, own, pv, b, 0, 1, first, none, pr);
      first = false;
    }
    // The rest: all threads on one image at a time, sharing thread 0's team scratch.
    Team<T> shared = team_at<T>(base, l);
    bool first_shared = true;
    const Sync bar{team > 1};
    for (int b = per_thread; b < B; ++b) {
      run_image(cx, shared, pv, b, tid, team, first_shared || first, bar, pr);
      first_shared = false;
      first = false;
    }
  }
}

// Bytes of scratch the stage needs for input (H, W) with `threads` threads.
int64_t basic_stage_scratch_bytes(Tensor meta, int64_t height, int64_t width, int64_t threads, int64_t elem_size) {
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.is_contiguous() && meta.numel() >= kHeader,
              "basic_stage: bad meta tensor");
  const int64_t* m = meta.data_ptr<int64_t>();
  const Geo g = make_geo(1, static_cast<int>(height), static_cast<int>(width), static_cast<int>(m[kStride0]));
  const int nt = static_cast<int>(std::max<int64_t>(threads, 1));
  return make_layout(g, static_cast<int>(m[kCin0]), static_cast<int>(m[kC]), nt, elem_size).total * nt + kAlign;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> basic_stage(Tensor x, Tensor weights, Tensor meta, Tensor scratch,
                                                               double eps, int64_t threads,
                                                               const std::optional<Tensor>& profile) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "basic_stage: x must be a (B, C, H, W) CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "basic_stage: float32 or float64 only");
  TORCH_CHECK(weights.scalar_type() == x.scalar_type() && weights.is_contiguous() && weights.dim() == 1,
              "basic_stage: weights must be a flat tensor of x's dtype");
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.is_contiguous(), "basic_stage: meta must be int64");
  TORCH_CHECK(scratch.device().is_cpu() && scratch.is_contiguous(), "basic_stage: scratch must be contiguous");
  const int64_t* m = meta.data_ptr<int64_t>();
  TORCH_CHECK(meta.numel() >= kHeader && m[kVersion] == kMetaVersion, "basic_stage: bad meta tensor");
  TORCH_CHECK(x.size(1) == m[kCin0], "basic_stage: x has ", x.size(1), " channels, the stage expects ", m[kCin0]);
  const bool sact = m[kMode] == 0;
  const int64_t U = m[kUnits], C = m[kC], s = m[kStride0];
  const int64_t B = x.size(0), H = (x.size(2) + s - 1) / s, W = (x.size(3) + s - 1) / s;
  TORCH_CHECK(H >= 1 && W >= 1, "basic_stage: empty feature map");
  TORCH_CHECK((x.size(2) + 2) * (x.size(3) + 2) * std::max<int64_t>(C, x.size(1)) < (int64_t(1) << 31),
              "basic_stage: feature map too large");
  const auto opt = x.options();
  const Tensor feat = at::empty({B, H, W, C}, opt);
  const Tensor ponder = sact ? at::empty({B, H, W}, opt) : at::empty({B}, opt);
  const Tensor nunits = sact ? at::empty({B, H, W}, opt.dtype(at::kLong)) : at::empty({B}, opt.dtype(at::kLong));
  const Tensor dist = sact ? at::empty({B, U, H, W}, opt) : at::empty({B, U}, opt);
  const Tensor counts = sact ? at::empty({2, U, B}, opt.dtype(at::kLong)) : at::empty({0}, opt.dtype(at::kLong));
  double* prof = nullptr;
  if (profile.has_value() && profile->defined()) {
    TORCH_CHECK(profile->scalar_type() == at::kDouble && profile->is_contiguous() && profile->dim() == 2 &&
                    profile->size(0) == U + 1 && profile->size(1) == kProfCols,
                "basic_stage: profile must be a contiguous float64 (U + 1, ", static_cast<int>(kProfCols), ") tensor");
    prof = profile->data_ptr<double>();
  }
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "basic_stage", [&] {
      basic_stage_impl<scalar_t>(x, weights, meta, scratch, eps, threads, feat, ponder, nunits, dist, counts, prof);
    });
  }
  return {feat, ponder, nunits, dist, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sact_native, m) {
  m.def("basic_stage(Tensor x, Tensor weights, Tensor meta, Tensor(a!) scratch, float eps, int threads, "
        "Tensor(b!)? profile=None) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("basic_stage_scratch_bytes(Tensor meta, int height, int width, int threads, int elem_size) -> int");
}

TORCH_LIBRARY_IMPL(sact_native, CPU, m) {
  m.impl("basic_stage", &basic_stage);
  m.impl("basic_stage_scratch_bytes", &basic_stage_scratch_bytes);
}
