/* The machine's peak float32 multiply-add rate, to say how close a kernel
 * is to it: twelve independent chains of AVX-512 FMAs, on one thread and
 * then on two at once.
 *
 *   gcc -O3 -mavx512f -pthread tools/bench/peak_fma.c -o /tmp/peak_fma && /tmp/peak_fma
 *
 * Counts 2 FLOP per multiply-add (32 per 16-lane instruction). */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 12
#define STEPS 20000000L

static double run(void) {
    __m512 acc[CHAINS];
    __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long n = 0; n < STEPS; n++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    float sum = 0;
    for (int i = 0; i < CHAINS; i++) sum += _mm512_reduce_add_ps(acc[i]);
    if (sum == 1234.5f) printf("(unlikely)\n"); /* keeps the chains live */
    double s = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    return (double)STEPS * CHAINS * 32 / s / 1e9;
}

static void *thread(void *out) {
    *(double *)out = run();
    return NULL;
}

int main(void) {
    printf("1 thread: %.0f GFLOP/s\n", run());
    pthread_t t[2];
    double r[2];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, thread, &r[i]);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    printf("2 threads: %.0f GFLOP/s in all\n", r[0] + r[1]);
    return 0;
}
