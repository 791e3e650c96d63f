// Native whole-stage executor of the reference's CIFAR stages (sact/sparse/native_stage.py).
//
// One call runs a whole sact.AdaptiveStage of sact.units.PreActBasicUnit in eval mode: the
// loop over units, the SACT (per position) or ACT (per image) halting branch after each unit,
// the halting recurrence of sact.act.halting_step and the weighted sum of the unit outputs.
// It must compute what sact.AdaptiveStage.forward computes (tests/test_sparse_native_stage.py
// compares them in float64 to 1e-9 and against the pure-PyTorch sparse engine).
//
// Layout. One image at a time, everything channels-last in per-team scratch that stays in
// L2: X (H, W, C) the features; P, T, Q (H+2, W+2, C) the inputs of the 3x3 convolutions
// with a one-pixel zero border (zero padding comes after BN + activation, as in TF "SAME"):
// P = act1(bn1(X)) (conv1's input), T = act2(bn2(conv1(P))) (conv2's input; bn2 folded into
// conv1), Q = act(local_bn(X)) (the halting branch's input). Masks are (H+2, W+2) bytes with a
// zero border: A the positions still running, D = dilate3x3(A) (where conv1 runs), D2 =
// dilate3x3(D) (where P is needed).
//
// Unit n >= 1: P at D2, conv1 at D, conv2 + residual at A, halting at A. Unit 0 runs
// everywhere: P0 = act1(bn1(x)) at the input resolution, conv1 with the unit's stride and
// TF "SAME" padding (0 top-left / 1 bottom-right on even sizes), conv2 + the option-A shortcut
// (average pool over the stride, clipped at odd sizes like avg_pool2d(ceil_mode=True), and
// zero channel padding), or the pre-activation itself with activate_before_residual.
//
// Convolutions are direct: a register-blocked micro-kernel computes P consecutive output
// positions of one image row times N*NV output channels (GCC vector extensions: AVX-512 with
// -march=native where the CPU has it, narrower vectors elsewhere), reading the input of each
// tap and channel as a broadcast. Runs of consecutive active positions of a row are cut into
// such blocks.
//
// Threads. Batches of at least `threads` images: one image per thread at a time (no
// synchronisation). The remaining images (batch 1, or the last batch % threads images): all
// threads on one image, rows split by work, four barriers per unit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using at::Tensor;

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

template <typename T>
using BlockFn = void (*)(const T*, int64_t, int64_t, int, const T*, int64_t, const T*, T, T*, int64_t);

