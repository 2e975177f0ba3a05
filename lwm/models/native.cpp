// lwm's native CPU kernels: imagination's per-token steps as one pass over each row.
//
// Imagination steps a few dozen to a few hundred rows at a time. There, eager PyTorch spends
// more on each op's fixed cost (about 3 us of ATen dispatch and allocation, plus the Python
// call) than on its arithmetic, and a Mamba-2 branch step is some 35 ops a layer. Here the
// matmuls stay ATen's (oneDNN / MKL) and everything between them is one loop over the rows.
// Each function has a pure-PyTorch twin it is tested against (see lwm/models/native.py).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

// exp(x) by range reduction and a degree-6 polynomial (a few ulp), written branch-free so that
// loops over it vectorize; std::exp does not, and per element it cost more than the rest of a
// step. Arguments beyond float's range are clamped (exp(-87.3) ~ 1e-38 stands in for 0).
inline float exp_fast(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float k = (x * 1.44269504f + shift) - shift;  // round(x / ln 2)
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;  // x - k ln 2, in two parts
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float silu(float v) { return v / (1.0f + exp_fast(-v)); }

// torch's softplus with beta 1 and threshold 20
inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }

// sum of a[i] * b[i] with eight partial sums, which vectorize (a single running sum does not)
inline float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) part[k] += a[i + k] * b[i + k];
  float total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// index of the first maximum of v[0..n), as torch's max(-1).indices
inline int64_t first_max(const float* v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
}

}  // namespace

// x * rsqrt(mean(x^2) + eps) * weight over each row of x (M, d): torch's RMSNorm
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(x, "x", 2);
  check(weight, "an RMSNorm weight", 1);
  const int64_t M = x.size(0), d = x.size(1);
  TORCH_CHECK(weight.size(0) == d, "the RMSNorm weight must have ", d, " entries");
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float epsf = static_cast<float>(eps);
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = xp + m * d;
      const float scale = 1.0f / std::sqrt(dot(row, row, d) / static_cast<float>(d) + epsf);
      for (int64_t i = 0; i < d; ++i) op[m * d + i] = row[i] * scale * wp[i];
    }
  });
  return out;
}

