// One whole decode step of the LFM2 language model (T = 1, B rows) in native code.
//
// Why: at 450M shapes a decode step reads ~700 MB of weights in ~100 products, but the torch path also runs ~700
// small ops (norms, gates, conv taps, RoPE, residuals) and ~100 Python calls between them, a large share of the
// step during which the pool's helper thread idles. Here the products of one layer that read the same input (q/k/v;
// w1/w3) run as one pool job and everything in between is a few loops over D values.
//
// Same math as model/text.py + speed.py with the activation dtype's rounding at the same points: with bf16
// activations every intermediate the torch path stores as a bf16 tensor is rounded to bf16 here too (`rnd`), the
// norms / conv / attention do their fp32 math as torch does, so results differ from torch only by summation order.
#include "decode_ops.h"
#include "gemv.h"

#include <math.h>
#include <string.h>
#include <stdlib.h>

#include <vector>

extern "C" {

// A linear layer: weight (N, K) of `kind` (0 bf16, 1 fp32, 2 int8 + fp32 row scales S, 3 int4 packed (N, K/2) + fp16
// group scales S (N, K/32), read through i4_scale), optional fp32 bias.
struct DLin {
    const void* W;
    const float* S;
    const float* bias;
    int64_t N, K;
    int64_t kind;
};

// One decoder layer. mix: conv layers use [0] in_proj, [1] out_proj; attention layers [0..3] q, k, v, out.
// Norm / conv weights are in the activation dtype.
struct DLayer {
    int64_t is_attn;
    const void* op_norm;
    const void* ffn_norm;
    DLin mix[4];
    DLin ff[3];  // w1, w3, w2
    const void* conv_w;  // (D, Kc)
    const void* conv_b;  // (D) or NULL
    const void* q_norm;  // (Dh)
    const void* k_norm;
};

struct DModel {
    int64_t D, H, Hkv, Dh, Kc, n_layers;
    int64_t act_dt;  // 0 fp32, 1 bf16 (activations, caches, norm and conv weights)
    double eps;
    const void* final_norm;
    DLin head;
    const DLayer* layers;
    const float* inv_freq;  // (Dh/2) RoPE frequencies, fp32
};

}  // extern "C"

namespace {

struct Step {
    const DModel& m;
    int dt;
    int64_t B;
    int threads;
    bool v512 = lfm2vl_isa() >= 2;  // the AVX512 loops of decode_ops.h

    float rnd(float v) const { return dt == 1 ? bf16_to_f32(f32_to_bf16(v)) : v; }
    float ld(const void* p, int64_t i) const {
        return dt == 1 ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
    }
    void st(void* p, int64_t i, float v) const {
        if (dt == 1) ((uint16_t*)p)[i] = f32_to_bf16(v);
        else ((float*)p)[i] = v;
    }

