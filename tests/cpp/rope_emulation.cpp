// Runs the CUDA 3D RoPE kernel's code (csrc/rope_tile.cuh) on the CPU and checks it
// against a plain reference: tests/test_cuda_emulation.py builds this file with the
// host compiler (with AddressSanitizer and UBSan where available: an access outside a
// buffer, a misaligned vector access or an integer overflow fails) and runs it.
//
// Every case runs on the three kernels. The tiled shapes' threads share nothing (no shared
// memory, no barrier): every thread of every CTA (x, y) in turn, with a small CTA target so
// that head groups walk several heads. The shared-table kernel:
// a launch is emulated as the GPU runs it: for every CTA, phase 0 of every thread, then
// (a barrier) phase 1 of every thread, then phase 2 of every thread, with the shared
// tables filled with NaN first (a read of an entry no earlier phase wrote shows up as a
// wrong result). q and k get strides, head paddings, pointer offsets and element strides
// that a GPU test would need a GPU for; plan_rope (the host's plan) picks the vector width
// from them, so the emulated pointers' alignment (aligned allocations + chosen offsets) is
// what the GPU would see. Every element of q's and k's buffers outside the rotated views
// must be left as it was. Prints one line per case and "ALL OK" at the end; exits 1 on a
// failure.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "rope_tile.cuh"

using namespace vdit;

namespace {

int failures = 0;

uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
double uniform() {  // [0, 1)
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return static_cast<double>(rng_state >> 11) / 9007199254740992.0;
}

template <typename T> const char* dtype_name();
template <> const char* dtype_name<float>() { return "float32"; }
template <> const char* dtype_name<c10::Half>() { return "float16"; }
template <> const char* dtype_name<c10::BFloat16>() { return "bfloat16"; }

// the tolerance of one stored value against the exact rotation of the stored inputs: the
// float32 math (|y| <~ 4 here: a few float32 ulps), then one rounding to T
template <typename T> double tolerance(double y);
template <> double tolerance<float>(double y) { return 1e-5 + 4e-7 * std::fabs(y); }
template <> double tolerance<c10::Half>(double y) { return 1e-5 + std::fabs(y) * std::ldexp(1.0, -11) * 1.01; }
template <> double tolerance<c10::BFloat16>(double y) { return 1e-5 + std::fabs(y) * std::ldexp(1.0, -8) * 1.01; }

// One tensor (N, heads, D) inside a buffer: element (n, h, d) at offset + n*sn + h*sh + d*sd.
struct View {
  int64_t heads, sn, sh, sd, offset, size;  // size: the buffer's elements
};

View layout(int64_t N, int64_t heads, int64_t D, int64_t head_pad, int64_t sd, int64_t token_pad, int64_t offset) {
  View v;
  v.heads = heads;
  v.sd = sd;
  v.sh = D * sd + head_pad;
  v.sn = heads * v.sh + token_pad;
  v.offset = offset;
  v.size = offset + (N > 0 ? (N - 1) * v.sn : 0) + (heads > 0 ? (heads - 1) * v.sh : 0) + (D - 1) * sd + 1 + 7;
  return v;
}

struct Case {
  std::string name;
  int64_t N;
  int64_t dims[3];
  bool interleaved, inverse, inplace;
  View q, k;
  View oq, ok;        // out of place: the outputs' views (in place: q and k)
  int64_t out_shift;  // out of place: the outputs' buffers start this many elements off 16 bytes

