// The exp stage of the CPU row pass in one read of each row (grao_fast/_native.py builds it).
//
// For each row r of x ([rows, V], unit stride along V):
//   row_max[r] = max_v x[r, v]
//   out[r, v]  = exp((x[r, v] - row_max[r]) * inv_t)      (out may be x itself, or NULL)
//   total[r]   = sum_v out[r, v]
// and, given each row's gradient coefficient g (when it does not depend on the row's log-prob),
// the gradient row itself while the row is in cache: out[r] *= -g[r] / total[r], then
// out[r, label[r]] += g[r], the operations and roundings of the eager scale pass.
// A row with keep[r] == 0 (an ignored token, or a label outside the vocabulary) is not read:
// row_max[r] = 0, total[r] = 1 and out[r] = 0, its gradient.
// The subtraction and scaling round as PyTorch's eager `(x - max) * inv_t` does. exp is a
// Cephes-style polynomial (within 2 ulp of the float32 exp; 0 below -87, where float32 keeps
// less than 2^-125 of it). The sum is pairwise: 16-lane partial sums over blocks of 256, the
// blocks added in a binary tree, an error that grows like log2(V / 256) + 16, as torch.sum's.
// A NaN in a row makes its total NaN. Vectors are GCC (12+) / Clang vector extensions: 16 lanes,
// which the compiler maps onto the AVX-512, AVX2, SSE or NEON registers of the machine it
// builds for.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int W = 16;      // lanes
constexpr int BLOCK = 256; // elements per block of the pairwise sum
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(float))));
typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
typedef float v4 __attribute__((vector_size(4 * sizeof(float))));

inline vf splat(float a) { return vf{} + a; }
inline vf select(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
inline vf load(const float *p) { vf v; std::memcpy(&v, p, sizeof v); return v; }

// exp(z) for z <= 0; NaN stays NaN.
inline vf vexp(vf z) {
    const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    vf t = z * splat(1.44269504088896341f) + magic;
    vf k = t - magic;  // round(z / ln 2)
    vf r = z - k * splat(0.693359375f) - k * splat(-2.12194440e-4f);  // ln 2 in two parts
    vf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * (r * r) + r + splat(1.0f);
    vi two_k = ((vi)t - (vi)magic + 127) << 23;  // 2^k, k >= -126 where it is used
    return select(z < splat(-87.0f), splat(0.0f), p * (vf)two_k);
}

inline float lanes_max(vf v) {
    float m = v[0];
    for (int i = 1; i < W; i++) m = v[i] > m ? v[i] : m;
    return m;
}

inline float lanes_sum(vf v) {  // halves added in a tree
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// out = exp((x - m) * s) for n <= W elements (the row's tail: padded with -inf, whose exp is 0)
inline vf tail(const float *x, float *out, int64_t n, vf m, vf s, bool scale) {
    vf a = splat(-INFINITY);
    std::memcpy(&a, x, n * sizeof(float));
    vf e = vexp(scale ? (a - m) * s : a - m);
    if (out) std::memcpy(out, &e, n * sizeof(float));
    return e;
}

}  // namespace

extern "C" void grao_row_exp(const float *x, float *out, int64_t row_begin, int64_t row_end,
                             int64_t v, int64_t x_stride, int64_t out_stride, float inv_t,
                             float *row_max, float *total, const float *g,
                             const int64_t *label, const uint8_t *keep) {
    const bool scale = inv_t != 1.0f;  // at T = 1 eager PyTorch skips the multiplication
    const vf s = splat(inv_t);
    const int64_t full = v / W * W;
    for (int64_t r = row_begin; r < row_end; r++) {
        const float *xr = x + r * x_stride;
        float *orow = out ? out + r * out_stride : nullptr;
        if (keep && !keep[r]) {
            row_max[r] = 0.0f;
            total[r] = 1.0f;
            if (orow) std::memset(orow, 0, v * sizeof(float));
            continue;
        }
        vf mv = splat(-INFINITY);
        for (int64_t i = 0; i < full; i += W) {
            vf a = load(xr + i);
            mv = select(a > mv, a, mv);
        }
        float mx = lanes_max(mv);
        for (int64_t i = full; i < v; i++) mx = xr[i] > mx ? xr[i] : mx;
        row_max[r] = mx;
        const vf m = splat(mx);
        // The next row read, fetched into cache while this one's exps are computed.
        int64_t n = r + 1;
        while (keep && n < row_end && !keep[n]) n++;
        const float *xn = n < row_end ? x + n * x_stride : nullptr;
        float levels[64];  // levels[h]: the sum of 2^h consecutive blocks (a binary counter)
        int used = 0;
        for (int64_t b = 0, count = 0; b < v; b += BLOCK, count++) {
            const int64_t end = b + BLOCK < v ? b + BLOCK : v;
            vf acc = splat(0.0f);
            int64_t i = b;
            for (; i + W <= end; i += W) {
                if (xn) __builtin_prefetch(xn + i, 0, 2);
                vf a = load(xr + i);
                vf e = vexp(scale ? (a - m) * s : a - m);
                if (orow) std::memcpy(orow + i, &e, sizeof e);
                acc += e;
            }
            if (i < end) acc += tail(xr + i, orow ? orow + i : nullptr, end - i, m, s, scale);
            float sum = lanes_sum(acc);
            for (int64_t c = count; c & 1; c >>= 1) sum += levels[--used];
            levels[used++] = sum;
        }
        float sum = 0.0f;
        while (used) sum += levels[--used];
        total[r] = sum;
        if (g == nullptr || orow == nullptr) continue;
        const vf c = splat(-g[r] / sum);
        int64_t i = 0;
        for (; i + W <= v; i += W) {
            vf e = load(orow + i) * c;
            std::memcpy(orow + i, &e, sizeof e);
        }
        for (; i < v; i++) orow[i] *= c[0];
        orow[label[r]] += g[r];
    }
}