// One token on every branch of one Mamba-2 layer (`Mamba2.step_branches`, the SSD dual form of
// `Mamba2Branches`): u (M, D) the normed input -> (M, D) the block's output. Updates conv's ring
// slot `slot` (t % (K-1), the oldest input's) and writes the token at path[:, s] in place.
//
// The block's weights as `Mamba2` holds them: in_w (2E + 2N + H, D), conv_w (C, 1, K) with
// C = E + 2N, conv_b (C,), dt_bias, A_log, D (H,), norm_w (E,) the gated RMSNorm's, out_w (D, E),
// and eps the gated RMSNorm's.
// The state: conv (M, K-1, C) the ring buffer; path (M, S > s, F), F = E + N + 2H, each path
// token's x, B, dt and L; root (R, H, P, N) the shared SSM states and origin (M,) each row's.
at::Tensor mamba2_branch_step(
    const at::Tensor& u, const at::Tensor& in_w, const at::Tensor& conv_w,
    const at::Tensor& conv_b, const at::Tensor& dt_bias, const at::Tensor& A_log,
    const at::Tensor& D, const at::Tensor& norm_w, const at::Tensor& out_w, double eps,
    at::Tensor conv, at::Tensor path, const at::Tensor& root, const at::Tensor& origin,
    int64_t s, int64_t slot) {
  check(conv, "conv", 3);
  check(conv_w, "conv_w", 3);
  check(path, "path", 3);
  check(root, "root", 4);
  for (auto* t : {&conv_b, &dt_bias, &A_log, &D, &norm_w}) check(*t, "a vector weight", 1);
  TORCH_CHECK(origin.scalar_type() == at::kLong && origin.is_contiguous() && origin.dim() == 1,
              "origin must be a contiguous int64 vector");
  const int64_t M = u.size(0);
  const int64_t H = root.size(1), P = root.size(2), N = root.size(3), R = root.size(0);
  const int64_t E = H * P, C = E + 2 * N, K1 = conv.size(1), S = path.size(1);
  const int64_t F = E + N + 2 * H, K = K1 + 1;
  TORCH_CHECK(conv.size(0) == M && conv.size(2) == C, "conv must be (M, K-1, C)");
  TORCH_CHECK(path.size(0) == M && path.size(2) == F, "path must be (M, S, E + N + 2H)");
  TORCH_CHECK(s >= 0 && s < S, "path has no room for token ", s);
  TORCH_CHECK(slot >= 0 && slot < K1, "slot out of range");
  TORCH_CHECK(conv_w.size(0) == C && conv_w.size(1) == 1 && conv_w.size(2) == K,
              "conv_w must be (C, 1, K)");
  TORCH_CHECK(A_log.size(0) == H && dt_bias.size(0) == H && D.size(0) == H, "H mismatch");
  TORCH_CHECK(origin.size(0) == M, "origin must have one entry a row");

  // what the weights give this token: A = -exp(A_log); each ring slot's tap, given that the
  // oldest input sits at `slot` (ring slot j holds the input K-1-k steps back, tap k, where
  // k = (j - slot) % (K-1)); the newest input's tap
  std::vector<float> A(H), taps(K1 * C), newest(C);
  const float* cwp = conv_w.data_ptr<float>();
  for (int64_t h = 0; h < H; ++h) A[h] = -std::exp(A_log.data_ptr<float>()[h]);
  for (int64_t j = 0; j < K1; ++j) {
    const int64_t k = ((j - slot) % K1 + K1) % K1;
    for (int64_t c = 0; c < C; ++c) taps[j * C + c] = cwp[c * K + k];
  }
  for (int64_t c = 0; c < C; ++c) newest[c] = cwp[c * K + K - 1];

  at::Tensor zx = at::linear(u, in_w).contiguous();  // (M, 2E + 2N + H): z, xBC, dt_raw
  const int64_t Z = zx.size(1);
  TORCH_CHECK(Z == E + C + H, "in_proj must emit 2E + 2N + H features");
  at::Tensor g = at::empty({M, E}, u.options());

  const float* zxp = zx.data_ptr<float>();
  float* convp = conv.data_ptr<float>();
  const float* tapp = taps.data();
  const float* newp = newest.data();
  const float* cbp = conv_b.data_ptr<float>();
  float* pathp = path.data_ptr<float>();
  const float* dtbp = dt_bias.data_ptr<float>();
  const float* Ap = A.data();
  const float* Dp = D.data_ptr<float>();
  const int64_t* orp = origin.data_ptr<int64_t>();
  const float* nwp = norm_w.data_ptr<float>();
  float* gp = g.data_ptr<float>();
  const float epsf = static_cast<float>(eps);

  // the root states N-major, (R, N, E), so that h_root C_s is a sum of N contiguous rows
  at::Tensor rootT = root.permute({0, 3, 1, 2}).contiguous();
  const float* rootp = rootT.data_ptr<float>();

  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> xb(C), y(E), read(E), dt(H), L(H), w(H);
    for (int64_t m = begin; m < end; ++m) {
      const float* z = zxp + m * Z;
      const float* xraw = z + E;
      const float* dtraw = z + E + C;
      float* ring = convp + m * K1 * C;
      // causal conv: the ring's K-1 inputs and the new one, then SiLU
      for (int64_t c = 0; c < C; ++c) xb[c] = ring[c] * tapp[c];
      for (int64_t k = 1; k < K1; ++k)
        for (int64_t c = 0; c < C; ++c) xb[c] += ring[k * C + c] * tapp[k * C + c];
      for (int64_t c = 0; c < C; ++c) xb[c] = silu(xb[c] + xraw[c] * newp[c] + cbp[c]);
      std::copy(xraw, xraw + C, ring + slot * C);  // the newest input replaces the oldest
      float* own = pathp + m * S * F;
      float* token = own + s * F;
      for (int64_t h = 0; h < H; ++h) {
        dt[h] = softplus(dtraw[h] + dtbp[h]);
        L[h] = dt[h] * Ap[h] + (s > 0 ? own[(s - 1) * F + E + N + H + h] : 0.0f);
      }
      std::copy(xb.data(), xb.data() + E + N, token);
      std::copy(dt.begin(), dt.end(), token + E + N);
      std::copy(L.begin(), L.end(), token + E + N + H);
      // y_s = sum_j exp(L_s - L_j) dt_j (C_s . B_j) x_j (+ D x_s) + exp(L_s) h_root C_s
      const float* Cs = xb.data() + E + N;
      std::fill(y.begin(), y.end(), 0.0f);
      for (int64_t j = 0; j <= s; ++j) {
        const float* pj = own + j * F;
        const float cb = dot(pj + E, Cs, N);
        for (int64_t h = 0; h < H; ++h) w[h] = exp_fast(L[h] - pj[E + N + H + h]);
        for (int64_t h = 0; h < H; ++h) w[h] *= pj[E + N + h] * cb;
        if (j == s)
          for (int64_t h = 0; h < H; ++h) w[h] += Dp[h];
        for (int64_t h = 0; h < H; ++h) {
          const float* xj = pj + h * P;
          float* yh = y.data() + h * P;
          for (int64_t p = 0; p < P; ++p) yh[p] += w[h] * xj[p];
        }
      }
      const int64_t r = orp[m];
      TORCH_CHECK(r >= 0 && r < R, "origin out of range");
      const float* state = rootp + r * N * E;
      std::fill(read.begin(), read.end(), 0.0f);
      for (int64_t n = 0; n < N; ++n) {
        const float* row = state + n * E;
        const float cn = Cs[n];
        for (int64_t i = 0; i < E; ++i) read[i] += row[i] * cn;
      }
      for (int64_t h = 0; h < H; ++h) w[h] = exp_fast(L[h]);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t p = 0; p < P; ++p) y[h * P + p] += w[h] * read[h * P + p];
      // gated RMSNorm: weight * rmsnorm(y * silu(z))
      for (int64_t i = 0; i < E; ++i) y[i] *= silu(z[i]);
      const float squares = dot(y.data(), y.data(), E);
      const float scale = 1.0f / std::sqrt(squares / static_cast<float>(E) + epsf);
      float* out = gp + m * E;
      for (int64_t i = 0; i < E; ++i) out[i] = y[i] * scale * nwp[i];
    }
  });
  return at::linear(g, out_w);
}

