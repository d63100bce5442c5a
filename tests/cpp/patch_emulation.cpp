// Runs the CUDA patch kernel's code (csrc/patch_tile.cuh) on the CPU and checks it
// against a plain reference: tests/test_cuda_emulation.py builds this file with
// the host compiler (with AddressSanitizer and UBSan where available: an access outside
// a buffer, a misaligned vector access or an integer overflow fails) and runs it.
//
// A tile is emulated as the GPU runs it: patch_cta, then phase 0 of every thread, then
// (the barrier) phase 1 of every thread, with the stage filled with two different
// patterns in two runs (a read of a stage byte that phase 0 did not write shows up).
// Videos get strides, offsets and pointer alignments that a GPU test would need a GPU
// for; the launch plan (plan_patch, the host's) picks the access widths, so the
// emulated pointers' alignment (16-byte aligned allocations + chosen offsets) is what the
// GPU would see. Prints one line per case and "ALL OK" at the end; exits 1 on a failure.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "patch_tile.cuh"

using namespace vdit;

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                    \
  do {                                                       \
    if (!(cond)) {                                           \
      ++failures;                                            \
      std::printf("  FAIL %s:%d: ", __FILE__, __LINE__);     \
      std::printf(__VA_ARGS__);                              \
      std::printf("\n");                                     \
      return false;                                          \
    }                                                        \
  } while (0)

// Divisor: a / d exact for every a, d <= 2^16 (the kernel's bounds). (a * m) >> 32 is
// non-decreasing in a, so checking both sides of every step of a / d (a = k*d - 1 and
// a = k*d) covers every a up to 2^16.
bool check_divisor() {
  for (int32_t d = 1; d <= 65536; ++d) {
    const Divisor div = make_divisor(d);
    for (int64_t k = 0; k * d <= 65536; ++k) {
      for (int64_t a = k * d - 1; a <= k * d; ++a) {
        if (a < 0 || a > 65536) continue;
        const int32_t q = static_cast<int32_t>(a) / div;
        EXPECT(q == a / d, "Divisor: %lld / %d gave %d", static_cast<long long>(a), d, q);
      }
    }
  }
  std::printf("Divisor exact for a, d <= 2^16\n");
  return true;
}

uint32_t hash32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

enum Layout {
  kContiguous,   // (C, T, H, W) contiguous
  kOffset,       // contiguous, data pointer `off` elements into its buffer
  kPadded,       // rows of W + pad elements, planes and channels padded too (odd strides)
  kPadded16,     // rows padded to a multiple of 16 elements (gaps, still 16-byte aligned)
  kWOuter,       // stride_w != 1: memory order (W, C, T, H)
  kWStep2,       // stride_w = 2 (every second element of rows of 2W), other strides aligned
  kWSlice,       // W-slice [2, W + 2) of rows of W + 4 elements
  kOddUnitStrides,  // axes of length 1 with odd strides (never indexed past 0)
  kPaddedChannels,  // contiguous but for channel planes one element apart (only stride_c odd)
};

struct VideoSpec {
  int64_t t, h, w;
  Layout layout;
  int64_t off;  // kOffset: elements
};

struct Case {
  std::string name;
  int esize;
  int64_t C;
  int64_t ps[3];
  std::vector<VideoSpec> videos;
  int64_t token_off;  // elements between the token buffer's 16-byte aligned start and the tokens
  // expected plan fields (0: not checked)
  int32_t want_tbytes, want_ubytes;
  std::vector<int32_t> want_vbytes;
};

struct Video {
  std::vector<int64_t> size;    // C, T, H, W
  int64_t stride[4];
  int64_t off;                  // elements from the buffer's start to the data
  int64_t extent;               // elements from the data to one past the last
  unsigned char* buf;           // malloc'ed, exactly (off + extent) * esize bytes
};

