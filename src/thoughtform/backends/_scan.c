/* One pass over a decode step's logits, for thoughtform.backends.logits.

   scan(x, k, out) -> (m, s, sd, count)
       m     the largest value of x (NaN ignored; -inf if none is larger)
       s     sum of exp(x_i - m)
       sd    sum of exp(x_i - m) * (x_i - m), so that log Z = m + log s and H = log s - sd / s
             (every term <= 0: no cancellation; terms whose exp underflows are left out)
       count how many ids out[0:count] holds: the k largest finite values' ids, largest first,
             ties by lower id (fewer when fewer are finite; none when out is None, k is 0
             or the maximum is not finite: logits.scan takes its numpy path then)

   x is a C-contiguous float32 vector, out a writable intp vector at least as long (it holds
   the candidates on the way). Why compiled: the numpy path makes eight to ten calls over the
   vocabulary each step (max, compare, nonzero, subtract, exp, sum, dot, sort); right after a
   decode each costs 2-5x its warm time (the caches hold the model's weights). Measured in
   the decode loop of the embedded model: 0.73 -> 0.56 ms a token outside the decode.

   The candidates are the values within a margin of the maximum (8 nats, then x1.5 until k
   are in: the rule of logits.top_indices), found in the same pass as the sums, and ranked by
   a k-sized heap. The pass is built for AVX2+FMA when the CPU has them (chosen once at
   import), else plain C; exp is Cephes' single-precision polynomial (within 2 ulp of expf
   over [-87, 0]). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TF_X86 1
#include <immintrin.h>
#endif

/* Below this, exp(d) is under float's smallest normal: left out of both sums. */
#define TF_UNDER (-87.0f)

typedef struct {
    double m, s, sd;
    Py_ssize_t count;
} scan_result;

/* The scalar step over x[from:n]: the sums' terms and the candidates >= thr, added to *r
   (the whole vector in the plain path, the tail after the last 8-wide block in the AVX2 one). */
static void scan_tail(const float *x, Py_ssize_t from, Py_ssize_t n, float m, float thr,
                      Py_ssize_t *out, scan_result *r) {
    double s = r->s, sd = r->sd;
    Py_ssize_t c = r->count;
    for (Py_ssize_t i = from; i < n; i++) {
        const float v = x[i];
        const float d = v - m;
        if (d >= TF_UNDER) {
            const float e = expf(d);
            s += e;
            sd += (double)e * d;
        }
        if (v >= thr) out[c++] = i;
    }
    r->s = s;
    r->sd = sd;
    r->count = c;
}

static void scan_plain(const float *x, Py_ssize_t n, float margin, Py_ssize_t *out,
                       scan_result *r) {
    float m = -INFINITY;
    for (Py_ssize_t i = 0; i < n; i++)
        if (x[i] > m) m = x[i];
    *r = (scan_result){m, 0.0, 0.0, 0};
    scan_tail(x, 0, n, m, m - margin, out, r);
}

/* The indices of x[from:n] >= thr, written to out from position c; returns the new count. */
static Py_ssize_t above_plain(const float *x, Py_ssize_t from, Py_ssize_t n, float thr,
                              Py_ssize_t *out, Py_ssize_t c) {
    for (Py_ssize_t i = from; i < n; i++)
        if (x[i] >= thr) out[c++] = i;
    return c;
}

#ifdef TF_X86
__attribute__((target("avx2,fma"))) static inline __m256 exp8(__m256 x) {
    /* Cephes expf: x = k ln2 + r, |r| <= ln2/2, exp(r) by a degree-5 polynomial, 2^k by
       the exponent bits. Inputs are clamped below; callers mask d < TF_UNDER to 0. */
    const __m256 lo = _mm256_set1_ps(-88.3762626647949f);
    x = _mm256_max_ps(x, lo);
    __m256 k = _mm256_floor_ps(
        _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) static inline double hsum4(__m256d v) {
    __m128d a = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(a, _mm_unpackhi_pd(a, a)));
}

