// Native CPU row kernels of the sact sparse engine (built by sact/native.py, wrapped by sact/sparse/native.py).
//
// The row layout is the one of sact/sparse/rows.py: a stage's features are the rows of a
// contiguous (N + 1, C) matrix X, row p = (b*H + y)*W + x, the last row (index N) all zeros;
// nbr (N, 9) holds the rows of the 3x3 neighbours (N outside the image).
//
// Each kernel fuses gather -> GEMM -> epilogue -> scatter per chunk of rows. With enough rows
// the chunks run in parallel (one thread per chunk, single-threaded GEMMs, everything of a
// chunk stays in cache); with few rows there is one chunk whose GEMMs use every thread and
// whose gathers and epilogues are split across threads. GEMMs are ATen's (MKL / oneDNN /
// OpenBLAS, whatever torch was built with); everything else is plain loops.
//
// These kernels must compute what the pure-PyTorch kernels of sact/sparse/unit_kernels.py and halting_kernels.py
// compute (tests/test_sparse_native.py compares them on random rows).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

using at::Tensor;

namespace {

void check_rows_buffer(const Tensor& X, const char* name) {
  TORCH_CHECK(X.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(X.dim() == 2 && X.is_contiguous(), name, " must be a contiguous (rows, channels) matrix");
}

void check_index(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.is_contiguous(), name,
              " must be a contiguous int64 CPU tensor");
}

// ---- matrix products: oneDNN where torch has it (about 2x MKL's sgemm on CPUs where MKL runs
// its AVX2 path, e.g. AMD; see sact/sparse/gemm.py), else at::mm.

const c10::OperatorHandle* onednn_linear_op() {
  static const c10::OperatorHandle* op = []() -> const c10::OperatorHandle* {
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return h ? new c10::OperatorHandle(*h) : nullptr;
  }();
  return op;
}

// Rows of a gathered operand are padded to a multiple of this, so that oneDNN sees few
// distinct shapes (it builds a kernel per shape and caches it).
constexpr int64_t kRowBucket = 32;

int64_t padded_rows(int64_t m, bool onednn) { return onednn ? (m + kRowBucket - 1) / kRowBucket * kRowBucket : m; }

// A (>= m rows) times a 1x1 convolution: oneDNN computes A @ wt^T + b (+ ReLU) for all of A's
// rows (bias fused); at::mm computes A[:m] @ mat (the caller adds the bias).
Tensor rows_product(const Tensor& A, int64_t m, const Tensor& mat, const Tensor& wt, const Tensor& b, bool relu,
                    bool onednn) {
  if (onednn) {
    std::vector<c10::IValue> stack;
    stack.reserve(6);
    stack.emplace_back(A);
    stack.emplace_back(wt);
    stack.emplace_back(b);
    stack.emplace_back(std::string(relu ? "relu" : "none"));
    stack.emplace_back(c10::List<std::optional<at::Scalar>>());
    stack.emplace_back(c10::IValue());
    onednn_linear_op()->callBoxed(&stack);
    return stack[0].toTensor();
  }
  return at::mm(A.narrow(0, 0, m), mat);
}

// Chunks of `total` rows: enough to give every thread work when there are at least
// `min_rows` rows per thread, else one chunk (whose GEMMs are multi-threaded).
std::vector<std::pair<int64_t, int64_t>> plan_chunks(int64_t total, int64_t chunk, int64_t min_rows) {
  std::vector<std::pair<int64_t, int64_t>> out;
  if (total <= 0) return out;
  const int64_t threads = at::get_num_threads();
  int64_t n = (total + chunk - 1) / chunk;
  if (threads > 1 && total >= threads * min_rows) {
    n = std::max(n, threads);
    n = ((n + threads - 1) / threads) * threads;  // a multiple of the thread count
  } else if (total < threads * min_rows) {
    n = 1;
  }
  const int64_t base = total / n, extra = total % n;
  int64_t s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = s + base + (i < extra ? 1 : 0);
    out.emplace_back(s, e);
    s = e;
  }
  return out;
}

