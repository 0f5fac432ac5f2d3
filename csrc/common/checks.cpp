#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace flora {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// torch's Python spelling of a dtype, so C++ and Python errors read alike.
std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// Checks one operand: 2-D, a float dtype equal to the first operand's, on the
// first operand's device, row-major rows (a row stride >= the row length is
// fine: views into wider fused buffers are the normal case). `transposed`:
// the transpose of such a view is fine too (fbl's weights in backward dx).
class Operands {
 public:
  Operands(const char* op, const at::Tensor& first, const char* first_name)
      : op_(op), first_(first), first_name_(first_name) {
    check(first, first_name);
  }

  void check(const at::Tensor& t, const char* name, bool transposed = false) const {
    TORCH_CHECK_VALUE(t.dim() == 2, "flora.", op_, ": ", name,
                      " must be 2-D, got a ", t.dim(),
                      "-D tensor of shape ", shape_str(t));
    const auto dt = t.scalar_type();
    TORCH_CHECK_TYPE(dt == at::kHalf || dt == at::kBFloat16 ||
                         dt == at::kFloat || dt == at::kDouble,
                     "flora.", op_, ": ", name, " has dtype ", py_dtype(dt),
                     "; expected float16, bfloat16, float32 or float64");
    TORCH_CHECK_TYPE(dt == first_.scalar_type(), "flora.", op_,
                     ": dtype mismatch: ", first_name_, " is ",
                     py_dtype(first_.scalar_type()), " but ", name, " is ",
                     py_dtype(dt));
    TORCH_CHECK_VALUE(t.device() == first_.device(), "flora.", op_,
                      ": device mismatch: ", first_name_, " is on ",
                      first_.device(), " but ", name, " is on ", t.device());
    const bool t_ok = transposed && (t.size(0) <= 1 || t.stride(0) == 1) &&
                      (t.size(1) <= 1 || t.stride(1) >= t.size(0));
    TORCH_CHECK_VALUE(row_major(t) || t_ok, "flora.", op_, ": ", name,
                      " must be row-major with unit stride along its last "
                      "dimension (row-strided views are fine), got shape ",
                      shape_str(t), " with strides ", t.strides(),
                      "; call .contiguous() first");
  }

  void dim(const char* what, int64_t expected, int64_t got,
           const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
           const char* name) const {
    TORCH_CHECK_VALUE(expected == got, "flora.", op_, ": ", what,
                      " mismatch: ", ref_name, " has shape ", shape_str(ref),
                      " but ", name, " has shape ", shape_str(t));
  }

 private:
  const char* op_;
  const at::Tensor& first_;
  const char* first_name_;
};

void check_repeat(at::IntArrayRef repeat, int64_t repeat_rank, int64_t N,
                  int64_t R) {
  if (repeat.empty()) return;
  const int64_t G = static_cast<int64_t>(repeat.size());
  TORCH_CHECK_VALUE(repeat_rank >= 1 && G * repeat_rank <= R,
                    "flora.ffl: repeat_rank must be >= 1 and the ", G,
                    " repeat segment(s) need ", G, " x repeat_rank <= R = ",
                    R, " state columns, got repeat_rank = ", repeat_rank);
  int64_t total = 0;
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK_VALUE(repeat[g] >= 0 && repeat[g] % repeat_rank == 0,
                      "flora.ffl: repeat-add segment ", g, " has width ",
                      repeat[g], ", which is not a multiple of repeat_rank = ",
                      repeat_rank);
    total += repeat[g];
  }
  TORCH_CHECK_VALUE(total <= N, "flora.ffl: repeat-add segments cover ",
                    total, " columns but y has only N = ", N);
}

}  // namespace

bool unit_last_stride(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

bool row_major(const at::Tensor& t) {
  return unit_last_stride(t) && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
}

bool rows_follow(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_alias_of(b) || a.size(1) != b.size(1) ||
      a.stride(0) != b.stride(0) || a.stride(1) != b.stride(1))
    return false;
  return b.storage_offset() == a.storage_offset() + a.size(0) * a.stride(0);
}