__attribute__((target("avx2,fma"))) static void scan_avx2(const float *x, Py_ssize_t n,
                                                          float margin, Py_ssize_t *out,
                                                          scan_result *r) {
    Py_ssize_t i = 0, n8 = n & ~(Py_ssize_t)7;
    /* max: NaN lanes keep the accumulator (maxps returns its second operand on NaN) */
    __m256 acc = _mm256_set1_ps(-INFINITY);
    for (; i < n8; i += 8) acc = _mm256_max_ps(_mm256_loadu_ps(x + i), acc);
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    float m = -INFINITY;
    for (int j = 0; j < 8; j++)
        if (lanes[j] > m) m = lanes[j];
    for (; i < n; i++)
        if (x[i] > m) m = x[i];

    const __m256 vm = _mm256_set1_ps(m), vthr = _mm256_set1_ps(m - margin);
    const __m256 under = _mm256_set1_ps(TF_UNDER);
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    __m256d p0 = _mm256_setzero_pd(), p1 = _mm256_setzero_pd();
    Py_ssize_t c = 0;
    for (i = 0; i < n8;) {
        /* Sums in float over blocks of 128 values, then in double: the conversions cost as
           much as the exp when made for every vector; a block's float error is ~1e-7 of it. */
        __m256 fs = _mm256_setzero_ps(), fp = _mm256_setzero_ps();
        const Py_ssize_t end = i + 128 < n8 ? i + 128 : n8;
        for (; i < end; i += 8) {
            const __m256 v = _mm256_loadu_ps(x + i);
            const __m256 d = _mm256_sub_ps(v, vm);
            const __m256 keep = _mm256_cmp_ps(d, under, _CMP_GE_OQ); /* false: -inf, NaN */
            const __m256 e = _mm256_and_ps(keep, exp8(d));
            fs = _mm256_add_ps(fs, e);
            fp = _mm256_add_ps(fp, _mm256_and_ps(keep, _mm256_mul_ps(e, d))); /* 0 at -inf */
            unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, vthr, _CMP_GE_OQ));
            while (bits) {
                out[c++] = i + __builtin_ctz(bits);
                bits &= bits - 1;
            }
        }
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(fs)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(fs, 1)));
        p0 = _mm256_add_pd(p0, _mm256_cvtps_pd(_mm256_castps256_ps128(fp)));
        p1 = _mm256_add_pd(p1, _mm256_cvtps_pd(_mm256_extractf128_ps(fp, 1)));
    }
    *r = (scan_result){m, hsum4(_mm256_add_pd(s0, s1)), hsum4(_mm256_add_pd(p0, p1)), c};
    scan_tail(x, n8, n, m, m - margin, out, r);
}

__attribute__((target("avx2"))) static Py_ssize_t above_avx2(const float *x, Py_ssize_t n,
                                                             float thr, Py_ssize_t *out) {
    Py_ssize_t i = 0, c = 0, n8 = n & ~(Py_ssize_t)7;
    const __m256 vthr = _mm256_set1_ps(thr);
    for (; i < n8; i += 8) {
        unsigned bits =
            (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vthr, _CMP_GE_OQ));
        while (bits) {
            out[c++] = i + __builtin_ctz(bits);
            bits &= bits - 1;
        }
    }
    return above_plain(x, n8, n, thr, out, c);
}
#endif

static int use_avx2 = 0;

static Py_ssize_t above(const float *x, Py_ssize_t n, float thr, Py_ssize_t *out) {
#ifdef TF_X86
    if (use_avx2) return above_avx2(x, n, thr, out);
#endif
    return above_plain(x, 0, n, thr, out, 0);
}

/* Ranking: a heap of the k best so far, its root the worst of them. */
typedef struct {
    float v;
    Py_ssize_t i;
} cand;

static inline int better(cand a, cand b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }

static void sift(cand *h, Py_ssize_t size, Py_ssize_t j) {
    for (;;) {
        Py_ssize_t l = 2 * j + 1, w = j;
        if (l < size && better(h[w], h[l])) w = l;
        if (l + 1 < size && better(h[w], h[l + 1])) w = l + 1;
        if (w == j) return;
        cand t = h[j];
        h[j] = h[w];
        h[w] = t;
        j = w;
    }
}

/* The k best of candidates ids[0:c] (any order) into ids[0:min(k, c)], best first. */
static Py_ssize_t rank(const float *x, Py_ssize_t *ids, Py_ssize_t c, Py_ssize_t k, cand *h) {
    if (k > c) k = c;
    for (Py_ssize_t j = 0; j < k; j++) h[j] = (cand){x[ids[j]], ids[j]};
    for (Py_ssize_t j = k / 2 - 1; j >= 0; j--) sift(h, k, j);
    for (Py_ssize_t j = k; j < c; j++) {
        cand e = {x[ids[j]], ids[j]};
        if (better(e, h[0])) {
            h[0] = e;
            sift(h, k, 0);
        }
    }
    for (Py_ssize_t size = k; size > 0; size--) { /* the worst goes last */
        ids[size - 1] = h[0].i;
        h[0] = h[size - 1];
        sift(h, size - 1, 0);
    }
    return k;
}