// Runs f(begin, end) over chunks: in parallel (nested work inside runs serially) when there
// is more than one chunk, else directly (nested at::parallel_for then uses every thread).
template <typename F>
void for_each_chunk(const std::vector<std::pair<int64_t, int64_t>>& chunks, const F& f) {
  if (chunks.size() == 1) {
    f(chunks[0].first, chunks[0].second);
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(chunks[i].first, chunks[i].second);
  });
}

// Per-image channel sums accumulated locally and flushed under a lock when the image changes.
template <typename acc_t>
struct SumAccumulator {
  acc_t* S;
  int64_t C;
  std::mutex* lock;
  std::vector<acc_t> local;
  int64_t image = -1;
  SumAccumulator(acc_t* S_, int64_t C_, std::mutex* lock_) : S(S_), C(C_), lock(lock_), local(C_, acc_t(0)) {}
  acc_t* at_image(int64_t img) {
    if (img != image) {
      flush();
      image = img;
    }
    return local.data();
  }
  void flush() {
    if (image < 0) return;
    std::lock_guard<std::mutex> g(*lock);
    acc_t* dst = S + image * C;
    for (int64_t j = 0; j < C; ++j) {
      dst[j] += local[j];
      local[j] = acc_t(0);
    }
    image = -1;
  }
};