Video make_video(int64_t C, const VideoSpec& s, int esize) {
  Video v;
  v.size = {C, s.t, s.h, s.w};
  const int64_t T = s.t, H = s.h, W = s.w;
  v.off = 0;
  switch (s.layout) {
    case kContiguous:
    case kOffset:
    case kOddUnitStrides:
      v.stride[3] = 1; v.stride[2] = W; v.stride[1] = H * W; v.stride[0] = T * H * W;
      if (s.layout == kOffset) v.off = s.off;
      if (s.layout == kOddUnitStrides) {
        if (C == 1) v.stride[0] = 7;
        if (T == 1) v.stride[1] = 3;
        if (H == 1) v.stride[2] = 5;
      }
      break;
    case kPadded:
      v.stride[3] = 1; v.stride[2] = W + 1; v.stride[1] = H * (W + 1) + 3; v.stride[0] = T * v.stride[1] + 1;
      v.off = 1;
      break;
    case kPadded16: {
      const int64_t row = (W + 15) / 16 * 16 + 16;
      v.stride[3] = 1; v.stride[2] = row; v.stride[1] = H * row; v.stride[0] = T * H * row + 32;
      break;
    }
    case kWOuter:
      v.stride[2] = 1; v.stride[1] = H; v.stride[0] = T * H; v.stride[3] = C * T * H;
      break;
    case kWStep2:
      v.stride[3] = 2; v.stride[2] = 2 * W; v.stride[1] = H * 2 * W; v.stride[0] = T * H * 2 * W;
      break;
    case kWSlice:
      v.stride[3] = 1; v.stride[2] = W + 4; v.stride[1] = H * (W + 4); v.stride[0] = T * H * (W + 4);
      v.off = 2;
      break;
    case kPaddedChannels:
      v.stride[3] = 1; v.stride[2] = W; v.stride[1] = H * W; v.stride[0] = T * H * W + 1;
      break;
  }
  int64_t last = 0;
  bool empty = false;
  for (int a = 0; a < 4; ++a) {
    if (v.size[a] == 0) empty = true;
    else last += (v.size[a] - 1) * v.stride[a];
  }
  v.extent = empty ? 0 : last + 1;
  const size_t bytes = static_cast<size_t>((v.off + v.extent) * esize);
  v.buf = static_cast<unsigned char*>(std::malloc(bytes > 0 ? bytes : 1));
  return v;
}

template <typename E>
E value_of(uint64_t key) { return static_cast<E>(hash32(key) | 1u); }

// element offset of (c, t, h, w)
int64_t at(const Video& v, int64_t c, int64_t t, int64_t h, int64_t w) {
  return v.off + c * v.stride[0] + t * v.stride[1] + h * v.stride[2] + w * v.stride[3];
}

template <typename E, bool kToTokens>
void emulate(const PatchParams& p, const PatchPlan& plan, unsigned char fill) {
  unsigned char* stage = static_cast<unsigned char*>(std::aligned_alloc(16, static_cast<size_t>(plan.stage_bytes)));
  for (int64_t tile = 0; tile < plan.tiles; ++tile) {
    std::memset(stage, fill, static_cast<size_t>(plan.stage_bytes));
    const PatchCta c = patch_cta<E>(p, static_cast<int32_t>(tile));
    for (int tid = 0; tid < kPatchThreads; ++tid) patch_phase<E, kToTokens>(0, p, c, stage, tid);
    for (int tid = 0; tid < kPatchThreads; ++tid) patch_phase<E, kToTokens>(1, p, c, stage, tid);
  }
  std::free(stage);
}