  int expect_vp;  // 0: not checked
};

// The exact rotation of pair slot i of a head whose elements are x (doubles), from the
// formulas of vdit_kernels/reference.py, not from rope_pair: frequencies
// float32(theta^(-2j/d_a)), angles float32(pos * freq).
void reference_head(const Case& c, const float* pos, double theta, const std::vector<double>& x, std::vector<double>& y) {
  y = x;
  int64_t chunk = 0;
  for (int a = 0; a < 3; ++a) {
    const int64_t d = c.dims[a];
    for (int64_t j = 0; j < d / 2; ++j) {
      const float freq = static_cast<float>(std::pow(theta, -2.0 * j / static_cast<double>(d)));
      const float angle = pos[a] * freq;
      const double cs = std::cos(static_cast<double>(angle));
      const double sn = (c.inverse ? -1.0 : 1.0) * std::sin(static_cast<double>(angle));
      const int64_t i0 = c.interleaved ? chunk + 2 * j : chunk + j;
      const int64_t i1 = c.interleaved ? i0 + 1 : i0 + d / 2;
      y[i0] = x[i0] * cs - x[i1] * sn;
      y[i1] = x[i1] * cs + x[i0] * sn;
    }
    chunk += d;
  }
}

// One case on the shared-table kernel (no tiling) or a tiled shape.
template <typename T>
bool run_case(const Case& c, std::optional<RopeTiling> tiling) {
  const int64_t D = c.dims[0] + c.dims[1] + c.dims[2];
  const double theta = 500.0;
  const View* views[2] = {&c.q, &c.k};
  const View* out_views[2] = {c.inplace ? &c.q : &c.oq, c.inplace ? &c.k : &c.ok};
  // 16-byte aligned buffers (allocations on a GPU are 256-byte aligned); offsets shift views
  std::vector<std::vector<T>> in(2), out(2), before(2);
  for (int i = 0; i < 2; ++i) {
    in[i].resize(static_cast<size_t>(views[i]->size) + 16);
    for (auto& e : in[i]) e = static_cast<T>(static_cast<float>(2.0 * uniform() - 1.0));
    before[i] = in[i];
    if (!c.inplace) {
      out[i].resize(static_cast<size_t>(out_views[i]->size) + 16);
      for (auto& e : out[i]) e = static_cast<T>(7.0f);
    }
  }
  std::vector<float> pos(static_cast<size_t>(3 * c.N));
  for (auto& e : pos) e = static_cast<float>(uniform() < 0.3 ? std::floor(40.0 * uniform()) : 40.0 * uniform());

  RopeParams p;
  std::memset(&p, 0, sizeof(p));
  T* base_in[2];
  T* base_out[2];
  for (int i = 0; i < 2; ++i) {
    // align the buffer start to 16 bytes, then the view's offset
    auto align16 = [](T* ptr) {
      const uintptr_t u = reinterpret_cast<uintptr_t>(ptr);
      return reinterpret_cast<T*>((u + 15) / 16 * 16);
    };
    base_in[i] = align16(in[i].data());
    base_out[i] = c.inplace ? base_in[i] : align16(out[i].data()) + c.out_shift;
    const View& v = *views[i];
    const View& o = *out_views[i];
    p.in[i] = base_in[i] + v.offset;
    p.out[i] = base_out[i] + o.offset;
    p.sn[i] = v.sn;
    p.sh[i] = v.sh;
    p.sd[i] = v.sd;
    p.osn[i] = o.sn;
    p.osh[i] = o.sh;
    p.osd[i] = o.sd;
    p.heads[i] = static_cast<int32_t>(v.heads);
  }
  p.pos = pos.data();
  p.N = c.N;
  p.half = static_cast<int32_t>(D / 2);
  p.axes = make_rope_axes(c.dims[0], c.dims[1], c.dims[2]);
  p.theta = theta;
  p.interleaved = c.interleaved;
  p.inverse = c.inverse;
  if (tiling) {
    // a small CTA target (8): several head groups, each CTA walking several heads
    RopeTiledParams tp;
    std::memset(&tp, 0, sizeof(tp));
    tp.base = p;
    const RopeTiledPlan plan = plan_rope_tiled(tp, sizeof(T), 8, *tiling);
    std::printf("%s %s %s: vp=%d tok=%d blocks=%lld head_groups=%lld\n", c.name.c_str(), dtype_name<T>(),
                *tiling == RopeTiling::kTiledHeads ? "tiled-heads" : "tiled", plan.vp, tp.base.tok,
                static_cast<long long>(plan.blocks), static_cast<long long>(plan.head_groups));
    if (c.expect_vp && plan.vp != c.expect_vp) {
      std::printf("  FAIL: plan picked vp=%d, expected %d\n", plan.vp, c.expect_vp);
      ++failures;
      return false;
    }
    for (int64_t bx = 0; bx < plan.blocks; ++bx)
      for (int64_t by = 0; by < plan.head_groups; ++by)
        for (int tid = 0; tid < kRopeThreads; ++tid) {
          const int32_t x = static_cast<int32_t>(bx), y = static_cast<int32_t>(by);
          if (*tiling == RopeTiling::kTiledHeads) {
            switch (plan.vp) {
              case 4: rope_tiled_thread<T, 4, RopeTiling::kTiledHeads>(tp, x, y, tid); break;
              case 2: rope_tiled_thread<T, 2, RopeTiling::kTiledHeads>(tp, x, y, tid); break;
              default: rope_tiled_thread<T, 1, RopeTiling::kTiledHeads>(tp, x, y, tid); break;
            }
          } else {
            switch (plan.vp) {
              case 4: rope_tiled_thread<T, 4, RopeTiling::kTiled>(tp, x, y, tid); break;
              case 2: rope_tiled_thread<T, 2, RopeTiling::kTiled>(tp, x, y, tid); break;
              default: rope_tiled_thread<T, 1, RopeTiling::kTiled>(tp, x, y, tid); break;
            }
          }
        }
  } else {
    const RopePlan plan = plan_rope(p, sizeof(T));
    std::printf("%s %s: vp=%d tok=%d blocks=%lld\n", c.name.c_str(), dtype_name<T>(), plan.vp, p.tok,
                static_cast<long long>(plan.blocks));
    if (c.expect_vp && plan.vp != c.expect_vp) {
      std::printf("  FAIL: plan picked vp=%d, expected %d\n", plan.vp, c.expect_vp);
      ++failures;
      return false;
    }
    std::vector<float> smem(static_cast<size_t>(plan.smem_bytes / sizeof(float)));
    for (int64_t b = 0; b < plan.blocks; ++b) {
      std::fill(smem.begin(), smem.end(), std::numeric_limits<float>::quiet_NaN());
      for (int phase = 0; phase < 3; ++phase) {
        for (int tid = 0; tid < kRopeThreads; ++tid) {
          switch (plan.vp) {
            case 4: rope_phase<T, 4>(phase, p, static_cast<int32_t>(b), smem.data(), tid); break;
            case 2: rope_phase<T, 2>(phase, p, static_cast<int32_t>(b), smem.data(), tid); break;
            default: rope_phase<T, 1>(phase, p, static_cast<int32_t>(b), smem.data(), tid); break;
          }
        }
      }
    }
  }

  // the rotated views against the reference; every other element untouched
  bool ok = true;
  for (int i = 0; i < 2; ++i) {
    const View& v = *views[i];
    const View& o = *out_views[i];
    const std::vector<T>& result = c.inplace ? in[i] : out[i];
    const T* res = c.inplace ? base_in[i] : base_out[i];
    std::vector<char> covered(result.size(), 0);
    std::vector<double> x(static_cast<size_t>(D)), y;
    for (int64_t n = 0; n < c.N; ++n) {
      for (int64_t h = 0; h < v.heads; ++h) {
        const int64_t at = v.offset + n * v.sn + h * v.sh;
        for (int64_t d = 0; d < D; ++d) x[d] = static_cast<double>(static_cast<float>(before[i][(base_in[i] - in[i].data()) + at + d * v.sd]));
        reference_head(c, &pos[3 * n], theta, x, y);
        for (int64_t d = 0; d < D; ++d) {
          const int64_t e = (res - result.data()) + o.offset + n * o.sn + h * o.sh + d * o.sd;
          covered[static_cast<size_t>(e)] = 1;
          const double got = static_cast<double>(static_cast<float>(result[static_cast<size_t>(e)]));
          if (!(std::fabs(got - y[d]) <= tolerance<T>(y[d]))) {
            if (ok) std::printf("  FAIL %s: (n=%lld, h=%lld, d=%lld) of %s: got %.8g, expected %.8g\n", c.name.c_str(),
                                static_cast<long long>(n), static_cast<long long>(h), static_cast<long long>(d),
                                i == 0 ? "q" : "k", got, y[d]);
            ok = false;
          }
        }
      }
    }
    for (size_t e = 0; e < result.size(); ++e) {
      if (covered[e]) continue;
      const float want = c.inplace ? static_cast<float>(before[i][e]) : 7.0f;
      if (static_cast<float>(result[e]) != want) {
        if (ok) std::printf("  FAIL %s: element %zu of %s's buffer outside the view was written\n", c.name.c_str(), e,
                            i == 0 ? "q" : "k");
        ok = false;
      }
    }
  }
  if (!ok) ++failures;
  return ok;
}

// A case on the shared-table kernel and on both tiled shapes.
template <typename T>
void run_on_every_kernel(const Case& c) {
  for (const auto tiling : {std::optional<RopeTiling>(), std::optional<RopeTiling>(RopeTiling::kTiled),
                            std::optional<RopeTiling>(RopeTiling::kTiledHeads)})
    run_case<T>(c, tiling);
}

// N tokens of contiguous q (hq heads) and k (hk heads), head dim split as dims.
Case contiguous_case(int64_t N, int64_t hq, int64_t hk, const std::array<int64_t, 3>& dims, bool interleaved,
                     bool inverse, bool inplace, int expect_vp, const std::string& what) {
  Case c;
  const int64_t D = dims[0] + dims[1] + dims[2];
  for (int a = 0; a < 3; ++a) c.dims[a] = dims[a];
  c.interleaved = interleaved;
  c.inverse = inverse;
  c.inplace = inplace;
  c.N = N;
  c.out_shift = 0;
  c.q = c.oq = layout(N, hq, D, 0, 1, 0, 0);
  c.k = c.ok = layout(N, hk, D, 0, 1, 0, 0);
  c.expect_vp = expect_vp;
  c.name = "D=" + std::to_string(D) + " (" + std::to_string(dims[0]) + "," + std::to_string(dims[1]) + "," +
           std::to_string(dims[2]) + ") " + (interleaved ? "interleaved" : "rotate-half") + " " + what +
           (inplace ? " in-place" : "") + (inverse ? " inverse" : "") + " N=" + std::to_string(N);
  return c;
}

template <typename T>
void run_all() {
  const int64_t e = sizeof(T);
  struct Split { int64_t dt, dh, dw; };
  const Split splits[] = {{16, 24, 24}, {44, 42, 42}, {0, 4, 4}, {2, 2, 2}, {24, 24, 24}, {32, 32, 32}, {8, 0, 8}};
  int count = 0;
  for (const Split& s : splits) {
    const int64_t D = s.dt + s.dh + s.dw;
    for (int conv = 0; conv < 2; ++conv) {
      const bool interleaved = conv == 0;
      for (int layout_kind = 0; layout_kind < 6; ++layout_kind) {
        Case c;
        c.dims[0] = s.dt;
        c.dims[1] = s.dh;
        c.dims[2] = s.dw;
        c.interleaved = interleaved;
        c.inverse = (count % 3) == 1;
        c.inplace = ((count + count / 6) % 2) == 0;  // each layout both ways over the splits
        c.N = (count % 4 == 0) ? 1 : 5 + 8 * (count % 5);
        c.expect_vp = 0;
        const char* kinds[] = {"contiguous", "qkv-views", "padded-heads", "strided-dim", "offset-by-one",
                               "output-offset-by-one"};
        c.out_shift = 0;
        c.oq = c.ok = View{};
        const int variant = (count / 6) % 3;  // of the layouts below that have several
        switch (layout_kind) {
          case 0:  // (N, 3, D) and (N, 1, D), contiguous: GQA heads
            c.q = layout(c.N, 3, D, 0, 1, 0, 0);
            c.k = layout(c.N, 1, D, 0, 1, 0, 0);
            break;
          case 1:  // q and k as slices of one (N, 3 + 1 + 1, D) qkv buffer: token stride 5D
            c.q = layout(c.N, 3, D, 0, 1, 2 * D, 0);
            c.k = layout(c.N, 1, D, 0, 1, 4 * D, 0);
            break;
          case 2:  // padded heads and tokens: aligned (8 and 24 elements), or one of the two
                   // strides 1 element off (the other aligned: each stride is checked)
            if (variant == 0) {
              c.q = layout(c.N, 2, D, 8, 1, 24, 0);
              c.k = layout(c.N, 2, D, 8, 1, 24, 8);
            } else {
              c.q = layout(c.N, 2, D, variant == 1 ? 1 : 0, 1, variant == 1 ? 6 : 1, 0);
              c.k = layout(c.N, 2, D, 0, 1, 0, 0);
              c.inplace = false;  // contiguous outputs: the inputs' strides alone decide
              c.oq = layout(c.N, 2, D, 0, 1, 0, 0);
              c.ok = c.k;
              c.expect_vp = 1;
            }
            break;
          case 3:  // every other element along D in q (one element per access); out of place
                   // the outputs are contiguous, as rope_3d's fresh ones
            c.q = layout(c.N, 2, D, 0, 2, 0, 0);
            c.k = layout(c.N, 1, D, 0, 1, 0, 0);
            if (!c.inplace) c.oq = layout(c.N, 2, D, 0, 1, 0, 0), c.ok = c.k;
            c.expect_vp = 1;
            break;
          case 4:  // inputs one element off 16 bytes (outputs, out of place, aligned)
            c.q = layout(c.N, 2, D, 0, 1, 0, 1);
            c.k = layout(c.N, 2, D, 0, 1, 0, 1);
            c.out_shift = -1;
            c.expect_vp = 1;  // every vector access is 8 or 16 bytes wide
            break;
          default:  // aligned inputs; outputs one element off 16 bytes, with heads or tokens 1
                    // element off, or every other element along D
            c.inplace = false;
            c.q = layout(c.N, 2, D, 0, 1, 0, 0);
            c.k = layout(c.N, 2, D, 0, 1, 0, 0);
            c.oq = c.ok = variant == 1 ? layout(c.N, 2, D, 1, 1, 6, 0)
                        : variant == 2 ? layout(c.N, 2, D, 0, 1, 1, 0)
                                       : layout(c.N, 2, D, 0, (count / 18) % 2 ? 2 : 1, 0, 0);
            if (variant == 0 && c.oq.sd == 1) c.out_shift = 1;
            c.expect_vp = 1;
            break;
        }
        c.name = "D=" + std::to_string(D) + " (" + std::to_string(s.dt) + "," + std::to_string(s.dh) + "," +
                 std::to_string(s.dw) + ") " + (interleaved ? "interleaved" : "rotate-half") + " " + kinds[layout_kind] +
                 (c.inplace ? " in-place" : "") + (c.inverse ? " inverse" : "") + " N=" + std::to_string(c.N);
        if (c.oq.heads == 0) {  // outputs laid out as the inputs unless the case said otherwise
          c.oq = c.q;
          c.ok = c.k;
        }
        // the widest access the plan may pick for a contiguous layout: 16 bytes
        if (layout_kind == 0) {
          int vp = 1;
          for (int cand : {4, 2}) {
            const int64_t run = (interleaved ? 2 * cand : cand) * e;
            bool fits = run <= 16 && (D / 2) % cand == 0 && (D * e) % run == 0;
            if (!interleaved) fits = fits && (s.dt / 2) % cand == 0 && (s.dh / 2) % cand == 0 && (s.dw / 2) % cand == 0 &&
                                     s.dt % cand == 0 && (s.dt + s.dh) % cand == 0;
            if (fits) { vp = cand; break; }
          }
          c.expect_vp = vp;
        }
        run_on_every_kernel<T>(c);
        ++count;
      }
    }
  }
  // 48 + 41 heads of 128: the shared kernel's CTA loops over more units than its threads,
  // the tiled ones' head groups over several heads each (tiled-heads: a last step that
  // runs past the heads); (44, 42, 42) has halves 22, 21, 21: 16-byte interleaved units
  for (int conv = 0; conv < 2; ++conv) {
    const bool interleaved = conv == 0;
    run_on_every_kernel<T>(contiguous_case(37, 48, 41, {44, 42, 42}, interleaved, /*inverse=*/!interleaved,
                                           /*inplace=*/interleaved, interleaved ? static_cast<int>(8 / e) : 1,
                                           "many-heads (48 + 41)"));
  }
  // half = 6 pairs, heads 16 elements apart: every stride and pointer allows 4-pair
  // (16-byte half-precision) accesses, but 6 pairs do not split into 4s: 2 pairs an access
  {
    Case c = contiguous_case(5, 2, 1, {4, 4, 4}, /*interleaved=*/true, false, /*inplace=*/true, 2,
                             "heads padded to 16 elements");
    c.q = c.oq = layout(5, 2, 12, 4, 1, 0, 0);
    c.k = c.ok = layout(5, 1, 12, 4, 1, 0, 0);
    run_on_every_kernel<T>(c);
  }
  // q without heads, then k without heads (the plans skip an empty tensor's layout)
  run_on_every_kernel<T>(contiguous_case(9, 0, 2, {16, 24, 24}, true, false, false, 0, "q without heads"));
  run_on_every_kernel<T>(contiguous_case(9, 3, 0, {16, 24, 24}, false, false, true, 0, "k without heads"));
}

// plan_rope_tiled refuses a head dim whose frequencies its parameters cannot hold
void check_tiled_plan_limit() {
  RopeTiledParams tp;
  std::memset(&tp, 0, sizeof(tp));
  tp.base.heads[0] = tp.base.heads[1] = 1;
  tp.base.N = 4;
  tp.base.sd[0] = tp.base.sd[1] = tp.base.osd[0] = tp.base.osd[1] = 1;
  for (int32_t half : {kRopeTiledMaxHalf, kRopeTiledMaxHalf + 1}) {
    tp.base.half = half;
    tp.base.axes = make_rope_axes(0, 0, 2 * half);
    const RopeTiledPlan plan = plan_rope_tiled(tp, 4, 8, RopeTiling::kTiled);
    const bool want = half <= kRopeTiledMaxHalf;
    std::printf("tiled plan at half=%d: vp=%d\n", half, plan.vp);
    if ((plan.vp > 0) != want) {
      std::printf("  FAIL: half=%d %s a plan\n", half, want ? "did not get" : "got");
      ++failures;
    }
  }
}

}  // namespace

int main() {
  check_tiled_plan_limit();
  run_all<float>();
  run_all<c10::Half>();
  run_all<c10::BFloat16>();
  if (failures) {
    std::printf("%d FAILED\n", failures);
    return 1;
  }
  std::printf("ALL OK\n");
  return 0;
}