template <typename scalar_t>
void bottleneck_rows_impl(Tensor& X, Tensor& S, Tensor& t1, const Tensor& idx, const Tensor& dil,
                          const Tensor& nbr, const Tensor& m1, const Tensor& b1, const Tensor& m2,
                          const Tensor& b2, const Tensor& m3, const Tensor& b3, const Tensor& pre_scale,
                          const Tensor& pre_shift, bool final_relu, const Tensor& wt1, const Tensor& wt2,
                          const Tensor& wt3, int64_t hw, int64_t chunk, int64_t min_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = X.size(1), W = m1.size(1), N = nbr.size(0);
  const int64_t na = idx.numel(), nd = dil.numel();
  scalar_t* Xp = X.data_ptr<scalar_t>();
  scalar_t* Tp = t1.data_ptr<scalar_t>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* dp = dil.data_ptr<int64_t>();
  const int64_t* np = nbr.data_ptr<int64_t>();
  const scalar_t* b1p = b1.data_ptr<scalar_t>();
  const scalar_t* b2p = b2.data_ptr<scalar_t>();
  const scalar_t* b3p = b3.data_ptr<scalar_t>();
  // Pre-activation units (ResNet-v2): conv1 reads relu(pre_scale * x + pre_shift), the unit's
  // BN + ReLU, applied to the gathered rows (rounded like the pure kernel: x*s, then +t).
  const bool pre = pre_scale.numel() > 0;
  const scalar_t* psp = pre ? pre_scale.data_ptr<scalar_t>() : nullptr;
  const scalar_t* ptp = pre ? pre_shift.data_ptr<scalar_t>() : nullptr;
  acc_t* Sp = S.data_ptr<acc_t>();
  const auto opts = X.options();
  const bool all_dil = nd == N;
  // oneDNN products (bias and ReLU fused) when the caller passed the (out, in) weights
  const bool dnn = wt1.numel() > 0 && onednn_linear_op() != nullptr;

  // conv1 (1x1) + bias + ReLU at the dilated rows, into t1.
  for_each_chunk(plan_chunks(nd, chunk, min_rows), [&](int64_t s, int64_t e) {
    const int64_t m = e - s;
    Tensor A;
    if (all_dil && !pre) {
      A = X.narrow(0, s, m);  // rows s..e are contiguous
    } else {
      const int64_t mp = padded_rows(m, dnn);
      A = at::empty({mp, C}, opts);
      if (mp > m) A.narrow(0, m, mp - m).zero_();
      scalar_t* Ap = A.data_ptr<scalar_t>();
      at::parallel_for(0, m, 64, [&](int64_t b, int64_t f) {
        for (int64_t i = b; i < f; ++i) {
          const scalar_t* x = Xp + (all_dil ? s + i : dp[s + i]) * C;
          scalar_t* a = Ap + i * C;
          if (!pre) {
            std::memcpy(a, x, C * sizeof(scalar_t));
            continue;
          }
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t sx = static_cast<scalar_t>(static_cast<acc_t>(x[c]) * static_cast<acc_t>(psp[c]));
            const acc_t v = static_cast<acc_t>(sx) + static_cast<acc_t>(ptp[c]);
            a[c] = static_cast<scalar_t>(v > acc_t(0) ? v : acc_t(0));
          }
        }
      });
    }
    const Tensor R = rows_product(A, m, m1, wt1, b1, true, dnn);
    const scalar_t* Rp = R.data_ptr<scalar_t>();
    at::parallel_for(0, m, 64, [&](int64_t b, int64_t f) {
      for (int64_t i = b; i < f; ++i) {
        const scalar_t* r = Rp + i * W;
        scalar_t* dst = Tp + (all_dil ? s + i : dp[s + i]) * W;
        if (dnn) {  // bias and ReLU are in the product
          std::memcpy(dst, r, W * sizeof(scalar_t));
          continue;
        }
        for (int64_t j = 0; j < W; ++j) {
          const acc_t v = static_cast<acc_t>(r[j]) + static_cast<acc_t>(b1p[j]);
          dst[j] = static_cast<scalar_t>(v > acc_t(0) ? v : acc_t(0));
        }
      }
    });
  });

  // conv2 (3x3 on gathered neighbours) + ReLU -> conv3 (1x1) + residual + ReLU at the active rows.
  std::mutex lock;
  for_each_chunk(plan_chunks(na, chunk, min_rows), [&](int64_t s, int64_t e) {
    const int64_t m = e - s;
    const int64_t mp = padded_rows(m, dnn);
    Tensor G = at::empty({mp, 9 * W}, opts);
    if (mp > m) G.narrow(0, m, mp - m).zero_();
    scalar_t* Gp = G.data_ptr<scalar_t>();
    at::parallel_for(0, m, 32, [&](int64_t b, int64_t f) {
      for (int64_t i = b; i < f; ++i) {
        const int64_t* nb = np + ip[s + i] * 9;
        for (int64_t k = 0; k < 9; ++k) std::memcpy(Gp + (i * 9 + k) * W, Tp + nb[k] * W, W * sizeof(scalar_t));
      }
    });
    Tensor R = rows_product(G, m, m2, wt2, b2, true, dnn);
    if (!dnn) {
      scalar_t* Rp = R.data_ptr<scalar_t>();
      at::parallel_for(0, m * W, 4096, [&](int64_t b, int64_t f) {
        for (int64_t i = b; i < f; ++i) {
          const acc_t v = static_cast<acc_t>(Rp[i]) + static_cast<acc_t>(b2p[i % W]);
          Rp[i] = static_cast<scalar_t>(v > acc_t(0) ? v : acc_t(0));
        }
      });
    }
    const Tensor Y = rows_product(R, m, m3, wt3, b3, false, dnn);
    const scalar_t* Yp = Y.data_ptr<scalar_t>();
    at::parallel_for(0, m, 16, [&](int64_t b, int64_t f) {
      SumAccumulator<acc_t> sums(Sp, C, &lock);
      for (int64_t i = b; i < f; ++i) {
        const int64_t row = ip[s + i];
        acc_t* loc = sums.at_image(row / hw);
        scalar_t* x = Xp + row * C;
        const scalar_t* y = Yp + i * C;
        for (int64_t j = 0; j < C; ++j) {
          // (conv3 + bias) + residual, then ReLU (post-activation units only): the order of
          // the pure-PyTorch kernel.
          const scalar_t r = dnn ? y[j] : static_cast<scalar_t>(static_cast<acc_t>(y[j]) + static_cast<acc_t>(b3p[j]));
          acc_t v = static_cast<acc_t>(r) + static_cast<acc_t>(x[j]);
          if (final_relu) v = v > acc_t(0) ? v : acc_t(0);
          const scalar_t nv = static_cast<scalar_t>(v);
          loc[j] += static_cast<acc_t>(nv) - static_cast<acc_t>(x[j]);
          x[j] = nv;
        }
      }
      sums.flush();
    });
  });
}