template <typename E>
bool run_case(const Case& cs) {
  const int esize = sizeof(E);
  const int64_t C = cs.C, pt = cs.ps[0], ph = cs.ps[1], pw = cs.ps[2];
  const int64_t F = C * pt * ph * pw;
  std::vector<Video> videos;
  std::vector<PatchVideo> recs;
  int64_t n = 0;
  for (const auto& s : cs.videos) {
    videos.push_back(make_video(C, s, esize));
    const Video& v = videos.back();
    PatchVideo r;
    std::memset(&r, 0, sizeof(r));
    r.data = v.buf + v.off * esize;
    for (int a = 0; a < 4; ++a) r.stride[a] = v.stride[a];
    r.gt = static_cast<int32_t>(s.t / pt);
    r.gh = static_cast<int32_t>(s.h / ph);
    r.gw = static_cast<int32_t>(s.w / pw);
    r.token_begin = n;
    n += static_cast<int64_t>(r.gt) * r.gh * r.gw;
    recs.push_back(r);
  }
  const size_t tok_bytes = static_cast<size_t>((n * F + cs.token_off) * esize);
  unsigned char* tok_buf = static_cast<unsigned char*>(std::malloc(tok_bytes > 0 ? tok_bytes : 1));
  E* tokens = reinterpret_cast<E*>(tok_buf) + cs.token_off;

  PatchParams p;
  std::memset(&p, 0, sizeof(p));
  p.tokens = tokens;
  const PatchPlan plan = plan_patch(recs.data(), static_cast<int>(recs.size()), C, cs.ps, esize, tokens, p);
  bool ok = true;
  std::string widths;
  for (const auto& r : recs) widths += (widths.empty() ? "" : ",") + std::to_string(r.vbytes);
  std::printf("%-34s esize=%d F=%lld tiles=%lld tw=%d stage=%lld (plain %lld) swz=%d vbytes=%s tbytes=%d ubytes=%d\n",
              cs.name.c_str(), esize, static_cast<long long>(F), static_cast<long long>(plan.tiles), p.tw,
              static_cast<long long>(plan.stage_bytes), static_cast<long long>(plan.plain_stage_bytes), p.swz_mask,
              widths.c_str(), p.tbytes, p.ubytes);
  auto check = [&]() -> bool {
    EXPECT(plan.plain_stage_bytes <= kMaxStageBytes && plan.stage_bytes <= kMaxStageBytes,
           "stage %lld / %lld bytes", static_cast<long long>(plan.plain_stage_bytes),
           static_cast<long long>(plan.stage_bytes));
    EXPECT(plan.stage_bytes % 16 == 0 && p.srow % 16 == 0, "stage rows not whole 16-byte slots");
    if (cs.want_tbytes) EXPECT(p.tbytes == cs.want_tbytes, "tbytes %d, expected %d", p.tbytes, cs.want_tbytes);
    if (cs.want_ubytes) EXPECT(p.ubytes == cs.want_ubytes, "ubytes %d, expected %d", p.ubytes, cs.want_ubytes);
    for (size_t i = 0; i < cs.want_vbytes.size(); ++i)
      EXPECT(recs[i].vbytes == cs.want_vbytes[i], "video %zu: vbytes %d, expected %d", i, recs[i].vbytes,
             cs.want_vbytes[i]);
    std::vector<PatchVideo> table;  // > kInlineVideos: the device table (here host memory)
    if (recs.size() <= static_cast<size_t>(kInlineVideos)) {
      std::copy(recs.begin(), recs.end(), p.videos);
    } else {
      table = recs;
      p.table = table.data();
    }

    for (int pass = 0; pass < 2; ++pass) {
      const unsigned char fill = pass == 0 ? 0x00 : 0xA7;
      // patchify: videos hold values, tokens are garbage before
      for (size_t i = 0; i < videos.size(); ++i) {
        const Video& v = videos[i];
        E* base = reinterpret_cast<E*>(v.buf);
        for (int64_t e = 0; e < v.off + v.extent; ++e) base[e] = value_of<E>((i << 40) ^ static_cast<uint64_t>(e));
      }
      std::memset(tok_buf, 0x5C, tok_bytes);
      emulate<E, true>(p, plan, fill);
      for (size_t i = 0; i < videos.size(); ++i) {
        const Video& v = videos[i];
        const E* base = reinterpret_cast<const E*>(v.buf);
        const PatchVideo& r = recs[i];
        for (int64_t gt = 0; gt < r.gt; ++gt)
          for (int64_t gh = 0; gh < r.gh; ++gh)
            for (int64_t gw = 0; gw < r.gw; ++gw) {
              const int64_t tok = r.token_begin + (gt * r.gh + gh) * r.gw + gw;
              for (int64_t c = 0; c < C; ++c)
                for (int64_t it = 0; it < pt; ++it)
                  for (int64_t ih = 0; ih < ph; ++ih)
                    for (int64_t iw = 0; iw < pw; ++iw) {
                      const int64_t f = ((c * pt + it) * ph + ih) * pw + iw;
                      const E want = base[at(v, c, gt * pt + it, gh * ph + ih, gw * pw + iw)];
                      EXPECT(tokens[tok * F + f] == want, "patchify pass %d: token %lld feature %lld", pass,
                             static_cast<long long>(tok), static_cast<long long>(f));
                    }
            }
      }
      for (int64_t e = 0; e < cs.token_off; ++e)
        EXPECT(reinterpret_cast<E*>(tok_buf)[e] == static_cast<E>(0x5C5C5C5Cu), "patchify wrote before the tokens");

      // unpatchify: tokens hold values, videos (and the gaps between their elements) a canary
      for (int64_t e = 0; e < n * F; ++e) tokens[e] = value_of<E>((uint64_t{1} << 50) ^ static_cast<uint64_t>(e));
      for (const Video& v : videos) std::memset(v.buf, 0xEE, static_cast<size_t>((v.off + v.extent) * esize));
      emulate<E, false>(p, plan, fill);
      for (size_t i = 0; i < videos.size(); ++i) {
        const Video& v = videos[i];
        const E* base = reinterpret_cast<const E*>(v.buf);
        const PatchVideo& r = recs[i];
        std::vector<char> is_element(static_cast<size_t>(v.off + v.extent), 0);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t t = 0; t < v.size[1]; ++t)
            for (int64_t h = 0; h < v.size[2]; ++h)
              for (int64_t w = 0; w < v.size[3]; ++w) {
                const int64_t e = at(v, c, t, h, w);
                is_element[static_cast<size_t>(e)] = 1;
                const int64_t tok = r.token_begin + ((t / pt) * r.gh + h / ph) * r.gw + w / pw;
                const int64_t f = ((c * pt + t % pt) * ph + h % ph) * pw + w % pw;
                EXPECT(base[e] == tokens[tok * F + f], "unpatchify pass %d: video %zu element (%lld, %lld, %lld, %lld)",
                       pass, i, static_cast<long long>(c), static_cast<long long>(t), static_cast<long long>(h),
                       static_cast<long long>(w));
              }
        for (int64_t e = 0; e < v.off + v.extent; ++e)
          if (!is_element[static_cast<size_t>(e)])
            EXPECT(base[e] == static_cast<E>(0xEEEEEEEEu), "unpatchify wrote outside video %zu (element %lld)", i,
                   static_cast<long long>(e));
      }
    }
    return true;
  };
  ok = check();
  for (auto& v : videos) std::free(v.buf);
  std::free(tok_buf);
  return ok;
}