/* x (float32, contiguous, 1-D) and out (intp, writable, >= len(x), or None: ob->buf NULL). */
static int get_buffers(PyObject *xo, PyObject *oo, Py_buffer *xb, Py_buffer *ob) {
    if (PyObject_GetBuffer(xo, xb, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (xb->ndim != 1 || xb->itemsize != 4 || xb->format == NULL || strcmp(xb->format, "f") != 0) {
        PyBuffer_Release(xb);
        PyErr_SetString(PyExc_TypeError, "x must be a contiguous 1-D float32 array");
        return -1;
    }
    if (oo == Py_None) {
        ob->buf = NULL;
        return 0;
    }
    if (PyObject_GetBuffer(oo, ob, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(xb);
        return -1;
    }
    const char *f = ob->format;
    int intp = f != NULL && ob->itemsize == (Py_ssize_t)sizeof(Py_ssize_t) &&
               (strcmp(f, "l") == 0 || strcmp(f, "q") == 0 || strcmp(f, "n") == 0);
    if (ob->ndim != 1 || !intp || ob->shape[0] < xb->shape[0]) {
        PyBuffer_Release(xb);
        PyBuffer_Release(ob);
        PyErr_SetString(PyExc_TypeError, "out must be a writable 1-D intp array as long as x");
        return -1;
    }
    return 0;
}

#define TF_MARGIN 8.0f
#define TF_GROWTH 1.5f

static PyObject *py_scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "scan(x, k, out) takes 3 arguments");
        return NULL;
    }
    Py_ssize_t k = PyLong_AsSsize_t(args[1]);
    if (k == -1 && PyErr_Occurred()) return NULL;
    Py_buffer xb, ob;
    if (get_buffers(args[0], args[2], &xb, &ob) < 0) return NULL;
    const float *x = (const float *)xb.buf;
    const Py_ssize_t n = xb.shape[0];
    Py_ssize_t *out = (Py_ssize_t *)ob.buf;
    if (out == NULL || k < 0) k = 0;
    if (k > n) k = n;
    cand *heap = NULL;
    if (k > 0 && (heap = PyMem_RawMalloc((size_t)k * sizeof(cand))) == NULL) {
        PyBuffer_Release(&xb);
        PyBuffer_Release(&ob);
        return PyErr_NoMemory();
    }
    scan_result r;
    Py_ssize_t count = 0;
    Py_BEGIN_ALLOW_THREADS
    /* no candidates asked: a NaN threshold, which no value reaches (not even +inf) */
    const float margin = k > 0 ? TF_MARGIN : NAN;
#ifdef TF_X86
    if (use_avx2)
        scan_avx2(x, n, margin, out, &r);
    else
#endif
        scan_plain(x, n, margin, out, &r);
    if (k > 0 && isfinite(r.m)) {
        Py_ssize_t c = r.count;
        float mg = TF_MARGIN;
        while (c < k && mg <= 1e4f) {
            mg *= TF_GROWTH;
            c = above(x, n, (float)r.m - mg, out);
        }
        if (c < k) c = above(x, n, -FLT_MAX, out); /* fewer finite values than k */
        count = rank(x, out, c, k, heap);
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(heap);
    PyBuffer_Release(&xb);
    if (ob.buf != NULL) PyBuffer_Release(&ob);
    return Py_BuildValue("dddn", r.m, r.s, r.sd, count);
}

static PyObject *py_kernel(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyUnicode_FromString(use_avx2 ? "avx2" : "plain");
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))py_scan, METH_FASTCALL,
     "scan(x, k, out) -> (max, sum exp(x-max), sum exp(x-max)*(x-max), count of top ids in out)"},
    {"kernel", py_kernel, METH_NOARGS, "kernel() -> 'avx2' or 'plain': the code path in use"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scan", "One pass over a decode step's logits (see logits.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scan(void) {
#ifdef TF_X86
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (getenv("THOUGHTFORM_SCAN_PLAIN") != NULL) use_avx2 = 0; /* tests: the plain path */
#endif
    return PyModule_Create(&module);
}