// X (N+1, C) rows, updated in place at the rows idx; S (B, C) per-image channel sums kept up
// to date; t1 (N+1, W) scratch whose last row is zero (conv2's padding).
void bottleneck_rows(Tensor X, Tensor S, Tensor t1, Tensor idx, Tensor dil, Tensor nbr, Tensor m1, Tensor b1,
                     Tensor m2, Tensor b2, Tensor m3, Tensor b3, Tensor pre_scale, Tensor pre_shift, bool final_relu,
                     Tensor wt1, Tensor wt2, Tensor wt3, int64_t hw, int64_t chunk, int64_t min_rows) {
  check_rows_buffer(X, "X");
  check_rows_buffer(t1, "t1");
  check_index(idx, "idx");
  check_index(dil, "dil");
  check_index(nbr, "nbr");
  const int64_t C = X.size(1), W = m1.size(1), N = nbr.size(0);
  TORCH_CHECK(X.size(0) == N + 1 && t1.size(0) == N + 1 && t1.size(1) == W, "buffer shapes do not match nbr");
  TORCH_CHECK(nbr.dim() == 2 && nbr.size(1) == 9, "nbr must be (N, 9)");
  TORCH_CHECK(m1.size(0) == C && m2.size(0) == 9 * W && m2.size(1) == W && m3.size(0) == W && m3.size(1) == C,
              "weight matrices do not match the buffers");
  TORCH_CHECK(S.is_contiguous() && S.dim() == 2 && S.size(1) == C && S.size(0) * hw == N, "S must be (B, C)");
  TORCH_CHECK(S.scalar_type() == at::toOpMathType(X.scalar_type()), "S must have X's accumulation dtype");
  TORCH_CHECK(chunk > 0 && min_rows > 0, "chunk and min_rows must be positive");
  for (const Tensor* t : {&t1, &m1, &b1, &m2, &b2, &m3, &b3, &pre_scale, &pre_shift}) {
    TORCH_CHECK(t->scalar_type() == X.scalar_type() && t->is_contiguous() && t->device().is_cpu(),
                "weights and scratch must be contiguous CPU tensors of X's dtype");
  }
  TORCH_CHECK((pre_scale.numel() == 0 && pre_shift.numel() == 0) || (pre_scale.numel() == C && pre_shift.numel() == C),
              "pre_scale and pre_shift must both be empty or have C entries");
  const bool with_wt = wt1.numel() > 0;
  TORCH_CHECK(!with_wt || (wt1.sizes() == at::IntArrayRef({W, C}) && wt2.sizes() == at::IntArrayRef({W, 9 * W}) &&
                           wt3.sizes() == at::IntArrayRef({C, W})),
              "wt1, wt2, wt3 must be empty or the (out, in) weights");
  for (const Tensor* t : {&wt1, &wt2, &wt3}) {
    // a contiguous weight, or oneDNN's packed copy of it (an mkldnn tensor: torch.ops.mkldnn._reorder_linear_weight)
    TORCH_CHECK(t->numel() == 0 || (t->scalar_type() == X.scalar_type() && (t->is_mkldnn() || t->is_contiguous()) &&
                                    t->device().is_cpu()),
                "wt1, wt2, wt3 must be contiguous (or oneDNN-packed) CPU tensors of X's dtype");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, X.scalar_type(), "bottleneck_rows", [&] {
    bottleneck_rows_impl<scalar_t>(X, S, t1, idx, dil, nbr, m1, b1, m2, b2, m3, b3, pre_scale, pre_shift, final_relu,
                                   wt1, wt2, wt3, hw, chunk, min_rows);
  });
}