// `Mamba2Backbone.step_branches`: one token x (M, d) through the pre-norm residual stack,
// x += block(rmsnorm(x)) a layer, then the final RMSNorm -> (M, d). params: per layer the
// pre-norm's weight, then `mamba2_branch_step`'s weights from in_w to out_w; then the final
// norm's weight. convs, paths, roots, origins, tokens: each layer's state (see there).
at::Tensor mamba2_branch_stack(
    const at::Tensor& x, const std::vector<at::Tensor>& params, double norm_eps,
    double gated_eps, const std::vector<at::Tensor>& convs, const std::vector<at::Tensor>& paths,
    const std::vector<at::Tensor>& roots, const std::vector<at::Tensor>& origins,
    const std::vector<int64_t>& tokens, int64_t slot) {
  const size_t layers = convs.size();
  TORCH_CHECK(params.size() == 9 * layers + 1, "params: 9 a layer and the final norm's");
  TORCH_CHECK(paths.size() == layers && roots.size() == layers && origins.size() == layers &&
              tokens.size() == layers, "one state a layer");
  at::Tensor h = x.contiguous();
  for (size_t l = 0; l < layers; ++l) {
    const at::Tensor* p = params.data() + 9 * l;
    at::Tensor y = mamba2_branch_step(rms_norm(h, p[0], norm_eps), p[1], p[2], p[3], p[4], p[5],
                                      p[6], p[7], p[8], gated_eps, convs[l], paths[l], roots[l],
                                      origins[l], tokens[l], slot);
    h = h + y;
  }
  return rms_norm(h, params.back(), norm_eps);
}

