/* The CPU LM head over a panel-packed weight: logits = hidden @ weight.T in fp32, streaming the weight once.
 *
 * The weight [vocab, hidden] is packed once into panels of 16 vocabulary rows, each stored
 * column by column ([panel][hidden][16], the last panel padded with zero rows), so a panel is
 * one contiguous run that the kernel reads front to back while up to 16 hidden rows accumulate
 * in registers. MKL's GEMM over the unpacked weight read it at ~6 GB/s cold on the development
 * host at 16 rows; the panels stream at about memory speed (see workers.engine.lm_head).
 *
 * Every logit is one chain of fused multiply-adds over the hidden dimension in order, from 0:
 * each instruction set here (AVX-512, AVX2+FMA, scalar fmaf) gives the same bits.
 *
 * Build: python -m workers.engine.native build (the set-up command does it when a compiler exists).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PD_X86 1
#endif

#ifndef PD_SOURCE_DIGEST
#define PD_SOURCE_DIGEST ""
#endif

#define PANEL 16
/* Prefetch this many hidden positions ahead within a panel (4 KiB): a panel of a large hidden size
   spans many pages, past whose boundaries the hardware prefetcher does not go. */
#define PREFETCH_AHEAD 64

/* One panel: `rows` hidden rows (row stride `hidden`) into `cols` <= 16 logits each (row stride `vocab`). */
typedef void (*panel_fn)(const float *panel, const float *h, float *out, size_t rows, size_t hidden, size_t vocab,
                         size_t cols);

static void panel_scalar(const float *panel, const float *h, float *out, size_t rows, size_t hidden, size_t vocab,
                         size_t cols) {
    for (size_t r = 0; r < rows; r++) {
        float acc[PANEL] = {0};
        const float *row = h + r * hidden;
        for (size_t k = 0; k < hidden; k++) {
            const float *w = panel + k * PANEL;
            for (size_t i = 0; i < PANEL; i++) acc[i] = fmaf(row[k], w[i], acc[i]);
        }
        memcpy(out + r * vocab, acc, cols * sizeof(float));
    }
}

#ifdef PD_X86
/* Six rows per pass: 12 accumulators and the panel's two halves fill 14 of the 16 registers. */
#define AVX2_ROWS 6

__attribute__((target("avx2,fma"))) static void panel_avx2(const float *panel, const float *h, float *out,
                                                           size_t rows, size_t hidden, size_t vocab, size_t cols) {
    for (size_t r0 = 0; r0 < rows; r0 += AVX2_ROWS) {
        size_t n = rows - r0 < AVX2_ROWS ? rows - r0 : AVX2_ROWS;
        const float *h0 = h + r0 * hidden;
        __m256 lo[AVX2_ROWS], hi[AVX2_ROWS];
        for (size_t i = 0; i < AVX2_ROWS; i++) lo[i] = hi[i] = _mm256_setzero_ps();
        for (size_t k = 0; k < hidden; k++) {
            const float *w = panel + k * PANEL;
            _mm_prefetch((const char *)(w + PREFETCH_AHEAD * PANEL), _MM_HINT_T0);
            __m256 wl = _mm256_loadu_ps(w), wh = _mm256_loadu_ps(w + 8);
            if (n == AVX2_ROWS) { /* the common case, fully unrolled so the accumulators stay in registers */
#pragma GCC unroll 6
                for (size_t i = 0; i < AVX2_ROWS; i++) {
                    __m256 x = _mm256_set1_ps(h0[i * hidden + k]);
                    lo[i] = _mm256_fmadd_ps(x, wl, lo[i]);
                    hi[i] = _mm256_fmadd_ps(x, wh, hi[i]);
                }
            } else {
                for (size_t i = 0; i < n; i++) {
                    __m256 x = _mm256_set1_ps(h0[i * hidden + k]);
                    lo[i] = _mm256_fmadd_ps(x, wl, lo[i]);
                    hi[i] = _mm256_fmadd_ps(x, wh, hi[i]);
                }
            }
        }
        for (size_t i = 0; i < n; i++) {
            float acc[PANEL];
            _mm256_storeu_ps(acc, lo[i]);
            _mm256_storeu_ps(acc + 8, hi[i]);
            memcpy(out + (r0 + i) * vocab, acc, cols * sizeof(float));
        }
    }
}

/* Sixteen rows per pass over one panel: a panel row is one register, each hidden row's logits another.
   It runs the panels left over after the groups below. */
#define AVX512_ROWS 16

