// The op schemas: the one definition every device implementation registers
// against. flora/ops.py holds the same strings for builds without this
// library; tests/test_ops.py checks the two agree.
#include <torch/library.h>

TORCH_LIBRARY(flora, m) {
  // [y | z] = x [W; A]^T  (+ s * tile(z) on the `repeat` segments of y; + z_in on z;
  // + res on y)
  m.def(
      "ffl(Tensor x, Tensor W, Tensor A, float s=1.0, int[] repeat=[], "
      "int repeat_rank=0, Tensor? z_in=None, Tensor? res=None) -> Tensor");
  // y = u W^T + s * f(z) B^T (+ res), f = relu or identity
  m.def(
      "fbl(Tensor u, Tensor z, Tensor W, Tensor B, float s=1.0, "
      "Tensor? res=None, bool relu=False) -> Tensor");
  // inference: res += u W^T + s f(z) B^T in place (the residual stream, or
  // the output an FFL just wrote: no copy of it into a fresh output)
  m.def(
      "fbl_(Tensor(a!) res, Tensor u, Tensor z, Tensor W, Tensor B, float s=1.0, "
      "bool relu=False) -> ()");
  // [y | z'] = [u | f(z)] [W, sB; A, C]^T (+ res on y)
  m.def(
      "ffbl(Tensor u, Tensor z, Tensor W, Tensor B, Tensor A, Tensor C, "
      "float s=1.0, Tensor? res=None, bool relu=False) -> Tensor");
  // The Llama step's pointwise pieces, one pass each (transformers' roundings):
  // weight * rms_norm(x), x cos + rotate_half(x) sin, silu(g) * u
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  // a decode step's RoPE over q|k that writes k and v into the KV cache at
  // slot (inference); returns q rotated
  m.def(
      "rope_cache_(Tensor qk, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor slot) -> Tensor");
  m.def("silu_mul(Tensor g, Tensor u) -> Tensor");
  // inference: the product written over u (ffba's down then reads [mid | z],
  // u's columns and the state after them, as one operand)
  m.def("silu_mul_(Tensor g, Tensor(a!) u) -> ()");
  // a decode step's attention: one query row per sequence over its KV-cache
  // window, grouped kv heads, an additive key mask; split over the keys
  // (splits: 0 = automatic; > 0 = flora's kernel with that many, where it runs)
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, int splits=0) -> Tensor");
  // inference, one query row per sequence (q [B, nq hd], k and v [B, nkv hd]):
  // rope_cache_, then decode_attention of the rotated q over the caches' first
  // L slots (L: the mask's width)
  m.def(
      "rope_cache_attention_(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor slot, Tensor mask) -> Tensor");
}
