// Typed dispatcher handles for the flora ops, for kernels that call the op
// again below their own dispatch key (autocast, autograd).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Optional.h>

namespace flora {

using FflSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                          at::IntArrayRef, int64_t, const c10::optional<at::Tensor>&,
                          const c10::optional<at::Tensor>&);
using FblSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, double, const c10::optional<at::Tensor>&, bool);
using FfblSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                           const c10::optional<at::Tensor>&, bool);

// Each handle is looked up once (function-local static).
inline const c10::TypedOperatorHandle<FflSig>& ffl_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flora::ffl", "").typed<FflSig>();
  return op;
}
inline const c10::TypedOperatorHandle<FblSig>& fbl_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flora::fbl", "").typed<FblSig>();
  return op;
}
inline const c10::TypedOperatorHandle<FfblSig>& ffbl_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flora::ffbl", "").typed<FfblSig>();
  return op;
}

// The pointwise ops (autograd calls their kernels below the Autograd key).
using RmsNormSig = at::Tensor(const at::Tensor&, const at::Tensor&, double);
using RopeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using SiluMulSig = at::Tensor(const at::Tensor&, const at::Tensor&);

inline const c10::TypedOperatorHandle<RmsNormSig>& rms_norm_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flora::rms_norm", "").typed<RmsNormSig>();
  return op;
}
inline const c10::TypedOperatorHandle<RopeSig>& rope_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flora::rope", "").typed<RopeSig>();
  return op;
}
// The decode step's attention pieces (rope_cache_attention_ calls them in turn).
using RopeCacheSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&);
using DecodeAttentionSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      int64_t);

inline const c10::TypedOperatorHandle<RopeCacheSig>& rope_cache_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flora::rope_cache_", "").typed<RopeCacheSig>();
  return op;
}
inline const c10::TypedOperatorHandle<DecodeAttentionSig>& decode_attention_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("flora::decode_attention", "")
                             .typed<DecodeAttentionSig>();
  return op;
}

inline const c10::TypedOperatorHandle<SiluMulSig>& silu_mul_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flora::silu_mul", "").typed<SiluMulSig>();
  return op;
}

}  // namespace flora