bool cols_follow(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_alias_of(b) || a.size(0) != b.size(0) ||
      a.stride(0) != b.stride(0) || a.stride(1) != b.stride(1))
    return false;
  return b.storage_offset() == a.storage_offset() + a.size(1) * a.stride(1);
}

FflShape check_ffl(const at::Tensor& x, const at::Tensor& W,
                   const at::Tensor& A, at::IntArrayRef repeat,
                   int64_t repeat_rank,
                   const c10::optional<at::Tensor>& z_in,
                   const c10::optional<at::Tensor>& res) {
  Operands c("ffl", x, "x");
  c.check(W, "W");
  c.check(A, "A");
  FflShape s{x.size(0), x.size(1), W.size(0), A.size(0)};
  c.dim("K", s.K, W.size(1), x, "x", W, "W");
  c.dim("K", s.K, A.size(1), x, "x", A, "A");
  if (z_in.has_value()) {
    c.check(*z_in, "z_in");
    c.dim("M", s.M, z_in->size(0), x, "x", *z_in, "z_in");
    c.dim("R", s.R, z_in->size(1), A, "A", *z_in, "z_in");
  }
  if (res.has_value()) {
    c.check(*res, "res");
    c.dim("M", s.M, res->size(0), x, "x", *res, "res");
    c.dim("N", s.N, res->size(1), W, "W", *res, "res");
  }
  check_repeat(repeat, repeat_rank, s.N, s.R);
  return s;
}

void check_rms_norm(const at::Tensor& x, const at::Tensor& weight) {
  // x [M, d + t]: the t trailing columns (zflora's z) are handed through
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 1 && weight.size(0) <= x.size(1),
                    "flora.rms_norm: expected x [M, d (+ t)] and weight [d], got ", x.sizes(), " and ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
                   "flora.rms_norm: weight must match x (", x.scalar_type(), " on ", x.device(),
                   "), got ", weight.scalar_type(), " on ", weight.device());
}

void check_rope_cache(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                      const at::Tensor& sin, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& slot) {
  check_rope(qk, cos, sin);
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && v.dim() == 4 &&
                        k_cache.size(0) == qk.size(0) && k_cache.size(3) == qk.size(3) &&
                        k_cache.size(1) < qk.size(2) && v.size(0) == qk.size(0) &&
                        v.size(1) == qk.size(1) && v.size(2) == k_cache.size(1) &&
                        v.size(3) == qk.size(3) && slot.dim() == 1 && slot.size(0) == qk.size(1),
                    "flora.rope_cache_: expected qk [B, T, nq + nkv, hd], v [B, T, nkv, hd], k_cache and "
                    "v_cache [B, nkv, L, hd] and slot [T], got ", qk.sizes(), ", ", v.sizes(), ", ",
                    k_cache.sizes(), ", ", v_cache.sizes(), ", ", slot.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == qk.scalar_type() && k_cache.scalar_type() == qk.scalar_type() &&
                       v_cache.scalar_type() == qk.scalar_type() && slot.scalar_type() == at::kLong,
                   "flora.rope_cache_: v and the caches must be ", qk.scalar_type(),
                   " like qk and slot int64, got ", v.scalar_type(), ", ", k_cache.scalar_type(), ", ",
                   v_cache.scalar_type(), ", ", slot.scalar_type());
  TORCH_CHECK_VALUE(v.device() == qk.device() && k_cache.device() == qk.device() &&
                        v_cache.device() == qk.device() && slot.device() == qk.device(),
                    "flora.rope_cache_: every operand must be on ", qk.device());
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && (qk.requires_grad() || v.requires_grad() ||
                                                     k_cache.requires_grad() || v_cache.requires_grad())),
                    "flora.rope_cache_: writes the KV cache, for inference; where autograd records, "
                    "call flora.rope");
  // On the CPU the values are read here (no dispatch: a decode step's few);
  // a device's would need a sync: its kernel writes nothing out of range.
  if (slot.device().is_cpu()) {
    const at::Tensor s = slot.contiguous();
    const int64_t* p = s.data_ptr<int64_t>();
    for (int64_t i = 0; i < s.numel(); ++i)
      TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < k_cache.size(2), "flora.rope_cache_: slot values must be in [0, ",
                        k_cache.size(2), "), got ", p[i]);
  }
}