__attribute__((target("avx512f"))) static void panel_avx512(const float *panel, const float *h, float *out,
                                                           size_t rows, size_t hidden, size_t vocab, size_t cols) {
    __mmask16 mask = (__mmask16)((1u << cols) - 1u);
    for (size_t r0 = 0; r0 < rows; r0 += AVX512_ROWS) {
        size_t n = rows - r0 < AVX512_ROWS ? rows - r0 : AVX512_ROWS;
        const float *h0 = h + r0 * hidden;
        __m512 acc[AVX512_ROWS];
        for (size_t i = 0; i < AVX512_ROWS; i++) acc[i] = _mm512_setzero_ps();
        for (size_t k = 0; k < hidden; k++) {
            const float *w = panel + k * PANEL;
            _mm_prefetch((const char *)(w + PREFETCH_AHEAD * PANEL), _MM_HINT_T0);
            __m512 wv = _mm512_loadu_ps(w);
            for (size_t i = 0; i < n; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(h0[i * hidden + k]), wv, acc[i]);
        }
        for (size_t i = 0; i < n; i++) _mm512_mask_storeu_ps(out + (r0 + i) * vocab, mask, acc[i]);
    }
}

/* Four panels at once against up to six rows: 24 accumulators and the four panel registers fit the 32,
   and each broadcast row value feeds four multiply-adds. One panel at a time against 16 rows took a
   load per multiply-add: for the tiny model's head at 32 and 64 rows it ran 4.5 and 9.6 ms against
   MKL's 3.6 and 5.6; four at once ran 3.8 and 7.2 against 4.6 and 6.6 (caches swept before each call). */
#define GROUP 4
#define GROUP_ROWS 6

__attribute__((target("avx512f"), always_inline)) static inline void group_rows_avx512(
    const float *group, const float *h0, float *out, size_t hidden, size_t vocab, __mmask16 last, const size_t n) {
    const size_t stride = hidden * PANEL; /* floats from one panel to the next */
    __m512 acc[GROUP_ROWS][GROUP];
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < GROUP; j++) acc[i][j] = _mm512_setzero_ps();
    for (size_t k = 0; k < hidden; k++) {
        const float *w = group + k * PANEL;
        __m512 wv[GROUP];
        for (size_t j = 0; j < GROUP; j++) {
            _mm_prefetch((const char *)(w + j * stride + PREFETCH_AHEAD * PANEL), _MM_HINT_T0);
            wv[j] = _mm512_loadu_ps(w + j * stride);
        }
        for (size_t i = 0; i < n; i++) {
            __m512 x = _mm512_set1_ps(h0[i * hidden + k]);
            for (size_t j = 0; j < GROUP; j++) acc[i][j] = _mm512_fmadd_ps(x, wv[j], acc[i][j]);
        }
    }
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < GROUP; j++)
            _mm512_mask_storeu_ps(out + i * vocab + j * PANEL, j == GROUP - 1 ? last : (__mmask16)0xFFFF, acc[i][j]);
}

__attribute__((target("avx512f"))) static void group_avx512(const float *group, const float *h, float *out,
                                                           size_t rows, size_t hidden, size_t vocab, size_t cols) {
    __mmask16 last = (__mmask16)((1u << cols) - 1u); /* columns of the group's last panel */
    for (size_t r0 = 0; r0 < rows; r0 += GROUP_ROWS) {
        const float *h0 = h + r0 * hidden;
        float *o = out + r0 * vocab;
        switch (rows - r0 < GROUP_ROWS ? rows - r0 : GROUP_ROWS) { /* a constant row count each: all in registers */
            case 6: group_rows_avx512(group, h0, o, hidden, vocab, last, 6); break;
            case 5: group_rows_avx512(group, h0, o, hidden, vocab, last, 5); break;
            case 4: group_rows_avx512(group, h0, o, hidden, vocab, last, 4); break;
            case 3: group_rows_avx512(group, h0, o, hidden, vocab, last, 3); break;
            case 2: group_rows_avx512(group, h0, o, hidden, vocab, last, 2); break;
            default: group_rows_avx512(group, h0, o, hidden, vocab, last, 1); break;
        }
    }
}
#endif

static panel_fn run_panel = panel_scalar;
static panel_fn run_group = NULL; /* GROUP panels at once, where the instruction set has a loop for it */
static const char *isa = "scalar";

/* Panel after panel (or group after group), every row against each while it is in cache: the weight
   is read once per call. */
static void lm_head(const float *panels, const float *h, float *out, size_t rows, size_t hidden, size_t vocab) {
    size_t count = (vocab + PANEL - 1) / PANEL, p = 0;
#ifdef PD_X86
    for (; run_group != NULL && p + GROUP <= count; p += GROUP) {
        size_t end = (p + GROUP) * PANEL;
        run_group(panels + p * hidden * PANEL, h, out + p * PANEL, rows, hidden, vocab,
                  end > vocab ? PANEL - (end - vocab) : PANEL);
    }
#endif
    for (; p < count; p++) {
        size_t cols = vocab - p * PANEL < PANEL ? vocab - p * PANEL : PANEL;
        run_panel(panels + p * hidden * PANEL, h, out + p * PANEL, rows, hidden, vocab, cols);
    }
}