bool run(const Case& cs) {
  return cs.esize == 4 ? run_case<uint32_t>(cs) : run_case<uint16_t>(cs);
}

std::vector<VideoSpec> all_layouts(int64_t t, int64_t h, int64_t w) {
  std::vector<VideoSpec> out;
  int64_t off = 1;
  for (Layout l : {kContiguous, kOffset, kPadded, kPadded16, kWOuter, kWStep2, kWSlice, kOddUnitStrides})
    out.push_back({t, h, w, l, off++});
  return out;
}

}  // namespace

int main() {
  bool ok = check_divisor();
  std::vector<Case> cases;
  // the measured workload ("mixed-pack", C = 16, bfloat16, patch 1x2x2): W = 52 rows are
  // 104 bytes, so that video takes 8-byte accesses and the others 16
  cases.push_back({"mixed-pack", 2, 16, {1, 2, 2},
                   {{21, 60, 104, kContiguous, 0}, {13, 30, 52, kContiguous, 0}, {1, 90, 160, kContiguous, 0}},
                   0, 16, 4, {16, 8, 16}});
  cases.push_back({"mixed-pack fp32", 4, 16, {1, 2, 2},
                   {{21, 60, 104, kContiguous, 0}, {13, 30, 52, kContiguous, 0}, {1, 90, 160, kContiguous, 0}},
                   0, 16, 8, {16, 16, 16}});
  const int64_t patches[][3] = {{1, 2, 2}, {2, 2, 2}, {1, 1, 1}, {1, 4, 4}, {2, 1, 3}, {1, 2, 1}, {1, 8, 8},
                                {1, 1, 16}};
  for (int esize : {2, 4}) {
    for (const auto& ps : patches) {
      for (int64_t C : {1, 3, 4, 16, 48}) {
        if (C == 48 && ps[1] * ps[2] > 16) continue;
        const int64_t pt = ps[0], ph = ps[1], pw = ps[2];
        auto dims = [&](int64_t t, int64_t h, int64_t w) { return VideoSpec{t * pt, h * ph, w * pw, kContiguous, 0}; };
        std::vector<VideoSpec> mixed;
        // 1x1 grids, one-frame videos, odd widths, several tiles per token row
        for (auto s : {dims(1, 1, 1), dims(1, 3, 5), dims(2, 2, 7), dims(3, 1, 1), dims(1, 2, 200)}) mixed.push_back(s);
        for (auto s : all_layouts(2 * pt, 3 * ph, 9 * pw)) mixed.push_back(s);
        for (auto s : all_layouts(pt, ph, 1 * pw)) mixed.push_back(s);
        for (auto s : all_layouts(pt, 2 * ph, 64 * pw)) mixed.push_back(s);
        for (int64_t token_off : {0, 1, 3}) {
          Case cs{"C=" + std::to_string(C) + " patch=" + std::to_string(pt) + "x" + std::to_string(ph) + "x" +
                      std::to_string(pw) + " tokens+" + std::to_string(token_off),
                  esize, C, {pt, ph, pw}, mixed, token_off, 0, 0, {}};
          cases.push_back(cs);
        }
      }
    }
  }
  // > kInlineVideos videos: the records come from a table; exactly kInlineVideos: every
  // inline record used, and one more: the first pack that takes the table
  {
    std::vector<VideoSpec> many;
    for (int i = 0; i < 70; ++i) many.push_back({2, 2, i % 3 ? 2 : 4 + 2 * (i % 5), i % 4 ? kContiguous : kOffset, i % 7});
    cases.push_back({"70 videos", 2, 4, {1, 2, 2}, many, 0, 0, 0, {}});
    cases.push_back({"70 videos fp32", 4, 4, {1, 2, 2}, many, 1, 0, 0, {}});
    for (int n : {kInlineVideos, kInlineVideos + 1}) {
      cases.push_back({std::to_string(n) + " videos", 2, 4, {1, 2, 2},
                       std::vector<VideoSpec>(many.begin(), many.begin() + n), 0, 0, 0, {}});
    }
  }
  // the largest tiles: rows = 3072 (stage exactly at the limit), and a stage whose slot
  // permutation padding does not fit (the plain layout runs)
  cases.push_back({"3072 rows", 2, 3072, {1, 1, 1}, {{1, 2, 5, kContiguous, 0}, {2, 1, 3, kPadded, 0}}, 0, 0, 0, {}});
  // tw = 5 tokens of 3 KB: a tile of a wide token row starts 10 bytes after the previous
  // one, so 16-byte aligned rows still take 2-byte accesses
  cases.push_back({"tiles start unaligned", 2, 1536, {1, 1, 1},
                   {{1, 1, 32, kContiguous, 0}, {2, 2, 16, kPadded16, 0}}, 0, 0, 0, {2, 2}});
  // the channel stride alone decides the width: planes one element apart leave channel 1
  // at an odd element, so 2-byte (bf16) / 4-byte (fp32) accesses, never the rows' 16
  for (int esize : {2, 4}) {
    cases.push_back({"channel planes unaligned", esize, 3, {1, 2, 2}, {{2, 4, 16, kPaddedChannels, 0}}, 0, 0, 0,
                     {esize}});
  }
  cases.push_back({"no room for the permutation", 2, 800, {1, 1, 24},
                   {{1, 1, 48, kContiguous, 0}, {2, 2, 24, kWSlice, 0}}, 0, 0, 0, {}});
  for (const Case& cs : cases) ok = run(cs) && ok;
  std::printf(ok && failures == 0 ? "ALL OK\n" : "FAILED (%d)\n", failures);
  return ok && failures == 0 ? 0 : 1;
}