void check_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& mask) {
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == q.size(0) &&
                        k.size(3) == q.size(2) && k.size(1) > 0 && q.size(1) % k.size(1) == 0 &&
                        mask.dim() == 2 && mask.size(0) == q.size(0) && mask.size(1) == k.size(2),
                    "flora.decode_attention: expected q [B, nq, hd], k and v [B, nkv, L, hd] with nq a "
                    "multiple of nkv, and mask [B, L], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes(), ", ",
                    mask.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()) && k.scalar_type() == q.scalar_type() &&
                       v.scalar_type() == q.scalar_type() && mask.scalar_type() == q.scalar_type(),
                   "flora.decode_attention: q, k, v and the (additive) mask must be one floating dtype, got ",
                   q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type(), ", ", mask.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device() && mask.device() == q.device(),
                    "flora.decode_attention: every operand must be on ", q.device());
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() &&
                      (q.requires_grad() || k.requires_grad() || v.requires_grad() || mask.requires_grad())),
                    "flora.decode_attention: for inference; where autograd records, call "
                    "torch.nn.functional.scaled_dot_product_attention");
}

void check_rope_cache_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& k_cache, const at::Tensor& mask) {
  const bool caches = k_cache.dim() == 4 && k_cache.size(3) > 0;
  const int64_t kv = caches ? k_cache.size(1) * k_cache.size(3) : -1;
  TORCH_CHECK_VALUE(caches && q.dim() == 2 && k.dim() == 2 && v.dim() == 2 && k.size(0) == q.size(0) &&
                        v.size(0) == q.size(0) && q.size(1) % k_cache.size(3) == 0 && k.size(1) == kv &&
                        v.size(1) == kv && mask.dim() == 2 && mask.size(0) == q.size(0) &&
                        mask.size(1) <= k_cache.size(2),
                    "flora.rope_cache_attention_: expected q [B, nq * hd], k and v [B, nkv * hd] (one query row "
                    "per sequence), caches [B, nkv, L_max, hd] and mask [B, L] with L <= L_max, got ", q.sizes(),
                    ", ", k.sizes(), ", ", v.sizes(), ", caches ", k_cache.sizes(), " and mask ", mask.sizes());
}

void check_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(3) % 2 == 0 && cos.sizes() == sin.sizes() &&
                        cos.dim() == 4 && cos.size(2) == 1 && cos.size(0) == x.size(0) &&
                        cos.size(1) == x.size(1) && cos.size(3) == x.size(3),
                    "flora.rope: expected x [B, T, heads, head_dim] (head_dim even) and cos, sin "
                    "[B, T, 1, head_dim], got ", x.sizes(), ", ", cos.sizes(), ", ", sin.sizes());
  TORCH_CHECK_TYPE(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
                   "flora.rope: cos and sin must be ", x.scalar_type(), " like x, got ",
                   cos.scalar_type(), ", ", sin.scalar_type());
  TORCH_CHECK_TYPE(cos.device() == x.device() && sin.device() == x.device(),
                   "flora.rope: cos and sin must be on ", x.device(), " like x");
}