/* A C-contiguous float32 buffer of at least `need` floats; 0 with an exception set otherwise. */
static int get_floats(PyObject *obj, Py_buffer *view, int writable, size_t need, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) return 0;
    if (view->itemsize != 4 || view->format == NULL || strcmp(view->format, "f") != 0) {
        PyErr_Format(PyExc_ValueError, "%s must hold float32 values (format 'f'), got format %s", name,
                     view->format ? view->format : "?");
        PyBuffer_Release(view);
        return 0;
    }
    if ((size_t)view->len / sizeof(float) < need) { /* need * 4 could wrap */
        PyErr_Format(PyExc_ValueError, "%s holds %zd float32 values, needs %zu", name, view->len / 4, need);
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(logits_doc,
             "logits(panels, hidden, out, rows, hidden_size, vocab) -> None\n\n"
             "out[:rows, :vocab] = hidden[:rows] @ weight.T, where panels is the weight packed as\n"
             "[ceil(vocab / 16), hidden_size, 16] (zero rows pad the last panel); all three are C-contiguous\n"
             "float32 buffers, out writable. ValueError on a buffer too small or of another type.");

static PyObject *py_logits(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *panels_obj, *hidden_obj, *out_obj;
    Py_ssize_t rows, hidden, vocab;
    if (!PyArg_ParseTuple(args, "OOOnnn", &panels_obj, &hidden_obj, &out_obj, &rows, &hidden, &vocab)) return NULL;
    if (rows < 0 || hidden < 1 || vocab < 1) {
        PyErr_Format(PyExc_ValueError, "need rows >= 0, hidden_size >= 1 and vocab >= 1 (got %zd, %zd, %zd)", rows,
                     hidden, vocab);
        return NULL;
    }
    size_t padded = ((size_t)vocab + PANEL - 1) / PANEL * PANEL;
    size_t panels_need, hidden_need, out_need;
    if (__builtin_mul_overflow(padded, (size_t)hidden, &panels_need) ||
        __builtin_mul_overflow((size_t)rows, (size_t)hidden, &hidden_need) ||
        __builtin_mul_overflow((size_t)rows, (size_t)vocab, &out_need)) {
        PyErr_Format(PyExc_ValueError, "rows %zd, hidden_size %zd and vocab %zd overflow a buffer size", rows, hidden,
                     vocab);
        return NULL;
    }
    Py_buffer panels, h, out;
    if (!get_floats(panels_obj, &panels, 0, panels_need, "panels")) return NULL;
    if (!get_floats(hidden_obj, &h, 0, hidden_need, "hidden")) {
        PyBuffer_Release(&panels);
        return NULL;
    }
    if (!get_floats(out_obj, &out, 1, out_need, "out")) {
        PyBuffer_Release(&h);
        PyBuffer_Release(&panels);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    lm_head((const float *)panels.buf, (const float *)h.buf, (float *)out.buf, (size_t)rows, (size_t)hidden,
            (size_t)vocab);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    PyBuffer_Release(&h);
    PyBuffer_Release(&panels);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(use_isa_doc,
             "use_isa(name) -> None\n\n"
             "Run panels with 'avx512', 'avx2' or 'scalar' (tests compare them); ISA names the one in use.");

static PyObject *py_use_isa(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL) return NULL;
    if (strcmp(name, "scalar") == 0) {
        run_panel = panel_scalar;
        run_group = NULL;
        isa = "scalar";
#ifdef PD_X86
    } else if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        run_panel = panel_avx2;
        run_group = NULL;
        isa = "avx2";
    } else if (strcmp(name, "avx512") == 0 && __builtin_cpu_supports("avx512f")) {
        run_panel = panel_avx512;
        run_group = group_avx512;
        isa = "avx512";
#endif
    } else {
        PyErr_Format(PyExc_ValueError, "instruction set %R is not available here", arg);
        return NULL;
    }
    PyObject *value = PyUnicode_FromString(isa);
    if (value == NULL) return NULL;
    int failed = PyObject_SetAttrString(self, "ISA", value) < 0; /* self is the module */
    Py_DECREF(value);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"logits", py_logits, METH_VARARGS, logits_doc},
    {"use_isa", py_use_isa, METH_O, use_isa_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lmhead", "The CPU LM head over a panel-packed fp32 weight.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__lmhead(void) {
#ifdef PD_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        run_panel = panel_avx512;
        run_group = group_avx512;
        isa = "avx512";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        run_panel = panel_avx2;
        isa = "avx2";
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddStringConstant(m, "ISA", isa) < 0 || PyModule_AddIntConstant(m, "PANEL", PANEL) < 0 ||
        PyModule_AddStringConstant(m, "SOURCE_DIGEST", PD_SOURCE_DIGEST) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