    // RMSNorm of `rows` vectors of n values: normalise in fp32, round, then multiply by the weight and round.
    void rmsnorm(const float* x, const void* w, float* out, int64_t rows, int64_t n) const {
        if (v512) {
            for (int64_t r = 0; r < rows; r++) rmsnorm_avx512(x + r * n, w, out + r * n, n, (float)m.eps, dt == 1);
            return;
        }
        for (int64_t r = 0; r < rows; r++) {
            const float* xr = x + r * n;
            double ss = 0.0;
            for (int64_t i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
            float inv = 1.0f / sqrtf((float)(ss / n) + (float)m.eps);
            for (int64_t i = 0; i < n; i++) out[r * n + i] = rnd(ld(w, i) * rnd(xr[i] * inv));
        }
    }

    // Products that share the input x (B, K) as one pool job; outputs rounded to the activation dtype.
    void linears(const DLin* const* L, float* const* y, int n, const float* x, std::vector<uint16_t>& xb) const {
        const int64_t K = L[0]->K;
        if (dt == 1) {  // x holds bf16 values: their bits are the dot-product path's input (exact)
            xb.resize(B * K);
            if (v512) bf16_bits_avx512(x, xb.data(), B * K);
            else for (int64_t i = 0; i < B * K; i++) xb[i] = f32_to_bf16(x[i]);
        }
        LinearArgs a[4];
        for (int i = 0; i < n; i++)
            linear_setup(a[i], (int)L[i]->kind, L[i]->W, L[i]->S, dt == 1 ? (const void*)xb.data() : (const void*)x,
                         x, dt, y[i], 0, L[i]->bias, B, L[i]->N, K);
        linear_many(a, n, threads);
        if (dt == 1)
            for (int i = 0; i < n; i++) {
                if (v512) round_avx512(y[i], B * L[i]->N);
                else for (int64_t j = 0; j < B * L[i]->N; j++) y[i][j] = rnd(y[i][j]);
            }
    }

    // h += b, rounded to the activation dtype (a residual)
    void add(float* h, const float* b, int64_t n) const {
        if (v512) add_avx512(h, b, n, dt == 1);
        else for (int64_t i = 0; i < n; i++) h[i] = rnd(h[i] + b[i]);
    }
};

}  // namespace

extern "C" {

// h_in (B, D) input embeddings; cache[2 i], cache[2 i + 1]: layer i's conv state (Bc, D, Kc-1) and NULL, or its
// K and V buffers (Bc, Hkv, S, Dh); rows (B,) cache row of each input row or NULL (row b); pos (B,) positions
// (all < S); logits (B, V) out. All in the activation dtype.
void lfm2vl_decode_step(const DModel* mp, void* const* cache, int64_t S, const void* h_in, const int64_t* rows,
                        const int64_t* pos, void* logits, int64_t B, int threads) {
    const DModel& m = *mp;
    Step s{m, (int)m.act_dt, B, threads};
    const int64_t D = m.D, H = m.H, Hkv = m.Hkv, Dh = m.Dh, Kc = m.Kc, half = Dh / 2;
    int64_t widest = 3 * D;
    for (int64_t l = 0; l < m.n_layers; l++) widest = widest > m.layers[l].ff[0].N ? widest : m.layers[l].ff[0].N;
    std::vector<float> h(B * D), x(B * (D > H * Dh ? D : H * Dh)), a(B * widest), b(B * widest), c(B * (H + 2 * Hkv) * Dh);
    std::vector<float> att(B * H * Dh);
    std::vector<uint16_t> xb;
    std::vector<int64_t> lens(B);
    for (int64_t i = 0; i < B * D; i++) h[i] = s.ld(h_in, i);
    // RoPE: each row's angles float32(pos) * inv_freq in fp32, their cos and sin rounded to the activation dtype
    // (model/rope.py; the first and second half of a head share them)
    std::vector<float> rcos(B * half), rsin(B * half);
    for (int64_t r = 0; r < B; r++)
        for (int64_t i = 0; i < half; i++) {
            const float angle = (float)pos[r] * m.inv_freq[i];
            rcos[r * half + i] = s.rnd(cosf(angle));
            rsin[r * half + i] = s.rnd(sinf(angle));
        }
    const float qscale = (float)pow((double)Dh, -0.5);

    for (int64_t l = 0; l < m.n_layers; l++) {
        const DLayer& L = m.layers[l];
        s.rmsnorm(h.data(), L.op_norm, x.data(), B, D);
        if (!L.is_attn) {
            const DLin* in[1] = {&L.mix[0]};
            float* out[1] = {a.data()};
            s.linears(in, out, 1, x.data(), xb);  // (B, 3D): B gate, C gate, x
            void* state = cache[2 * l];
            for (int64_t r = 0; r < B; r++) {
                const float* p = a.data() + r * 3 * D;
                const int64_t cr = rows ? rows[r] : r;
                const bool fresh = pos[r] > 0;  // a row starting at position 0 has an empty conv state
                if (s.v512 && Kc <= 16) {
                    conv_avx512(p, (char*)state + cr * D * (Kc - 1) * (s.dt == 1 ? 2 : 4), L.conv_w, L.conv_b,
                                x.data() + r * D, D, Kc, fresh, s.dt == 1);
                    continue;
                }
                for (int64_t d = 0; d < D; d++) {
                    float ue[16];
                    const int64_t so = (cr * D + d) * (Kc - 1);
                    for (int64_t j = 0; j < Kc - 1; j++) ue[j] = fresh ? s.ld(state, so + j) : 0.f;
                    ue[Kc - 1] = s.rnd(p[d] * p[2 * D + d]);  // u = B * x
                    float y = ue[0] * s.ld(L.conv_w, d * Kc);
                    for (int64_t j = 1; j < Kc; j++) y = y + ue[j] * s.ld(L.conv_w, d * Kc + j);
                    if (L.conv_b) y = y + s.ld(L.conv_b, d);
                    for (int64_t j = 0; j < Kc - 1; j++) s.st(state, so + j, ue[j + 1]);
                    x[r * D + d] = s.rnd(p[D + d] * s.rnd(y));  // C * conv(u)
                }
            }
            const DLin* o[1] = {&L.mix[1]};
            float* oy[1] = {b.data()};
            s.linears(o, oy, 1, x.data(), xb);
        } else {
            float* q = c.data();
            float* k = q + B * H * Dh;
            float* v = k + B * Hkv * Dh;
            const DLin* in[3] = {&L.mix[0], &L.mix[1], &L.mix[2]};
            float* out[3] = {q, k, v};
            s.linears(in, out, 3, x.data(), xb);
            s.rmsnorm(q, L.q_norm, q, B * H, Dh);  // per head
            s.rmsnorm(k, L.k_norm, k, B * Hkv, Dh);
            for (int64_t r = 0; r < B; r++) {  // NeoX RoPE: x*cos + rotate_half(x)*sin, rounded per op
                for (int64_t hh = 0; hh < H + Hkv; hh++) {
                    float* t = hh < H ? q + (r * H + hh) * Dh : k + (r * Hkv + hh - H) * Dh;
                    float tmp[512];
                    const float* cr = rcos.data() + r * half;
                    const float* sr = rsin.data() + r * half;
                    if (s.v512) {
                        rope_avx512(t, cr, sr, Dh, s.dt == 1);
                        continue;
                    }
                    for (int64_t i = 0; i < Dh; i++) {
                        float rot = i < half ? -t[i + half] : t[i - half];
                        tmp[i] = s.rnd(s.rnd(t[i] * cr[i % half]) + s.rnd(rot * sr[i % half]));
                    }
                    memcpy(t, tmp, sizeof(float) * Dh);
                }
                const int64_t cr = rows ? rows[r] : r;
                for (int64_t hh = 0; hh < Hkv; hh++) {
                    const int64_t off = ((cr * Hkv + hh) * S + pos[r]) * Dh;
                    if (s.v512) {
                        store_avx512(cache[2 * l], off, k + (r * Hkv + hh) * Dh, Dh, s.dt == 1);
                        store_avx512(cache[2 * l + 1], off, v + (r * Hkv + hh) * Dh, Dh, s.dt == 1);
                        continue;
                    }
                    for (int64_t i = 0; i < Dh; i++) {
                        s.st(cache[2 * l], off + i, k[(r * Hkv + hh) * Dh + i]);
                        s.st(cache[2 * l + 1], off + i, v[(r * Hkv + hh) * Dh + i]);
                    }
                }
                lens[r] = pos[r] + 1;
            }
            for (int64_t i = 0; i < B * H * Dh; i++) q[i] *= qscale;
            int64_t n = 0;
            for (int64_t r = 0; r < B; r++) n = lens[r] > n ? lens[r] : n;
            attn_decode_run(q, cache[2 * l], cache[2 * l + 1], NULL, rows, lens.data(), att.data(), B, H, Hkv, n, Dh,
                            Hkv * S * Dh, S * Dh, Dh, s.dt, threads);
            if (s.dt == 1 && s.v512) {
                memcpy(x.data(), att.data(), sizeof(float) * B * H * Dh);
                round_avx512(x.data(), B * H * Dh);
            } else {
                for (int64_t i = 0; i < B * H * Dh; i++) x[i] = s.rnd(att[i]);
            }
            const DLin* o[1] = {&L.mix[3]};
            float* oy[1] = {b.data()};
            s.linears(o, oy, 1, x.data(), xb);
        }
        s.add(h.data(), b.data(), B * D);  // residual
        s.rmsnorm(h.data(), L.ffn_norm, x.data(), B, D);
        const DLin* up[2] = {&L.ff[0], &L.ff[1]};
        float* upy[2] = {a.data(), b.data()};
        s.linears(up, upy, 2, x.data(), xb);
        const int64_t F = L.ff[0].N;
        if (lfm2vl_isa() >= 2) {
            silu_mul_avx512(a.data(), b.data(), B * F, s.dt == 1);
        } else {
            for (int64_t i = 0; i < B * F; i++) {
                float g = a[i];
                a[i] = s.rnd(s.rnd(g / (1.0f + expf(-g))) * b[i]);  // silu(w1 x) * w3 x
            }
        }
        const DLin* down[1] = {&L.ff[2]};
        float* dy[1] = {b.data()};
        s.linears(down, dy, 1, a.data(), xb);
        s.add(h.data(), b.data(), B * D);
    }
    s.rmsnorm(h.data(), m.final_norm, x.data(), B, D);
    // the output head writes the logits in the activation dtype directly
    if (s.dt == 1) {
        xb.resize(B * D);
        if (s.v512) bf16_bits_avx512(x.data(), xb.data(), B * D);
        else for (int64_t i = 0; i < B * D; i++) xb[i] = f32_to_bf16(x[i]);
    }
    LinearArgs hd;
    linear_setup(hd, (int)m.head.kind, m.head.W, m.head.S, s.dt == 1 ? (const void*)xb.data() : (const void*)x.data(),
                 x.data(), s.dt, logits, s.dt, m.head.bias, B, m.head.N, D);
    linear_many(&hd, 1, threads);
}

}  // extern "C"