template <typename T, int N, int NV, int P, int PS>
void conv_block(const T* __restrict in, int64_t rs, int64_t ps_rt, int cin, const T* __restrict w, int64_t ldw,
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
        const T s = ip[p * ps];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[p][v] += s * wv[v];
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

// Block sizes per slice width: 16 positions for one vector of output channels, 8 for two
// (16 accumulators either way), then powers of two for the tails of a run.
constexpr int kMaxP = 5;

template <typename T>
struct Slice {
  int j0 = 0;  // first output channel
  int count = 0;
  int p[kMaxP] = {};
  BlockFn<T> fn[kMaxP] = {};
};

template <typename T, int N, int NV, int PS>
void fill_slice(Slice<T>& s) {
  if (NV == 1) {
    const int ps[5] = {16, 8, 4, 2, 1};
    const BlockFn<T> fs[5] = {conv_block<T, N, NV, 16, PS>, conv_block<T, N, NV, 8, PS>, conv_block<T, N, NV, 4, PS>,
                              conv_block<T, N, NV, 2, PS>, conv_block<T, N, NV, 1, PS>};
    s.count = 5;
    for (int i = 0; i < 5; ++i) s.p[i] = ps[i], s.fn[i] = fs[i];
  } else {
    const int ps[4] = {8, 4, 2, 1};
    const BlockFn<T> fs[4] = {conv_block<T, N, NV, 8, PS>, conv_block<T, N, NV, 4, PS>, conv_block<T, N, NV, 2, PS>,
                              conv_block<T, N, NV, 1, PS>};
    s.count = 4;
    for (int i = 0; i < 4; ++i) s.p[i] = ps[i], s.fn[i] = fs[i];
  }
}

// Compile-time position steps for the channel counts of the reference's networks; other
// steps use the same kernel with a run-time step.
template <typename T, int N, int NV>
void fill_slice_ps(Slice<T>& s, int64_t ps) {
  switch (ps) {
    case 8: fill_slice<T, N, NV, 8>(s); break;
    case 16: fill_slice<T, N, NV, 16>(s); break;
    case 32: fill_slice<T, N, NV, 32>(s); break;
    case 64: fill_slice<T, N, NV, 64>(s); break;
    default: fill_slice<T, N, NV, 0>(s); break;
  }
}

template <typename T, int N, int NV>
void fill_slice_any(Slice<T>& s, int64_t ps) {
  if (N >= 4) {
    fill_slice_ps<T, N, NV>(s, ps);
  } else {
    fill_slice<T, N, NV, 0>(s);  // odd channel counts: run-time step only
  }
}

template <typename T>
struct ConvPlan {
  int cin = 0, cout = 0;
  int64_t ps = 0;  // input elements between consecutive output positions (stride * cin)
  std::vector<Slice<T>> slices;
};

template <typename T, int N>
void plan_lanes(ConvPlan<T>& pl) {
  const int nvec = pl.cout / N;
  int v = 0;
  while (v < nvec) {
    Slice<T> s;
    s.j0 = v * N;
    if (nvec - v >= 2) {
      fill_slice_any<T, N, 2>(s, pl.ps);
      v += 2;
    } else {
      fill_slice_any<T, N, 1>(s, pl.ps);
      v += 1;
    }
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
    plan_lanes<T, (maxn >= 16 ? 16 : 1)>(pl);
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

// Convolution at L consecutive output positions: `in` = top-left tap of the first one.
template <typename T>
inline void conv_run(const ConvPlan<T>& pl, const T* in, int64_t rs, int L, const T* w, const T* bias, T slope, T* out,
                     int64_t os) {
  for (const Slice<T>& s : pl.slices) {
    int pos = 0;
    while (pos < L) {
      const int rem = L - pos;
      int i = 0;
      while (s.p[i] > rem) ++i;
      s.fn[i](in + pos * pl.ps, rs, pl.ps, pl.cin, w + s.j0, pl.cout, bias + s.j0, slope, out + pos * os + s.j0, os);
      pos += s.p[i];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Small helpers.

template <typename T>
inline T lrelu(T v, T slope) {
  return v > T(0) ? v : v * slope;
}

template <typename T>
inline T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

// Sum of a[i] * b[i], i < n (vectorised over N lanes where n allows).
template <typename T>
inline T dot(const T* a, const T* b, int n) {
  constexpr int N = 64 / sizeof(T);
  using V = typename VecT<T, N>::type;
  int i = 0;
  T s = 0;
  if (n >= N) {
    V acc = {};
    for (; i + N <= n; i += N) acc += vload<V>(a + i) * vload<V>(b + i);
    for (int j = 0; j < N; ++j) s += acc[j];
  }
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
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
  int64_t P0, P, Tb, Q, X, cs, rem, Spart, A;  // team
  int64_t D, D2, R, S, logit, ones, cnt;       // private
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
  l.cs = take(g.HW * esz);
  l.rem = take(g.HW * esz);
  l.Spart = take(static_cast<int64_t>(nt) * C * esz);
  l.A = take(padded);
  l.D = take(padded);
  l.D2 = take(padded);
  l.R = take(static_cast<int64_t>(g.W) * C * esz);
  l.S = take(C * esz);
  l.logit = take(g.W * esz);
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
  T *P0, *P, *Tb, *Q, *X, *cs, *rem, *Spart;
  uint8_t* A;
};

template <typename T>
struct Priv {
  uint8_t *D, *D2, *ones;
  T *R, *S, *logit;
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
  t.cs = reinterpret_cast<T*>(base + l.cs);
  t.rem = reinterpret_cast<T*>(base + l.rem);
  t.Spart = reinterpret_cast<T*>(base + l.Spart);
  t.A = reinterpret_cast<uint8_t*>(base + l.A);
  return t;
}

template <typename T>
Priv<T> priv_at(char* base, const Layout& l, const Geo& g) {
  Priv<T> p;
  p.D = reinterpret_cast<uint8_t*>(base + l.D);
  p.D2 = reinterpret_cast<uint8_t*>(base + l.D2);
  p.ones = reinterpret_cast<uint8_t*>(base + l.ones);
  p.R = reinterpret_cast<T*>(base + l.R);
  p.S = reinterpret_cast<T*>(base + l.S);
  p.logit = reinterpret_cast<T*>(base + l.logit);
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

// Runs the stage on image b with a team of nt threads (this one is tid).
template <typename T>
void run_image(const Ctx<T>& cx, Team<T>& tm, Priv<T>& pv, int b, int tid, int nt, bool first, const Sync& sync) {
  const Stage<T>& st = cx.st;
  const Geo& g = cx.g;
  const int C = st.C, U = st.U, H = g.H, W = g.W, Wp = g.Wp, HW = g.HW;
  const int cin0 = st.cin0;
  const int64_t rsC = static_cast<int64_t>(Wp) * C;
  const T one = T(1);
  T* feat = cx.out.feat + static_cast<int64_t>(b) * HW * C;
  int y0, y1;

  if (first) {
    if (tid == 0) {
      zero_border(tm.P0, g.Hpin, g.Wpin, cin0);
      zero_border(tm.P, g.Hp, Wp, C);
      zero_border(tm.Tb, g.Hp, Wp, C);
      zero_border(tm.Q, g.Hp, Wp, C);
      zero_border(tm.A, g.Hp, Wp, 1);
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
      for (int x = 0; x < g.Win; ++x) {
        const T* src = xb + y * cx.in.sy + x * cx.in.sx;
        T* d = dst + static_cast<int64_t>(x) * cin0;
        if (cx.in.sc == 1) {
#pragma GCC ivdep
          for (int c = 0; c < cin0; ++c) d[c] = lrelu(u0.s1[c] * src[c] + u0.t1[c], u0.slope1);
        } else {
          for (int c = 0; c < cin0; ++c) d[c] = lrelu(u0.s1[c] * src[c * cx.in.sc] + u0.t1[c], u0.slope1);
        }
      }
    }
  }
  sync();
  // conv1 (stride s, TF SAME) -> T at every output position.
  split_rows(pv.cntAll, H, nt, tid, y0, y1);
  {
    const int s = st.stride0;
    const int64_t rs = static_cast<int64_t>(g.Wpin) * cin0;
    for (int y = y0; y < y1; ++y) {
      // top-left tap of output (y, 0): input (s*y - pt, -pl), +1 for the border
      const T* tl = tm.P0 + (static_cast<int64_t>(s * y - g.pt + 1) * g.Wpin + (1 - g.pl)) * cin0;
      conv_run(cx.plan0, tl, rs, W, u0.w1, u0.b1, u0.slope2, tm.Tb + (static_cast<int64_t>(y + 1) * Wp + 1) * C, C);
    }
  }
  sync();
  // conv2 + shortcut -> X; channel sums; halting input Q.
  const bool halt0 = U > 1;
  T* Sp = tm.Spart + static_cast<int64_t>(tid) * C;
  std::fill(Sp, Sp + C, T(0));
  {
    const int s = st.stride0;
    const int pad = (C - cin0) / 2;
    const T* xb = cx.in.p + b * cx.in.sb;
    for (int y = y0; y < y1; ++y) {
      conv_run(cx.plan, tm.Tb + static_cast<int64_t>(y) * rsC, rsC, W, u0.w2, u0.b2, one, pv.R, C);
      for (int x = 0; x < W; ++x) {
        const T* r = pv.R + static_cast<int64_t>(x) * C;
        T* xo = tm.X + (static_cast<int64_t>(y) * W + x) * C;
        // shortcut + r
        for (int c = 0; c < pad; ++c) xo[c] = T(0) + r[c];
        for (int c = pad + cin0; c < C; ++c) xo[c] = T(0) + r[c];
        if (s == 1) {
          if (st.abr0) {
            const T* p = tm.P0 + (static_cast<int64_t>(y + 1) * g.Wpin + x + 1) * cin0;
            for (int c = 0; c < cin0; ++c) xo[pad + c] = p[c] + r[pad + c];
          } else {
            const T* p = xb + y * cx.in.sy + x * cx.in.sx;
            for (int c = 0; c < cin0; ++c) xo[pad + c] = p[c * cx.in.sc] + r[pad + c];
          }
        } else {
          const int ya = s * y, yb = std::min(s * y + s, g.Hin);
          const int xa = s * x, xe = std::min(s * x + s, g.Win);
          const T cnt = static_cast<T>((yb - ya) * (xe - xa));
          for (int c = 0; c < cin0; ++c) {
            T sum = 0;
            for (int yy = ya; yy < yb; ++yy) {
              for (int xx = xa; xx < xe; ++xx) {
                sum += st.abr0 ? tm.P0[(static_cast<int64_t>(yy + 1) * g.Wpin + xx + 1) * cin0 + c]
                               : xb[yy * cx.in.sy + xx * cx.in.sx + c * cx.in.sc];
              }
            }
            xo[pad + c] = sum / cnt + r[pad + c];
          }
        }
#pragma GCC ivdep
        for (int c = 0; c < C; ++c) Sp[c] += xo[c];
        if (halt0 && st.sact) {
          const HaltW<T>& hw = st.halts[0];
          T* q = tm.Q + (static_cast<int64_t>(y + 1) * Wp + x + 1) * C;
#pragma GCC ivdep
          for (int c = 0; c < C; ++c) q[c] = lrelu(hw.sl[c] * xo[c] + hw.tl[c], hw.slope_l);
        }
      }
    }
  }
  sync();
  // Sums of the whole image (every thread the same, in the same order).
  std::fill(pv.S, pv.S + C, T(0));
  for (int t = 0; t < nt; ++t) {
    const T* sp = tm.Spart + static_cast<int64_t>(t) * C;
    for (int c = 0; c < C; ++c) pv.S[c] += sp[c];
  }

  auto global_logit = [&](const HaltW<T>& hw) {
    T acc = 0;
    for (int c = 0; c < C; ++c) {
      const T mean = pv.S[c] / static_cast<T>(HW);
      acc += hw.wg[c] * lrelu(hw.sg[c] * mean + hw.tg[c], hw.slope_g);
    }
    return acc + hw.bg;
  };

  // ---- ACT: one position per image ----
  if (!st.sact) {
    T cs = 0, rem = 1, ponder = 1;
    int64_t nu = 0;
    T* dist = cx.out.dist + static_cast<int64_t>(b) * U;
    for (int n = 0; n < U; ++n) {
      if (n > 0) {
        const UnitW<T>& u = st.units[n];
        // P = act1(bn1(X)) everywhere
        for (int y = y0; y < y1; ++y) {
          for (int x = 0; x < W; ++x) {
            const T* xi = tm.X + (static_cast<int64_t>(y) * W + x) * C;
            T* p = tm.P + (static_cast<int64_t>(y + 1) * Wp + x + 1) * C;
#pragma GCC ivdep
            for (int c = 0; c < C; ++c) p[c] = lrelu(u.s1[c] * xi[c] + u.t1[c], u.slope1);
          }
        }
        sync();
        for (int y = y0; y < y1; ++y) {
          conv_run(cx.plan, tm.P + static_cast<int64_t>(y) * rsC, rsC, W, u.w1, u.b1, u.slope2,
                   tm.Tb + (static_cast<int64_t>(y + 1) * Wp + 1) * C, C);
        }
        sync();
        std::fill(Sp, Sp + C, T(0));
        for (int y = y0; y < y1; ++y) {
          conv_run(cx.plan, tm.Tb + static_cast<int64_t>(y) * rsC, rsC, W, u.w2, u.b2, one, pv.R, C);
          T* xo = tm.X + static_cast<int64_t>(y) * W * C;
          const T* r = pv.R;
          for (int x = 0; x < W; ++x) {
#pragma GCC ivdep
            for (int c = 0; c < C; ++c) {
              xo[x * C + c] = xo[x * C + c] + r[x * C + c];
              Sp[c] += r[x * C + c];
            }
          }
        }
        sync();
        for (int t = 0; t < nt; ++t) {
          const T* sp = tm.Spart + static_cast<int64_t>(t) * C;
          for (int c = 0; c < C; ++c) pv.S[c] += sp[c];
        }
      }
      const T h = n < U - 1 ? sigmoid(global_logit(st.halts[n])) : one;
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
      sync();  // X is read by the next unit's P pass of any thread
    }
    sync();  // the team's scratch is reused by the next image
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
  // Halting after unit 0, every position (rows y0..y1 of the plain split).
  {
    const bool has_h = U > 1;
    const T gl = has_h ? global_logit(st.halts[0]) : T(0);
    for (int y = y0; y < y1; ++y) {
      for (int x = 0; x < W; ++x) {
        const int p = y * W + x;
        T h = one;
        if (has_h) {
          const HaltW<T>& hw = st.halts[0];
          T acc = 0;
          for (int k = 0; k < 9; ++k) {
            const T* q = tm.Q + (static_cast<int64_t>(y + k / 3) * Wp + x + k % 3) * C;
            acc += dot(q, hw.wl + k * C, C);
          }
          h = sigmoid((acc + hw.bl) + gl);
        }
        T cs = 0, rem = 1, pc = 1;
        int64_t nu = 0;
        bool halted;
        const T wgt = halting_step(h, st.thr, cs, rem, pc, nu, halted);
        tm.cs[p] = cs;
        tm.rem[p] = rem;
        ponder[p] = pc;
        nunits[p] = nu;
        dist_b[p] = wgt;
        tm.A[(y + 1) * Wp + x + 1] = halted ? 0 : 1;
        const T* xi = tm.X + static_cast<int64_t>(p) * C;
        T* o = feat + static_cast<int64_t>(p) * C;
#pragma GCC ivdep
        for (int c = 0; c < C; ++c) o[c] = wgt * xi[c];
      }
    }
  }
  sync();

  for (int n = 1; n < U; ++n) {
    const UnitW<T>& u = st.units[n];
    const bool has_h = n < U - 1;
    // Masks (every thread its own copy, from the shared A).
    count_rows(tm.A, H, W, Wp, pv.cntA);
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
    const uint8_t* A = tm.A;
    const uint8_t* D = full ? nullptr : pv.D;
    const uint8_t* D2 = full ? nullptr : pv.D2;
    const int* cntD = pv.cntAll;
    const int* cntD2 = pv.cntAll;
    int64_t nd = HW;
    if (!full) {
      dilate_rows(A, pv.D, H, W, Wp, 0, H);
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
    auto row_of = [&](const uint8_t* m, int y) -> const uint8_t* {
      return m ? m + static_cast<int64_t>(y + 1) * Wp + 1 : pv.ones;
    };
    // Partitions of this unit's phases (A changes in the last one).
    int p1a, p1b, p2a, p2b, p3a, p3b;
    split_rows(cntD2, H, nt, tid, p1a, p1b);
    split_rows(cntD, H, nt, tid, p2a, p2b);
    split_rows(pv.cntA, H, nt, tid, p3a, p3b);

    // Phase 1: P = act1(bn1(X)) at D2; Q at D \ A (frozen positions the halting conv reads).
    const HaltW<T>* hw = has_h ? &st.halts[n] : nullptr;
    for (int y = p1a; y < p1b; ++y) {
      for_runs(row_of(D2, y), W, [&](int x0, int L) {
        const T* xi = tm.X + (static_cast<int64_t>(y) * W + x0) * C;
        T* p = tm.P + (static_cast<int64_t>(y + 1) * Wp + x0 + 1) * C;
        for (int x = 0; x < L; ++x) {
#pragma GCC ivdep
          for (int c = 0; c < C; ++c) p[x * C + c] = lrelu(u.s1[c] * xi[x * C + c] + u.t1[c], u.slope1);
        }
      });
      if (hw && !full) {
        const uint8_t* dr = row_of(D, y);
        const uint8_t* ar = row_of(A, y);
        for (int x = 0; x < W; ++x) {
          if (!dr[x] || ar[x]) continue;
          const T* xi = tm.X + (static_cast<int64_t>(y) * W + x) * C;
          T* q = tm.Q + (static_cast<int64_t>(y + 1) * Wp + x + 1) * C;
#pragma GCC ivdep
          for (int c = 0; c < C; ++c) q[c] = lrelu(hw->sl[c] * xi[c] + hw->tl[c], hw->slope_l);
        }
      }
    }
    sync();
    // Phase 2: conv1 (bn2 folded) + act2 at D -> T.
    for (int y = p2a; y < p2b; ++y) {
      for_runs(row_of(D, y), W, [&](int x0, int L) {
        conv_run(cx.plan, tm.P + static_cast<int64_t>(y) * rsC + static_cast<int64_t>(x0) * C, rsC, L, u.w1, u.b1,
                 u.slope2, tm.Tb + (static_cast<int64_t>(y + 1) * Wp + x0 + 1) * C, C);
      });
    }
    sync();
    // Phase 3: conv2 + residual at A; sums of the change; Q at A.
    std::fill(Sp, Sp + C, T(0));
    for (int y = p3a; y < p3b; ++y) {
      for_runs(row_of(A, y), W, [&](int x0, int L) {
        conv_run(cx.plan, tm.Tb + static_cast<int64_t>(y) * rsC + static_cast<int64_t>(x0) * C, rsC, L, u.w2, u.b2, one,
                 pv.R, C);
        T* xo = tm.X + (static_cast<int64_t>(y) * W + x0) * C;
        for (int x = 0; x < L; ++x) {
          const T* r = pv.R + static_cast<int64_t>(x) * C;
          T* xv = xo + static_cast<int64_t>(x) * C;
#pragma GCC ivdep
          for (int c = 0; c < C; ++c) {
            xv[c] = xv[c] + r[c];
            Sp[c] += r[c];
          }
          if (hw) {
            T* q = tm.Q + (static_cast<int64_t>(y + 1) * Wp + x0 + x + 1) * C;
#pragma GCC ivdep
            for (int c = 0; c < C; ++c) q[c] = lrelu(hw->sl[c] * xv[c] + hw->tl[c], hw->slope_l);
          }
        }
      });
    }
    sync();
    for (int t = 0; t < nt; ++t) {
      const T* sp = tm.Spart + static_cast<int64_t>(t) * C;
      for (int c = 0; c < C; ++c) pv.S[c] += sp[c];
    }
    // Phase 4: halting at A, the recurrence, the weighted sum; A becomes the next unit's set.
    const T gl = hw ? global_logit(*hw) : T(0);
    for (int y = p3a; y < p3b; ++y) {
      uint8_t* ar = tm.A + static_cast<int64_t>(y + 1) * Wp + 1;
      T* dn = dist_n + static_cast<int64_t>(y) * W;
      for (int x = 0; x < W; ++x) {
        if (!ar[x]) {
          dn[x] = T(0);
          continue;
        }
        const int p = y * W + x;
        T h = one;
        if (hw) {
          T acc = 0;
          for (int k = 0; k < 9; ++k) {
            const T* q = tm.Q + (static_cast<int64_t>(y + k / 3) * Wp + x + k % 3) * C;
            acc += dot(q, hw->wl + k * C, C);
          }
          h = sigmoid((acc + hw->bl) + gl);
        }
        bool halted;
        const T wgt = halting_step(h, st.thr, tm.cs[p], tm.rem[p], ponder[p], nunits[p], halted);
        dn[x] = wgt;
        if (halted) ar[x] = 0;
        const T* xi = tm.X + static_cast<int64_t>(p) * C;
        T* o = feat + static_cast<int64_t>(p) * C;
#pragma GCC ivdep
        for (int c = 0; c < C; ++c) o[c] = o[c] + wgt * xi[c];
      }
    }
    sync();
  }
  sync();  // the team's scratch is reused by the next image
}

template <typename T>
void basic_stage_impl(const Tensor& x, const Tensor& weights, const Tensor& meta, Tensor& scratch, double eps,
                      int64_t threads, const Tensor& feat, const Tensor& ponder, const Tensor& nunits, const Tensor& dist,
                      const Tensor& counts) {
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
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < per_thread; ++b) {
      run_image(cx, own, pv, b, 0, 1, first, none);
      first = false;
    }
    // The rest: all threads on one image at a time, sharing thread 0's team scratch.
    Team<T> shared = team_at<T>(base, l);
    bool first_shared = true;
    const Sync bar{team > 1};
    for (int b = per_thread; b < B; ++b) {
      run_image(cx, shared, pv, b, tid, team, first_shared || first, bar);
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
                                                               double eps, int64_t threads) {
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
  const auto opt = x.options();
  const Tensor feat = at::empty({B, H, W, C}, opt);
  const Tensor ponder = sact ? at::empty({B, H, W}, opt) : at::empty({B}, opt);
  const Tensor nunits = sact ? at::empty({B, H, W}, opt.dtype(at::kLong)) : at::empty({B}, opt.dtype(at::kLong));
  const Tensor dist = sact ? at::empty({B, U, H, W}, opt) : at::empty({B, U}, opt);
  const Tensor counts = sact ? at::empty({2, U, B}, opt.dtype(at::kLong)) : at::empty({0}, opt.dtype(at::kLong));
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "basic_stage", [&] {
      basic_stage_impl<scalar_t>(x, weights, meta, scratch, eps, threads, feat, ponder, nunits, dist, counts);
    });
  }
  return {feat, ponder, nunits, dist, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sact_native, m) {
  m.def("basic_stage(Tensor x, Tensor weights, Tensor meta, Tensor(a!) scratch, float eps, int threads) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("basic_stage_scratch_bytes(Tensor meta, int height, int width, int threads, int elem_size) -> int");
}

TORCH_LIBRARY_IMPL(sact_native, CPU, m) {
  m.impl("basic_stage", &basic_stage);
  m.impl("basic_stage_scratch_bytes", &basic_stage_scratch_bytes);
}