template <typename scalar_t>
Tensor halting_rows_impl(const Tensor& X, const Tensor& idx, const Tensor& dil, const Tensor& nbr, const Tensor& wz,
                         const Tensor& cz, const Tensor& scale, const Tensor& shift, double slope, bool identity,
                         const Tensor& glob, int64_t hw) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = at::toOpMathType(X.scalar_type());
  const int64_t C = X.size(1), N = nbr.size(0), na = idx.numel(), nd = dil.numel();
  const bool all_dil = nd == N;
  const scalar_t* Xp = X.data_ptr<scalar_t>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* dp = dil.data_ptr<int64_t>();
  const int64_t* np = nbr.data_ptr<int64_t>();
  const auto st = X.scalar_type();
  const bool dnn = (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf) && onednn_linear_op() != nullptr;
  // The dilated rows, after BN + activation unless those are folded into wz (identity).
  Tensor A;
  if (identity && all_dil) {
    A = X.narrow(0, 0, N);
  } else {
    const int64_t ndp = padded_rows(nd, dnn);
    A = at::empty({ndp, C}, X.options());
    if (ndp > nd) A.narrow(0, nd, ndp - nd).zero_();
    scalar_t* Ap = A.data_ptr<scalar_t>();
    const Tensor sc = identity ? Tensor() : scale.to(acc_type).contiguous();
    const Tensor tc = identity ? Tensor() : shift.to(acc_type).contiguous();
    const acc_t* sp = identity ? nullptr : sc.data_ptr<acc_t>();
    const acc_t* tp = identity ? nullptr : tc.data_ptr<acc_t>();
    const acc_t sl = static_cast<acc_t>(slope);
    at::parallel_for(0, nd, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* x = Xp + dp[i] * C;
        scalar_t* a = Ap + i * C;
        if (identity) {
          std::memcpy(a, x, C * sizeof(scalar_t));
          continue;
        }
        for (int64_t c = 0; c < C; ++c) {
          // act(bn(x)) rounded to the row dtype, as the pure-PyTorch kernel computes it
          const scalar_t p = static_cast<scalar_t>(sp[c] * static_cast<acc_t>(x[c]) + tp[c]);
          const acc_t v = static_cast<acc_t>(p);
          a[c] = static_cast<scalar_t>(v > acc_t(0) ? v : v * sl);
        }
      }
    });
  }
  // Z (nd, 9): the nine per-tap projections of the dilated rows (one GEMM).
  // (oneDNN adds cz as the product's bias; at::mm's result gets it below)
  const Tensor Zm = dnn ? rows_product(A, nd, Tensor(), wz.to(st).t().contiguous(), cz.to(st).contiguous(), false, true)
                        : at::mm(A, wz.to(st).contiguous());
  const scalar_t* Zmp = Zm.data_ptr<scalar_t>();
  const Tensor czc = dnn ? at::zeros({9}, X.options().dtype(acc_type)) : cz.to(acc_type).contiguous();
  const acc_t* czp = czc.data_ptr<acc_t>();
  // Scatter into a row-indexed table whose pad row (N) is zero: Z[row, k] (rounded like the pure kernel).
  std::vector<scalar_t> Z((N + 1) * 9);
  for (int k = 0; k < 9; ++k) Z[N * 9 + k] = scalar_t(0);
  at::parallel_for(0, nd, 512, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      scalar_t* z = Z.data() + (all_dil ? i : dp[i]) * 9;
      for (int k = 0; k < 9; ++k) z[k] = static_cast<scalar_t>(static_cast<acc_t>(Zmp[i * 9 + k]) + czp[k]);
    }
  });
  // h = sigmoid(sum_k Z[nbr[p, k], k] + glob[image]) at the active rows.
  Tensor h = at::empty({na}, X.options());
  scalar_t* hp = h.data_ptr<scalar_t>();
  const Tensor gc = glob.to(acc_type).contiguous();
  const acc_t* gp = gc.data_ptr<acc_t>();
  const scalar_t* Zp = Z.data();
  at::parallel_for(0, na, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t row = ip[i];
      const int64_t* nb = np + row * 9;
      acc_t local = 0;
      for (int k = 0; k < 9; ++k) local += static_cast<acc_t>(Zp[nb[k] * 9 + k]);
      const acc_t logit = local + gp[row / hw];
      hp[i] = static_cast<scalar_t>(acc_t(1) / (acc_t(1) + std::exp(-logit)));
    }
  });
  return h;
}