FblShape check_fbl_inplace(const at::Tensor& res, const at::Tensor& u, const at::Tensor& z,
                           const at::Tensor& W, const at::Tensor& B) {
  const FblShape sh = check_fbl(u, z, W, B, res);
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() &&
                      (res.requires_grad() || u.requires_grad() || z.requires_grad() ||
                       W.requires_grad() || B.requires_grad())),
                    "flora.fbl_: writes over res, for inference; where autograd records, call "
                    "flora.fbl with res");
  const std::pair<const at::Tensor*, const char*> ops[] = {{&u, "u"}, {&z, "z"}, {&W, "W"}, {&B, "B"}};
  for (const auto& [t, name] : ops) {
    const auto o = at::get_overlap_status(res, *t);
    TORCH_CHECK_VALUE(t->numel() == 0 || (o != at::MemOverlapStatus::Full && o != at::MemOverlapStatus::Partial),
                      "flora.fbl_: res overlaps ", name, " in memory; the op writes res while it reads ", name);
  }
  return sh;
}

void check_silu_mul_inplace(const at::Tensor& g, const at::Tensor& u) {
  check_silu_mul(g, u);
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && (g.requires_grad() || u.requires_grad())),
                    "flora.silu_mul_: writes over u, for inference; where autograd records, call "
                    "flora.silu_mul");
}

void check_silu_mul(const at::Tensor& g, const at::Tensor& u) {
  TORCH_CHECK_VALUE(g.dim() == 2 && g.sizes() == u.sizes(),
                    "flora.silu_mul: expected g, u [M, n] of one shape, got ", g.sizes(), ", ",
                    u.sizes());
  TORCH_CHECK_TYPE(u.scalar_type() == g.scalar_type() && u.device() == g.device(),
                   "flora.silu_mul: u must be ", g.scalar_type(), " like g, got ", u.scalar_type());
}

FblShape check_fbl(const at::Tensor& u, const at::Tensor& z,
                   const at::Tensor& W, const at::Tensor& B,
                   const c10::optional<at::Tensor>& res) {
  Operands c("fbl", u, "u");
  c.check(z, "z");
  c.check(W, "W", true);
  c.check(B, "B", true);
  FblShape s{u.size(0), u.size(1), W.size(0), B.size(1)};
  c.dim("M", s.M, z.size(0), u, "u", z, "z");
  c.dim("K", s.K, W.size(1), u, "u", W, "W");
  c.dim("N", s.N, B.size(0), W, "W", B, "B");
  c.dim("R", s.R, z.size(1), B, "B", z, "z");
  if (res.has_value()) {
    c.check(*res, "res");
    c.dim("M", s.M, res->size(0), u, "u", *res, "res");
    c.dim("N", s.N, res->size(1), W, "W", *res, "res");
  }
  return s;
}

FfblShape check_ffbl(const at::Tensor& u, const at::Tensor& z,
                     const at::Tensor& W, const at::Tensor& B,
                     const at::Tensor& A, const at::Tensor& C,
                     const c10::optional<at::Tensor>& res) {
  Operands c("ffbl", u, "u");
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{z, "z"},
                         {W, "W"}, {B, "B"}, {A, "A"}, {C, "C"}})
    c.check(t, name);
  FfblShape s{u.size(0), u.size(1), W.size(0), B.size(1), A.size(0)};
  c.dim("M", s.M, z.size(0), u, "u", z, "z");
  c.dim("K", s.K, W.size(1), u, "u", W, "W");
  c.dim("K", s.K, A.size(1), u, "u", A, "A");
  c.dim("N", s.N, B.size(0), W, "W", B, "B");
  c.dim("R", s.R, z.size(1), B, "B", z, "z");
  c.dim("R", s.R, C.size(1), z, "z", C, "C");
  c.dim("R'", s.R2, C.size(0), A, "A", C, "C");
  if (res.has_value()) {
    c.check(*res, "res");
    c.dim("M", s.M, res->size(0), u, "u", *res, "res");
    c.dim("N", s.N, res->size(1), W, "W", *res, "res");
  }
  return s;
}

}  // namespace flora