// `WorldModel.predict_latent`: h (M, W) and action (M,) -> z (M, latent): the latent of the most
// likely next observation. In ATen: the decoder MLP. Per row in one pass: the decoder's input
// (h's first d entries + the action's embedding), the gated copies of the copy decoders, each
// cell's argmax of type, colour and state packed into an id, the argmax of direction and of
// the carried type and colour, the sum of their 52 rows of `bag`, SiLU and the LayerNorm, and
// the parts that follow z in a latent.
//
// classes: (types, colours, states, directions). dec_w1, dec_b1, dec_w2, dec_b2: the decoder
// MLP, whose output is cells (V * (types + colours + states)), direction, carried type and
// colour, then with copies a gate per source and cell (2V). With copies (`sources` defined):
// sources (A, 2V) each action's source column in h's ids from `id_offset` (one past them: no
// source), read (ids + 1, cell logits) each id's read. bag (V * ids + directions + types +
// colours, d). With `cell_table` defined (h carries cells): cell_table (ids, e) and
// carried_table (types * colours, e).
at::Tensor predict_latent(
    const at::Tensor& h, const at::Tensor& action, const at::Tensor& action_emb,
    const at::Tensor& dec_w1, const at::Tensor& dec_b1, const at::Tensor& dec_w2,
    const at::Tensor& dec_b2, std::vector<int64_t> classes,
    const std::optional<at::Tensor>& sources_, int64_t id_offset,
    const std::optional<at::Tensor>& read_, const at::Tensor& bag, const at::Tensor& ln_w,
    const at::Tensor& ln_b, double ln_eps, const std::optional<at::Tensor>& cell_table_,
    const std::optional<at::Tensor>& carried_table_) {
  const at::Tensor sources = sources_.value_or(at::Tensor()), read = read_.value_or(at::Tensor());
  const at::Tensor cell_table = cell_table_.value_or(at::Tensor());
  const at::Tensor carried_table = carried_table_.value_or(at::Tensor());
  check(h, "h", 2);
  check(action_emb, "action_emb", 2);
  check(bag, "bag", 2);
  TORCH_CHECK(action.scalar_type() == at::kLong && action.is_contiguous() && action.dim() == 1,
              "action must be a contiguous int64 vector");
  TORCH_CHECK(classes.size() == 4, "classes: (types, colours, states, directions)");
  const int64_t M = h.size(0), W = h.size(1), d = action_emb.size(1), A = action_emb.size(0);
  const int64_t NT = classes[0], NC = classes[1], NS = classes[2], ND = classes[3];
  const int64_t CL = NT + NC + NS, IDS = NT * NC * NS;
  const int64_t rows = bag.size(0);
  TORCH_CHECK((rows - ND - NT - NC) % IDS == 0, "bag must have V * ids + directions + types + "
              "colours rows");
  const int64_t V = (rows - ND - NT - NC) / IDS;
  const bool copies = sources.defined(), carries = cell_table.defined();
  TORCH_CHECK(bag.size(1) == d && W >= d && action.size(0) == M, "h, action and bag disagree");
  int64_t n_ids = 0;
  if (copies) {
    TORCH_CHECK(sources.scalar_type() == at::kLong && sources.is_contiguous() &&
                sources.size(0) == A && sources.size(1) == 2 * V, "sources must be (A, 2V)");
    check(read, "read", 2);
    TORCH_CHECK(read.size(0) == IDS + 1 && read.size(1) == CL, "read must be (ids + 1, CL)");
    n_ids = W - id_offset;
    TORCH_CHECK(n_ids > 0 && id_offset >= d, "h has no ids past id_offset");
  }
  int64_t e = 0;
  if (carries) {
    check(cell_table, "cell_table", 2);
    check(carried_table, "carried_table", 2);
    e = cell_table.size(1);
  }
  const int64_t width = d + (carries ? V * e + e : 0) + (copies ? V : 0);

  // the decoder's input: h's first d entries + the action's embedding
  at::Tensor core = at::empty({M, d}, h.options());
  const float* hp = h.data_ptr<float>();
  const int64_t* ap = action.data_ptr<int64_t>();
  const float* aep = action_emb.data_ptr<float>();
  float* corep = core.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(ap[m] >= 0 && ap[m] < A, "action ", ap[m], " out of range");
    const float* row = hp + m * W;
    const float* emb = aep + ap[m] * d;
    for (int64_t i = 0; i < d; ++i) corep[m * d + i] = row[i] + emb[i];
  }
  at::Tensor hidden = at::linear(core, dec_w1, dec_b1);
  at::silu_(hidden);
  at::Tensor out = at::linear(hidden, dec_w2, dec_b2).contiguous();
  const int64_t O = out.size(1);
  TORCH_CHECK(O == V * CL + ND + NT + NC + (copies ? 2 * V : 0), "the decoder's width (", O,
              ") does not match the classes and copies");

  at::Tensor z = at::empty({M, width}, h.options());
  const float* op = out.data_ptr<float>();
  const int64_t* srcp = copies ? sources.data_ptr<int64_t>() : nullptr;
  const float* readp = copies ? read.data_ptr<float>() : nullptr;
  const float* bagp = bag.data_ptr<float>();
  const float* lwp = ln_w.data_ptr<float>();
  const float* lbp = ln_b.data_ptr<float>();
  const float* ctp = carries ? cell_table.data_ptr<float>() : nullptr;
  const float* carp = carries ? carried_table.data_ptr<float>() : nullptr;
  float* zp = z.data_ptr<float>();
  const float eps = static_cast<float>(ln_eps);

  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> cell(CL), acc(d), ones(d, 1.0f);
    std::vector<int64_t> ids(V);
    for (int64_t m = begin; m < end; ++m) {
      const float* o = op + m * O;
      const float* gates = o + V * CL + ND + NT + NC;
      for (int64_t c = 0; c < V; ++c) {
        const float* logits = o + c * CL;
        if (copies) {  // + sigmoid(gate) * read of each of the cell's two sources
          float w[2];
          int64_t id[2];
          for (int k = 0; k < 2; ++k) {
            const int64_t col = srcp[ap[m] * 2 * V + k * V + c];
            id[k] = col == n_ids ? IDS : static_cast<int64_t>(hp[m * W + id_offset + col]);
            TORCH_CHECK(id[k] >= 0 && id[k] <= IDS, "cell id ", id[k], " out of range");
            w[k] = 1.0f / (1.0f + exp_fast(-gates[k * V + c]));
          }
          const float* r0 = readp + id[0] * CL;
          const float* r1 = readp + id[1] * CL;
          for (int64_t j = 0; j < CL; ++j) cell[j] = logits[j] + (w[0] * r0[j] + w[1] * r1[j]);
          logits = cell.data();
        }
        ids[c] = (first_max(logits, NT) * NC + first_max(logits + NT, NC)) * NS +
                 first_max(logits + NT + NC, NS);
      }
      const float* rest = o + V * CL;
      const int64_t dir = first_max(rest, ND);
      const int64_t ctype = first_max(rest + ND, NT);
      const int64_t ccolor = first_max(rest + ND + NT, NC);
      // the bag: each cell's row at its position, then direction, carried type and colour
      std::copy(bagp + ids[0] * d, bagp + ids[0] * d + d, acc.begin());
      for (int64_t c = 1; c < V; ++c) {
        const float* row = bagp + (c * IDS + ids[c]) * d;
        for (int64_t i = 0; i < d; ++i) acc[i] += row[i];
      }
      for (const int64_t r : {V * IDS + dir, V * IDS + ND + ctype, V * IDS + ND + NT + ccolor}) {
        const float* row = bagp + r * d;
        for (int64_t i = 0; i < d; ++i) acc[i] += row[i];
      }
      for (int64_t i = 0; i < d; ++i) acc[i] = silu(acc[i]);
      const float mean = dot(acc.data(), ones.data(), d) / static_cast<float>(d);
      for (int64_t i = 0; i < d; ++i) acc[i] -= mean;
      const float var = dot(acc.data(), acc.data(), d) / static_cast<float>(d);
      const float inv = 1.0f / std::sqrt(var + eps);
      float* zr = zp + m * width;
      for (int64_t i = 0; i < d; ++i) zr[i] = acc[i] * inv * lwp[i] + lbp[i];
      float* next = zr + d;
      if (carries) {
        for (int64_t c = 0; c < V; ++c, next += e) std::copy(ctp + ids[c] * e, ctp + ids[c] * e + e, next);
        const float* carried = carp + (ctype * NC + ccolor) * e;
        std::copy(carried, carried + e, next);
        next += e;
      }
      if (copies)
        for (int64_t c = 0; c < V; ++c) next[c] = static_cast<float>(ids[c]);
    }
  });
  return z;
}