// Halting probabilities of a SACT branch at the rows idx: the 3x3 local term from the
// dilated rows (activation act(scale*x + shift) unless identity, whose BN is folded into
// wz (C, 9) and cz (9)), plus glob (B) = the global term and the local conv's bias.
Tensor halting_rows(Tensor X, Tensor idx, Tensor dil, Tensor nbr, Tensor wz, Tensor cz, Tensor scale, Tensor shift,
                    double slope, bool identity, Tensor glob, int64_t hw) {
  check_rows_buffer(X, "X");
  check_index(idx, "idx");
  check_index(dil, "dil");
  check_index(nbr, "nbr");
  const int64_t C = X.size(1), N = nbr.size(0);
  TORCH_CHECK(X.size(0) == N + 1, "X must have N + 1 rows");
  TORCH_CHECK(wz.dim() == 2 && wz.size(0) == C && wz.size(1) == 9 && cz.numel() == 9, "wz must be (C, 9), cz (9,)");
  TORCH_CHECK(identity || (scale.numel() == C && shift.numel() == C), "scale and shift must have C entries");
  TORCH_CHECK(hw > 0 && N % hw == 0 && glob.numel() == N / hw, "glob must have one entry per image");
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, X.scalar_type(), "halting_rows", [&] {
    out = halting_rows_impl<scalar_t>(X, idx, dil, nbr, wz, cz, scale, shift, slope, identity, glob, hw);
  });
  return out;
}

// Sorted rows whose 3x3 neighbourhood contains a row of idx (the dilated set).
Tensor dilate_rows(Tensor idx, Tensor nbr) {
  check_index(idx, "idx");
  check_index(nbr, "nbr");
  const int64_t N = nbr.size(0), na = idx.numel();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* np = nbr.data_ptr<int64_t>();
  std::vector<uint8_t> mark(N + 1, 0);
  for (int64_t i = 0; i < na; ++i) {
    const int64_t row = ip[i];
    TORCH_CHECK(row >= 0 && row < N, "row index out of range");
    const int64_t* nb = np + row * 9;
    for (int k = 0; k < 9; ++k) mark[nb[k]] = 1;  // 3x3 is symmetric: neighbours of p see p
  }
  int64_t count = 0;
  for (int64_t r = 0; r < N; ++r) count += mark[r];
  Tensor out = at::empty({count}, idx.options());
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0, j = 0; r < N; ++r)
    if (mark[r]) op[j++] = r;
  return out;
}

// out[idx[i]] += w[i] * X[idx[i]] (rows), the stage output accumulation.
void accumulate_rows(Tensor out, Tensor X, Tensor idx, Tensor w) {
  check_rows_buffer(X, "X");
  check_rows_buffer(out, "out");
  check_index(idx, "idx");
  TORCH_CHECK(out.size(1) == X.size(1) && out.size(0) <= X.size(0), "out must be (N, C)");
  TORCH_CHECK(w.numel() == idx.numel() && w.scalar_type() == X.scalar_type() && w.is_contiguous(),
              "w must have one entry per row, X's dtype");
  TORCH_CHECK(out.scalar_type() == X.scalar_type(), "out must have X's dtype");
  const int64_t C = X.size(1), na = idx.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, X.scalar_type(), "accumulate_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* xp = X.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    at::parallel_for(0, na, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t row = ip[i];
        const acc_t wi = static_cast<acc_t>(wp[i]);
        scalar_t* o = op + row * C;
        const scalar_t* x = xp + row * C;
        for (int64_t j = 0; j < C; ++j)
          o[j] = static_cast<scalar_t>(static_cast<acc_t>(o[j]) + static_cast<acc_t>(static_cast<scalar_t>(wi * static_cast<acc_t>(x[j]))));
      }
    });
  });
}

