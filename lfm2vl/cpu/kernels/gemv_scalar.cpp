// The scalar rows of gemv.cpp's products (any CPU, and the reference the tests cap the instruction set down to).
#include "gemv.h"
#include <stdint.h>

void bf16w_scalar(const uint16_t* W, const float* X, void* Y, const float* bias, int64_t M, int64_t n0, int64_t n1,
                  int64_t N, int64_t K, int ydt) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) {
            float acc = 0.f;
            const uint16_t* w = W + n * K;
            const float* x = X + m * K;
            for (int64_t k = 0; k < K; k++) acc += bf16_to_f32(w[k]) * x[k];
            store_out(Y, ydt, m * N + n, acc + (bias ? bias[n] : 0.f));
        }
}

void f32w_scalar(const float* W, const float* X, void* Y, const float* bias, int64_t M, int64_t n0, int64_t n1,
                 int64_t N, int64_t K, int ydt) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += W[n * K + k] * X[m * K + k];
            store_out(Y, ydt, m * N + n, acc + (bias ? bias[n] : 0.f));
        }
}

void i8w_scalar(const int8_t* W, const float* S, const float* X, void* Y, const float* bias, int64_t M, int64_t n0,
                int64_t n1, int64_t N, int64_t K, int ydt) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += (float)W[n * K + k] * X[m * K + k];
            store_out(Y, ydt, m * N + n, acc * S[n] + (bias ? bias[n] : 0.f));
        }
}

void i4w_scalar(const uint8_t* W, const float* S, const float* X, void* Y, const float* bias, int64_t M, int64_t n0,
                int64_t n1, int64_t N, int64_t K, int ydt) {
    const int64_t G = K / I4_GROUP;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) {
            const uint8_t* row = W + n * (K / 2);
            float acc = 0.f;
            for (int64_t g = 0; g < G; g++) {
                float part = 0.f;
                for (int64_t i = 0; i < I4_GROUP; i++) part += i4_at(row, g * I4_GROUP + i) * X[m * K + g * I4_GROUP + i];
                acc += part * i4_scale(S, n * G + g);
            }
            store_out(Y, ydt, m * N + n, acc + (bias ? bias[n] : 0.f));
        }
}