// `WorldModel._remember`, the map decoder's map step: grid (M, S) int64 the maps, front_open
// (M,) bool, prev_action (M,) int64 and z (M, W) the new views' latents, whose packed cell ids
// (V of them) start at column `id_offset` -> (the moved maps with the new view written, their
// front_open). moves (A + 1, 2, S): for each previous action and whether it moved the agent,
// the old cell each new cell shows (S: none); view (V,): where the view's cells lie in the map;
// enterable (ids,) bool; forward: the forward action; agent, front: the view cells of the agent
// and of the cell in front of it.
std::vector<at::Tensor> map_remember(
    const at::Tensor& grid, const at::Tensor& front_open, const at::Tensor& prev_action,
    const at::Tensor& z, int64_t id_offset, const at::Tensor& moves, const at::Tensor& view,
    const at::Tensor& enterable, int64_t forward, int64_t agent, int64_t front) {
  for (auto* t : {&grid, &prev_action, &moves, &view})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(),
                "grid, prev_action, moves and view must be contiguous int64");
  for (auto* t : {&front_open, &enterable})
    TORCH_CHECK(t->scalar_type() == at::kBool && t->is_contiguous(),
                "front_open and enterable must be contiguous bool");
  check(z, "z", 2);
  const int64_t M = grid.size(0), S = grid.size(1), V = view.size(0), W = z.size(1);
  const int64_t A1 = moves.size(0), IDS = enterable.size(0);
  TORCH_CHECK(moves.dim() == 3 && moves.size(1) == 2 && moves.size(2) == S, "moves must be "
              "(A + 1, 2, S)");
  TORCH_CHECK(id_offset + V <= W, "z has no ", V, " ids past column ", id_offset);
  TORCH_CHECK(front_open.size(0) == M && prev_action.size(0) == M && z.size(0) == M,
              "grid, front_open, prev_action and z must have the same rows");
  at::Tensor out = at::empty_like(grid);
  at::Tensor open = at::empty_like(front_open);
  const int64_t* gp = grid.data_ptr<int64_t>();
  const bool* fop = front_open.data_ptr<bool>();
  const int64_t* ap = prev_action.data_ptr<int64_t>();
  const float* zp = z.data_ptr<float>();
  const int64_t* mp = moves.data_ptr<int64_t>();
  const int64_t* vp = view.data_ptr<int64_t>();
  const bool* ep = enterable.data_ptr<bool>();
  int64_t* op = out.data_ptr<int64_t>();
  bool* openp = open.data_ptr<bool>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t a = ap[m];
      TORCH_CHECK(a >= 0 && a < A1, "previous action ", a, " out of range");
      const bool moved = a == forward && fop[m];
      const int64_t* src = mp + (a * 2 + (moved ? 1 : 0)) * S;
      const int64_t* old = gp + m * S;
      int64_t* now = op + m * S;
      for (int64_t i = 0; i < S; ++i) now[i] = src[i] == S ? 0 : old[src[i]];
      const float* ids = zp + m * W + id_offset;
      for (int64_t c = 0; c < V; ++c) {
        const int64_t id = static_cast<int64_t>(ids[c]);
        TORCH_CHECK(id >= 0 && id < IDS, "cell id ", id, " out of range");
        if (id > 0 && c != agent) now[vp[c]] = id;  // unseen cells and the agent's keep the map's
      }
      openp[m] = ep[static_cast<int64_t>(ids[front])];
    }
  });
  return {out, open};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mamba2_branch_step", &mamba2_branch_step,
        "One token on every branch of one Mamba-2 layer (see native.cpp)");
  m.def("mamba2_branch_stack", &mamba2_branch_stack,
        "One token on every branch of a Mamba-2 stack (see native.cpp)");
  m.def("rms_norm", &rms_norm, "torch's RMSNorm over the rows of a matrix");
  m.def("map_remember", &map_remember, "WorldModel._remember: the map decoder's map step");
  m.def("predict_latent", &predict_latent,
        "WorldModel.predict_latent: the latent of the most likely next observation");
}