template <typename scalar_t, typename state_t>
Tensor halting_step_rows_impl(Tensor& cumsum, Tensor& remainder, Tensor& ponder, Tensor& num_units, Tensor& finished,
                              Tensor& dist, Tensor& O, const Tensor& X, const Tensor& idx, bool everything,
                              const Tensor& p, double eps, bool first) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = X.size(1);
  const int64_t na = everything ? cumsum.numel() : idx.numel();
  const int64_t* ip = everything ? nullptr : idx.data_ptr<int64_t>();
  state_t* cs = cumsum.data_ptr<state_t>();
  state_t* rem = remainder.data_ptr<state_t>();
  state_t* pc = ponder.data_ptr<state_t>();
  int64_t* nu = num_units.data_ptr<int64_t>();
  bool* fin = finished.data_ptr<bool>();
  state_t* dp = dist.data_ptr<state_t>();
  scalar_t* op = O.data_ptr<scalar_t>();
  const scalar_t* xp = X.data_ptr<scalar_t>();
  const bool last = p.numel() == 0;  // the last unit always halts: h = 1
  const Tensor pc_ = last ? p : p.to(cumsum.scalar_type()).contiguous();
  const state_t* hp = last ? nullptr : pc_.data_ptr<state_t>();
  // The threshold as halting_step compares it: `cumsum >= 1.0 - eps` in the state's dtype.
  const state_t thr = static_cast<state_t>(1.0 - eps);
  std::vector<uint8_t> keep(na);
  at::parallel_for(0, na, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t r = everything ? i : ip[i];
      // halting_step on a running position (finished is false here):
      const state_t h = last ? state_t(1) : hp[i];
      const state_t c = cs[r] + h;
      const bool cur = c >= thr;
      const state_t hz = cur ? state_t(0) : h;  // h is zeroed where the position halts
      const state_t w = cur ? rem[r] : hz;     // just halted: the remainder
      pc[r] = pc[r] + (cur ? rem[r] : state_t(1));
      rem[r] = rem[r] - hz;
      nu[r] += 1;
      fin[r] = cur;
      cs[r] = c;
      dp[r] = w;
      keep[i] = !cur;
      // the stage output: O[r] (+)= w * X[r], rounded like the accumulation kernels
      const acc_t ws = static_cast<acc_t>(static_cast<scalar_t>(w));
      scalar_t* o = op + r * C;
      const scalar_t* x = xp + r * C;
      if (first) {
        for (int64_t j = 0; j < C; ++j) o[j] = static_cast<scalar_t>(ws * static_cast<acc_t>(x[j]));
      } else {
        for (int64_t j = 0; j < C; ++j)
          o[j] = static_cast<scalar_t>(static_cast<acc_t>(o[j]) +
                                       static_cast<acc_t>(static_cast<scalar_t>(ws * static_cast<acc_t>(x[j]))));
      }
    }
  });
  int64_t count = 0;
  for (int64_t i = 0; i < na; ++i) count += keep[i];
  Tensor next = at::empty({count}, cumsum.options().dtype(at::kLong));
  int64_t* np = next.data_ptr<int64_t>();
  for (int64_t i = 0, j = 0; i < na; ++i)
    if (keep[i]) np[j++] = everything ? i : ip[i];
  return next;
}

// One step of the halting recurrence (sact.act.halting_step) at the running rows idx (all
// rows if `everything`), in place on the full state (cumsum, remainder, ponder, num_units,
// finished: [N]), writing the halting distribution's row `dist` [N] and accumulating the
// stage output O [N, C] += w * X (O = w * X when `first`). p: the rows' halting
// probabilities, empty for the last unit (h = 1). Returns the rows still running, sorted.
Tensor halting_step_rows(Tensor cumsum, Tensor remainder, Tensor ponder, Tensor num_units, Tensor finished,
                         Tensor dist, Tensor O, Tensor X, Tensor idx, bool everything, Tensor p, double eps,
                         bool first) {
  check_rows_buffer(X, "X");
  check_rows_buffer(O, "O");
  const int64_t N = cumsum.numel();
  TORCH_CHECK(O.size(0) == N && O.size(1) == X.size(1) && X.size(0) >= N && O.scalar_type() == X.scalar_type(),
              "O must be (N, C) of X's dtype");
  for (const Tensor* t : {&cumsum, &remainder, &ponder, &dist}) {
    TORCH_CHECK(t->is_contiguous() && t->numel() == N && t->scalar_type() == cumsum.scalar_type() &&
                    t->device().is_cpu(),
                "state tensors must be contiguous CPU tensors of one dtype with N entries");
  }
  TORCH_CHECK(cumsum.scalar_type() == at::kFloat || cumsum.scalar_type() == at::kDouble, "state must be float32/64");
  TORCH_CHECK(num_units.is_contiguous() && num_units.numel() == N && num_units.scalar_type() == at::kLong,
              "num_units must be int64 with N entries");
  TORCH_CHECK(finished.is_contiguous() && finished.numel() == N && finished.scalar_type() == at::kBool,
              "finished must be bool with N entries");
  if (!everything) {
    check_index(idx, "idx");
    const int64_t* ip = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < idx.numel(); ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "row index out of range");
  }
  const int64_t na = everything ? N : idx.numel();
  TORCH_CHECK(p.numel() == 0 || (p.numel() == na && p.device().is_cpu()), "p must have one entry per running row");
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, X.scalar_type(), "halting_step_rows", [&] {
    if (cumsum.scalar_type() == at::kDouble) {
      out = halting_step_rows_impl<scalar_t, double>(cumsum, remainder, ponder, num_units, finished, dist, O, X, idx,
                                                     everything, p, eps, first);
    } else {
      out = halting_step_rows_impl<scalar_t, float>(cumsum, remainder, ponder, num_units, finished, dist, O, X, idx,
                                                    everything, p, eps, first);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(sact_native, m) {
  m.def("bottleneck_rows(Tensor(a!) X, Tensor(b!) S, Tensor(c!) t1, Tensor idx, Tensor dil, Tensor nbr, Tensor m1, "
        "Tensor b1, Tensor m2, Tensor b2, Tensor m3, Tensor b3, Tensor pre_scale, Tensor pre_shift, bool final_relu, "
        "Tensor wt1, Tensor wt2, Tensor wt3, int hw, int chunk, int min_rows) -> ()");
  m.def("halting_rows(Tensor X, Tensor idx, Tensor dil, Tensor nbr, Tensor wz, Tensor cz, Tensor scale, "
        "Tensor shift, float slope, bool identity, Tensor glob, int hw) -> Tensor");
  m.def("dilate_rows(Tensor idx, Tensor nbr) -> Tensor");
  m.def("accumulate_rows(Tensor(a!) out, Tensor X, Tensor idx, Tensor w) -> ()");
  m.def("halting_step_rows(Tensor(a!) cumsum, Tensor(b!) remainder, Tensor(c!) ponder, Tensor(d!) num_units, "
        "Tensor(e!) finished, Tensor(f!) dist, Tensor(g!) O, Tensor X, Tensor idx, bool everything, Tensor p, "
        "float eps, bool first) -> Tensor");
}

TORCH_LIBRARY_IMPL(sact_native, CPU, m) {
  m.impl("bottleneck_rows", &bottleneck_rows);
  m.impl("halting_rows", &halting_rows);
  m.impl("dilate_rows", &dilate_rows);
  m.impl("accumulate_rows", &accumulate_rows);
  m.impl("halting_step_rows", &halting_step_rows);
}

// The products' weights may be oneDNN-packed (mkldnn tensors, sact/sparse/dnn.py), which makes the
// dispatcher pick the MkldnnCPU key: the same CPU kernel serves it.
TORCH_LIBRARY_IMPL(sact_native, MkldnnCPU, m) { m.impl("bottleneck_rows", &bottleneck_rows); }
