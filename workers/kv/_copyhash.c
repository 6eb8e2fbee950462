/* Fused copy + XXH3-64 for the KV transports: one pass over memory instead of a copy and a hash.
 *
 * The digest is exactly xxh3_64(src, seed) of the xxHash specification (the value the
 * `xxhash` Python package returns), for inputs longer than 240 bytes (its "long" path; shorter
 * ones stay with the Python package). Each 64-byte stripe is loaded once, stored to `dst`
 * (optionally with non-temporal stores) and folded into the accumulators while it is still in
 * registers, so hashing costs almost nothing beside the copy. Python never sees the difference:
 * workers.kv.checksum falls back to numpy + xxhash when this module is not built.
 *
 * Build: python -m workers.kv.native build (the set-up command does it when a compiler exists).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__linux__)
#include <errno.h>
#include <sys/socket.h>
#include <sys/uio.h>
#define PD_SENDMSG 1
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PD_X86 1
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the fused KV checksum assumes a little-endian host"
#endif

#ifndef PD_SOURCE_DIGEST
#define PD_SOURCE_DIGEST ""
#endif

#define STRIPE 64
#define SECRET_SIZE 192
#define STRIPES_PER_BLOCK ((SECRET_SIZE - STRIPE) / 8) /* 16 */
#define BLOCK (STRIPE * STRIPES_PER_BLOCK)             /* 1024 */
/* While a run reads one 16 KiB group of stripes, prefetch the next group four 4 KiB pages at a time,
   interleaved (stripe i of a group prefetches line i / 4 of page i % 4 of the next): four streams in
   flight, where a single one 2 KiB ahead stalled at each page boundary, past which the hardware
   prefetcher does not go. Against the single stream, shm transfers of 16-256 MB ran 1.04-1.12x as
   fast, tcp's the same; 8 pages ran as 4 (from memory, with no prefetch, hashing ran at half speed). */
#define PREFETCH_PAGES 4
#define PAGE_NBYTES 4096
#define GROUP_STRIPES (PREFETCH_PAGES * PAGE_NBYTES / STRIPE) /* 256 */

static inline const char *prefetch_target(const uint8_t *src, size_t n) {
    size_t i = n % GROUP_STRIPES;
    return (const char *)(src + (n - i + GROUP_STRIPES) * STRIPE + (i % PREFETCH_PAGES) * PAGE_NBYTES +
                          (i / PREFETCH_PAGES) * STRIPE);
}

static const uint32_t P32_1 = 0x9E3779B1U, P32_2 = 0x85EBCA77U, P32_3 = 0xC2B2AE3DU;
static const uint64_t P64_1 = 0x9E3779B185EBCA87ULL, P64_2 = 0xC2B2AE3D27D4EB4FULL,
                      P64_3 = 0x165667B19E3779F9ULL, P64_4 = 0x85EBCA77C2B2AE63ULL,
                      P64_5 = 0x27D4EB2F165667C5ULL, PMX1 = 0x165667919E3779F9ULL;

/* The specification's default secret. */
static const uint8_t DEFAULT_SECRET[SECRET_SIZE] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

static inline uint64_t read64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline void write64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* `stripes` stripes of `src` into the accumulators (and copied to `dst` unless it is NULL), the first
   at stripe position `first` (0-15) of its 1 KiB block; the accumulators are scrambled after each
   block's last stripe. The scramble is done in vector registers beside the stripes: called per block
   with a scalar scramble, hashing cache-hot data ran at 32 GB/s here, about half what the loop can. */
typedef void (*accumulate_fn)(uint64_t *acc, const uint8_t *src, uint8_t *dst, const uint8_t *secret,
                              size_t first, size_t stripes, int nontemporal);

static void scramble_scalar(uint64_t *acc, const uint8_t *secret) {
    for (int i = 0; i < 8; i++) {
        uint64_t a = acc[i];
        a ^= a >> 47;
        a ^= read64(secret + 8 * i);
        acc[i] = a * P32_1;
    }
}

#define SCRAMBLE_KEY(secret) ((secret) + SECRET_SIZE - STRIPE)

static void accumulate_scalar(uint64_t *acc, const uint8_t *src, uint8_t *dst, const uint8_t *secret,
                              size_t first, size_t stripes, int nontemporal) {
    (void)nontemporal;
    size_t pos = first;
    for (size_t n = 0; n < stripes; n++) {
        const uint8_t *in = src + n * STRIPE;
        if (dst) memcpy(dst + n * STRIPE, in, STRIPE);
        for (int i = 0; i < 8; i++) {
            uint64_t data = read64(in + 8 * i);
            uint64_t keyed = data ^ read64(secret + pos * 8 + 8 * i);
            acc[i ^ 1] += data;
            acc[i] += (uint64_t)(uint32_t)keyed * (keyed >> 32);
        }
        if (++pos == STRIPES_PER_BLOCK) {
            scramble_scalar(acc, SCRAMBLE_KEY(secret));
            pos = 0;
        }
    }
}

#ifdef PD_X86
/* SSE2 is part of x86-64, so this needs no runtime check. */
static void accumulate_sse2(uint64_t *acc, const uint8_t *src, uint8_t *dst, const uint8_t *secret,
                            size_t first, size_t stripes, int nontemporal) {
    __m128i a[4];
    for (int j = 0; j < 4; j++) a[j] = _mm_loadu_si128((const __m128i *)(acc + 2 * j));
    const __m128i prime = _mm_set1_epi32((int)P32_1);
    int stream = nontemporal && dst && ((uintptr_t)dst % 16 == 0);
    size_t pos = first;
    for (size_t n = 0; n < stripes; n++) {
        const uint8_t *in = src + n * STRIPE;
        _mm_prefetch(prefetch_target(src, n), _MM_HINT_T0);
        for (int j = 0; j < 4; j++) {
            __m128i data = _mm_loadu_si128((const __m128i *)(in + 16 * j));
            if (dst) {
                __m128i *out = (__m128i *)(dst + n * STRIPE + 16 * j);
                if (stream) _mm_stream_si128(out, data); else _mm_storeu_si128(out, data);
            }
            __m128i keyed = _mm_xor_si128(data, _mm_loadu_si128((const __m128i *)(secret + pos * 8 + 16 * j)));
            __m128i product = _mm_mul_epu32(keyed, _mm_shuffle_epi32(keyed, _MM_SHUFFLE(0, 3, 0, 1)));
            __m128i swapped = _mm_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
            a[j] = _mm_add_epi64(a[j], _mm_add_epi64(swapped, product));
        }
        if (++pos == STRIPES_PER_BLOCK) {
            for (int j = 0; j < 4; j++) { /* a = (a ^ a >> 47 ^ key) * P32_1, as two 32x32 products */
                __m128i x = _mm_xor_si128(_mm_xor_si128(a[j], _mm_srli_epi64(a[j], 47)),
                                          _mm_loadu_si128((const __m128i *)(SCRAMBLE_KEY(secret) + 16 * j)));
                __m128i high = _mm_mul_epu32(_mm_srli_epi64(x, 32), prime);
                a[j] = _mm_add_epi64(_mm_mul_epu32(x, prime), _mm_slli_epi64(high, 32));
            }
            pos = 0;
        }
    }
    for (int j = 0; j < 4; j++) _mm_storeu_si128((__m128i *)(acc + 2 * j), a[j]);
}

__attribute__((target("avx2"))) static void accumulate_avx2(uint64_t *acc, const uint8_t *src, uint8_t *dst,
                                                            const uint8_t *secret, size_t first, size_t stripes,
                                                            int nontemporal) {
    __m256i a0 = _mm256_loadu_si256((const __m256i *)acc);
    __m256i a1 = _mm256_loadu_si256((const __m256i *)(acc + 4));
    const __m256i prime = _mm256_set1_epi32((int)P32_1);
    /* the scramble key is read only where a block ends: the last stripe's secret is offset past it */
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    if (first + stripes >= STRIPES_PER_BLOCK) {
        s0 = _mm256_loadu_si256((const __m256i *)SCRAMBLE_KEY(secret));
        s1 = _mm256_loadu_si256((const __m256i *)(SCRAMBLE_KEY(secret) + 32));
    }
    int stream = nontemporal && dst && ((uintptr_t)dst % 32 == 0);
    size_t pos = first;
    for (size_t n = 0; n < stripes; n++) {
        const uint8_t *in = src + n * STRIPE;
        _mm_prefetch(prefetch_target(src, n), _MM_HINT_T0);
        __m256i d0 = _mm256_loadu_si256((const __m256i *)in);
        __m256i d1 = _mm256_loadu_si256((const __m256i *)(in + 32));
        if (dst) {
            __m256i *out = (__m256i *)(dst + n * STRIPE);
            if (stream) {
                _mm256_stream_si256(out, d0);
                _mm256_stream_si256(out + 1, d1);
            } else {
                _mm256_storeu_si256(out, d0);
                _mm256_storeu_si256(out + 1, d1);
            }
        }
        const uint8_t *key = secret + pos * 8;
        __m256i k0 = _mm256_xor_si256(d0, _mm256_loadu_si256((const __m256i *)key));
        __m256i k1 = _mm256_xor_si256(d1, _mm256_loadu_si256((const __m256i *)(key + 32)));
        __m256i p0 = _mm256_mul_epu32(k0, _mm256_shuffle_epi32(k0, _MM_SHUFFLE(0, 3, 0, 1)));
        __m256i p1 = _mm256_mul_epu32(k1, _mm256_shuffle_epi32(k1, _MM_SHUFFLE(0, 3, 0, 1)));
        a0 = _mm256_add_epi64(a0, _mm256_add_epi64(_mm256_shuffle_epi32(d0, _MM_SHUFFLE(1, 0, 3, 2)), p0));
        a1 = _mm256_add_epi64(a1, _mm256_add_epi64(_mm256_shuffle_epi32(d1, _MM_SHUFFLE(1, 0, 3, 2)), p1));
        if (++pos == STRIPES_PER_BLOCK) {
            __m256i x0 = _mm256_xor_si256(_mm256_xor_si256(a0, _mm256_srli_epi64(a0, 47)), s0);
            __m256i x1 = _mm256_xor_si256(_mm256_xor_si256(a1, _mm256_srli_epi64(a1, 47)), s1);
            a0 = _mm256_add_epi64(_mm256_mul_epu32(x0, prime),
                                  _mm256_slli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(x0, 32), prime), 32));
            a1 = _mm256_add_epi64(_mm256_mul_epu32(x1, prime),
                                  _mm256_slli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(x1, 32), prime), 32));
            pos = 0;
        }
    }
    _mm256_storeu_si256((__m256i *)acc, a0);
    _mm256_storeu_si256((__m256i *)(acc + 4), a1);
}

__attribute__((target("avx512f"))) static void accumulate_avx512(uint64_t *acc, const uint8_t *src, uint8_t *dst,
                                                                const uint8_t *secret, size_t first,
                                                                size_t stripes, int nontemporal) {
    __m512i a = _mm512_loadu_si512((const void *)acc);
    const __m512i prime = _mm512_set1_epi32((int)P32_1);
    __m512i scramble_key = _mm512_setzero_si512(); /* read only where a block ends, as in accumulate_avx2 */
    if (first + stripes >= STRIPES_PER_BLOCK) scramble_key = _mm512_loadu_si512((const void *)SCRAMBLE_KEY(secret));
    int stream = nontemporal && dst && ((uintptr_t)dst % 64 == 0);
    size_t pos = first;
    for (size_t n = 0; n < stripes; n++) {
        const uint8_t *in = src + n * STRIPE;
        _mm_prefetch(prefetch_target(src, n), _MM_HINT_T0);
        __m512i d = _mm512_loadu_si512((const void *)in);
        if (dst) {
            if (stream) _mm512_stream_si512((void *)(dst + n * STRIPE), d);
            else _mm512_storeu_si512((void *)(dst + n * STRIPE), d);
        }
        __m512i k = _mm512_xor_si512(d, _mm512_loadu_si512((const void *)(secret + pos * 8)));
        __m512i p = _mm512_mul_epu32(k, _mm512_shuffle_epi32(k, (_MM_PERM_ENUM)_MM_SHUFFLE(0, 3, 0, 1)));
        a = _mm512_add_epi64(a, _mm512_add_epi64(_mm512_shuffle_epi32(d, (_MM_PERM_ENUM)_MM_SHUFFLE(1, 0, 3, 2)), p));
        if (++pos == STRIPES_PER_BLOCK) {
            __m512i x = _mm512_xor_si512(_mm512_xor_si512(a, _mm512_srli_epi64(a, 47)), scramble_key);
            a = _mm512_add_epi64(_mm512_mul_epu32(x, prime),
                                 _mm512_slli_epi64(_mm512_mul_epu32(_mm512_srli_epi64(x, 32), prime), 32));
            pos = 0;
        }
    }
    _mm512_storeu_si512((void *)acc, a);
}
#endif

static accumulate_fn accumulate = accumulate_scalar;
static const char *isa = "scalar";

static inline uint64_t avalanche(uint64_t h) {
    h ^= h >> 37;
    h *= PMX1;
    return h ^ (h >> 32);
}

static inline uint64_t fold128(uint64_t a, uint64_t b) {
    __uint128_t product = (__uint128_t)a * b;
    return (uint64_t)product ^ (uint64_t)(product >> 64);
}

/* One input buffer of a hash: the digest covers the concatenation of its pieces. */
typedef struct {
    const uint8_t *buf;
    size_t len;
} piece_t;

/* `count` bytes of the concatenation, from position (*index, *offset) on, into `out`; moves the position. */
static void gather(const piece_t *pieces, size_t *index, size_t *offset, uint8_t *out, size_t count) {
    while (count) {
        while (*offset == pieces[*index].len) {
            (*index)++;
            *offset = 0;
        }
        size_t take = pieces[*index].len - *offset;
        if (take > count) take = count;
        memcpy(out, pieces[*index].buf + *offset, take);
        out += take;
        *offset += take;
        count -= take;
    }
}

/* xxh3_64 of the concatenation of `pieces` (`len` bytes in all, more than 240), copying it to `dst`
   on the way unless dst is NULL. Stripes are read in place from their piece; one that straddles two
   pieces (a K/V boundary off the 64-byte grid) is gathered into a local stripe first. */
static uint64_t copy_hash_pieces(const piece_t *pieces, uint8_t *dst, size_t len, uint64_t seed, int nontemporal) {
    uint8_t secret[SECRET_SIZE];
    if (seed == 0) {
        memcpy(secret, DEFAULT_SECRET, SECRET_SIZE);
    } else { /* the seeded variant hashes with a secret derived from the seed */
        for (int i = 0; i < SECRET_SIZE; i += 16) {
            write64(secret + i, read64(DEFAULT_SECRET + i) + seed);
            write64(secret + i + 8, read64(DEFAULT_SECRET + i + 8) - seed);
        }
    }
    uint64_t acc[8] = {P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1};
    uint8_t stripe[STRIPE];
    /* every stripe before the last byte goes through the block loop (the accumulators scrambled
       after each full block of 16): runs of whole stripes in place, a straddling stripe gathered */
    size_t total = (len - 1) / STRIPE, done = 0, index = 0, offset = 0;
    while (done < total) {
        while (offset == pieces[index].len) {
            index++;
            offset = 0;
        }
        size_t whole = (pieces[index].len - offset) / STRIPE, pos = done % STRIPES_PER_BLOCK;
        uint8_t *out = dst ? dst + done * STRIPE : NULL;
        if (whole) {
            size_t run = whole < total - done ? whole : total - done;
            accumulate(acc, pieces[index].buf + offset, out, secret, pos, run, nontemporal);
            offset += run * STRIPE;
            done += run;
        } else {
            gather(pieces, &index, &offset, stripe, STRIPE);
            accumulate(acc, stripe, out, secret, pos, 1, 0);
            done += 1;
        }
    }
    /* the bytes after the last whole stripe (1 to 64) are copied plainly */
    if (dst) gather(pieces, &index, &offset, dst + done * STRIPE, len - done * STRIPE);
    /* the last stripe (overlapping the ones before) with the secret's last-stripe offset */
    size_t tail_index = 0, tail_offset = 0;
    uint8_t scratch[STRIPE];
    for (size_t skip = len - STRIPE; skip;) { /* find where the last 64 bytes begin */
        size_t here = pieces[tail_index].len - tail_offset;
        if (skip < here) {
            tail_offset += skip;
            skip = 0;
        } else {
            skip -= here;
            tail_index++;
            tail_offset = 0;
        }
    }
    gather(pieces, &tail_index, &tail_offset, scratch, STRIPE);
    accumulate(acc, scratch, NULL, secret + SECRET_SIZE - STRIPE - 7, 0, 1, 0); /* no block ends here */
#ifdef PD_X86
    if (dst && nontemporal) _mm_sfence(); /* streamed stores are visible to other cores after this */
#endif
    uint64_t result = (uint64_t)len * P64_1;
    for (int i = 0; i < 4; i++) {
        const uint8_t *key = secret + 11 + 16 * i;
        result += fold128(acc[2 * i] ^ read64(key), acc[2 * i + 1] ^ read64(key + 8));
    }
    return avalanche(result);
}

#define MIN_LEN 241

static int get_seed(PyObject *obj, uint64_t *seed) {
    *seed = PyLong_AsUnsignedLongLongMask(obj);
    return !(*seed == (uint64_t)-1 && PyErr_Occurred());
}

/* The pieces of `src`: one buffer, or a tuple or list of buffers, each held until release_source. */
typedef struct {
    Py_ssize_t count;
    Py_buffer *views;
    piece_t *pieces;
    size_t len;
} source_t;

static void release_source(source_t *source) {
    for (Py_ssize_t i = 0; i < source->count; i++) PyBuffer_Release(&source->views[i]);
    PyMem_Free(source->views);
    PyMem_Free(source->pieces);
    source->count = 0;
    source->views = NULL;
    source->pieces = NULL;
}

/* A piece named by (address, nbytes): memory the caller keeps alive, readable and unchanged for the
   whole call (a contiguous CPU tensor's data_ptr() and nbytes). Making a buffer of a tensor through
   its numpy view cost 1-3 us a tensor, a tenth of a 16 MB transfer's time over its 64 K and V. */
static int get_memory(PyObject *item, piece_t *piece) {
    if (PyTuple_GET_SIZE(item) != 2 || !PyLong_Check(PyTuple_GET_ITEM(item, 0)) ||
        !PyLong_Check(PyTuple_GET_ITEM(item, 1))) {
        PyErr_SetString(PyExc_TypeError, "a memory piece is a tuple (address, nbytes) of two ints");
        return 0;
    }
    void *address = PyLong_AsVoidPtr(PyTuple_GET_ITEM(item, 0));
    Py_ssize_t nbytes = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
    if (PyErr_Occurred()) return 0;
    if (address == NULL || nbytes < 0) {
        PyErr_Format(PyExc_ValueError, "a memory piece needs a non-null address and nbytes >= 0 (got %zd)", nbytes);
        return 0;
    }
    piece->buf = (const uint8_t *)address;
    piece->len = (size_t)nbytes;
    return 1;
}

/* The pieces of `src`: one buffer, or a tuple or list of buffers and (address, nbytes) pairs. The
   views of pieces given by address stay empty (releasing an empty view does nothing). */
static int get_source(PyObject *src, source_t *source) {
    int is_sequence = PyTuple_Check(src) || PyList_Check(src);
    PyObject *items = is_sequence ? PySequence_Fast(src, "src") : NULL;
    if (is_sequence && items == NULL) return 0;
    Py_ssize_t count = is_sequence ? PySequence_Fast_GET_SIZE(items) : 1;
    source->count = 0;
    source->len = 0;
    source->views = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Py_buffer));
    source->pieces = PyMem_Calloc(count ? (size_t)count : 1, sizeof(piece_t));
    int ok = source->views && source->pieces;
    if (!ok) PyErr_NoMemory();
    for (Py_ssize_t i = 0; ok && i < count; i++) {
        PyObject *item = is_sequence ? PySequence_Fast_GET_ITEM(items, i) : src;
        if (is_sequence && PyTuple_Check(item)) {
            ok = get_memory(item, &source->pieces[i]);
        } else {
            ok = PyObject_GetBuffer(item, &source->views[i], PyBUF_C_CONTIGUOUS) == 0;
            if (ok) {
                source->pieces[i].buf = (const uint8_t *)source->views[i].buf;
                source->pieces[i].len = (size_t)source->views[i].len;
            }
        }
        if (ok) {
            source->count = i + 1;
            source->len += source->pieces[i].len;
        }
    }
    Py_XDECREF(items);
    if (!ok) release_source(source);
    return ok;
}

/* xxh3_64 of `src_obj` seeded with `seed_obj`, copied into `dst` unless it is NULL; NULL with an
   exception set on bad arguments. */
static PyObject *hash_source(PyObject *src_obj, PyObject *seed_obj, Py_buffer *dst, int nontemporal) {
    uint64_t seed = 0;
    source_t src = {0, NULL, NULL, 0};
    PyObject *result = NULL;
    if ((seed_obj && !get_seed(seed_obj, &seed)) || !get_source(src_obj, &src)) goto done;
    if (dst && ((size_t)dst->len != src.len || src.len < MIN_LEN)) {
        PyErr_Format(PyExc_ValueError, "dst and src must have equal lengths above %d bytes (got %zd and %zu)",
                     MIN_LEN - 1, dst->len, src.len);
        goto done;
    }
    if (src.len < MIN_LEN) {
        PyErr_Format(PyExc_ValueError, "src must be longer than %d bytes (got %zu)", MIN_LEN - 1, src.len);
        goto done;
    }
    uint8_t *target = dst ? (uint8_t *)dst->buf : NULL;
    uint64_t digest;
    Py_BEGIN_ALLOW_THREADS
    digest = copy_hash_pieces(src.pieces, target, src.len, seed, nontemporal);
    Py_END_ALLOW_THREADS
    result = PyLong_FromUnsignedLongLong(digest);
done:
    release_source(&src);
    return result;
}

#ifdef PD_SENDMSG
#define SEND_PARTIAL (-1)

/* Send the `*count` iovecs at `*iov` with sendmsg, advancing them over what went out: 0 when all
   did, SEND_PARTIAL after a short write, else the failing errno. On a blocking socket a write is
   short only when a signal or the send timeout (SO_SNDTIMEO) cut it, so the caller checks for
   Python signal handlers then, as socket.sendall does between writes, and calls again. */
static int send_iov(int fd, struct iovec **iov, int *count) {
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = *iov;
    msg.msg_iovlen = (size_t)*count;
    ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (sent < 0) return errno;
    while (*count > 0 && (size_t)sent >= (*iov)->iov_len) {
        sent -= (ssize_t)(*iov)->iov_len;
        (*iov)++;
        (*count)--;
    }
    if (*count == 0) return 0;
    (*iov)->iov_base = (uint8_t *)(*iov)->iov_base + sent;
    (*iov)->iov_len -= (size_t)sent;
    return SEND_PARTIAL;
}

/* Send the iovecs, then (unless `pieces` is NULL) hash the block `pieces` (`len` bytes) from `*seed`:
   the GIL is released for both, and taken between short writes to run Python's signal handlers.
   0, or the failing errno (-1 with a Python exception set when a handler raised). */
static int send_then_hash(int fd, struct iovec *iov, int count, const piece_t *pieces, size_t len, uint64_t *seed) {
    int error;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        error = send_iov(fd, &iov, &count);
        if (!error && pieces) *seed = copy_hash_pieces(pieces, NULL, len, *seed, 0);
        Py_END_ALLOW_THREADS
        if (error != EINTR && error != SEND_PARTIAL) return error;
        if (PyErr_CheckSignals() < 0) return -1; /* as Python's socket calls: handlers run, then go on */
    }
}

/* Raise OSError for a failed send's errno (a negative one means a Python exception is already set). */
static void raise_send_error(int error) {
    if (error > 0) {
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
    }
}

/* digests[index] = value; 0 when out of memory (exception set). */
static int set_digest(PyObject *digests, Py_ssize_t index, uint64_t value) {
    PyObject *digest = PyLong_FromUnsignedLongLong(value);
    if (digest == NULL) return 0;
    PyList_SET_ITEM(digests, index, digest);
    return 1;
}

/* The pieces of the next `len` bytes of `src` from position (*index, *offset) into `out` (at most
   src->count of them); moves the position. */
static size_t block_pieces(const source_t *src, size_t *index, size_t *offset, size_t len, piece_t *out) {
    size_t count = 0;
    while (len) {
        while (*offset == src->pieces[*index].len) {
            (*index)++;
            *offset = 0;
        }
        size_t take = src->pieces[*index].len - *offset;
        if (take > len) take = len;
        out[count].buf = src->pieces[*index].buf + *offset;
        out[count++].len = take;
        *offset += take;
        len -= take;
    }
    return count;
}

/* Whether `len` bytes cut into blocks of `block` leave every block longer than 240 bytes; a
   ValueError naming layer `layer` if not. */
static int blocks_ok(size_t len, Py_ssize_t block, Py_ssize_t layer) {
    size_t tail = block > 0 ? len % (size_t)block : 0;
    if (block >= MIN_LEN && len >= MIN_LEN && !(tail && tail < MIN_LEN)) return 1;
    PyErr_Format(PyExc_ValueError, "layer %zd (%zu bytes) must cut into blocks of block_nbytes (%zd) of more than %d "
                 "bytes each", layer, len, block, MIN_LEN - 1);
    return 0;
}

/* send_layers_xxh3_64: the tcp sender's loop over queued layers without Python between blocks.
   Each block of a layer goes out with one sendmsg (the previous layer's 8-byte checksum trailer and
   this layer's head in front of its first block) and is hashed right after it, while the socket
   copy has just pulled it into this core's cache. In Python the loop cost ~10 us a block beside the
   two calls (the socket copy had evicted the interpreter's data), and ~15 us between layers. */
static PyObject *py_send_layers_xxh3_64(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *keywords[] = {"fd", "layers", "block_nbytes", NULL};
    int fd;
    Py_ssize_t block, n = 0, held = 0;
    PyObject *layers_obj, *layers = NULL, *digests = NULL, *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iOn", keywords, &fd, &layers_obj, &block)) return NULL;
    layers = PySequence_Fast(layers_obj, "layers must be a sequence of (head, src) pairs");
    if (layers == NULL) return NULL;
    n = PySequence_Fast_GET_SIZE(layers);
    source_t *heads = PyMem_Calloc(n ? (size_t)n : 1, sizeof(source_t));
    source_t *srcs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(source_t));
    struct iovec *iov = NULL;
    piece_t *pieces = NULL;
    size_t most = 1;
    if (!heads || !srcs) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < n; held++) { /* every buffer held, and every layer checked, before a byte goes out */
        PyObject *item = PySequence_Fast_GET_ITEM(layers, held);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "layers must be a sequence of (head, src) pairs");
            goto done;
        }
        if (!get_source(PyTuple_GET_ITEM(item, 0), &heads[held])) goto done;
        if (!get_source(PyTuple_GET_ITEM(item, 1), &srcs[held])) {
            release_source(&heads[held]);
            goto done;
        }
        if (!blocks_ok(srcs[held].len, block, held)) {
            release_source(&heads[held]);
            release_source(&srcs[held]);
            goto done;
        }
        size_t need = 1 + (size_t)heads[held].count + (size_t)srcs[held].count;
        if (need > most) most = need;
    }
    iov = PyMem_Calloc(most, sizeof(struct iovec));
    pieces = PyMem_Calloc(most, sizeof(piece_t));
    digests = PyList_New(n);
    if (!iov || !pieces || !digests) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    uint8_t trailer[8];
    for (Py_ssize_t layer = 0; layer < n; layer++) {
        source_t *head = &heads[layer], *src = &srcs[layer];
        uint64_t seed = 0;
        size_t index = 0, offset = 0, left = src->len;
        int first = 1;
        while (left) {
            size_t len = left < (size_t)block ? left : (size_t)block, iov_count = 0;
            size_t count = block_pieces(src, &index, &offset, len, pieces);
            if (first && layer > 0) { /* the previous layer's checksum trails its payload */
                iov[iov_count].iov_base = trailer;
                iov[iov_count++].iov_len = sizeof trailer;
            }
            for (Py_ssize_t i = 0; first && i < head->count; i++) {
                iov[iov_count].iov_base = (void *)head->pieces[i].buf;
                iov[iov_count++].iov_len = head->pieces[i].len;
            }
            for (size_t i = 0; i < count; i++) {
                iov[iov_count].iov_base = (void *)pieces[i].buf;
                iov[iov_count++].iov_len = pieces[i].len;
            }
            first = 0;
            int error = send_then_hash(fd, iov, (int)iov_count, pieces, len, &seed);
            if (error) {
                raise_send_error(error);
                goto done;
            }
            left -= len;
        }
        write64(trailer, seed); /* little-endian: the file refuses big-endian hosts */
        if (!set_digest(digests, layer, seed)) goto done;
    }
    result = digests;
    digests = NULL;
done:
    for (Py_ssize_t i = 0; i < held; i++) {
        release_source(&heads[i]);
        release_source(&srcs[i]);
    }
    PyMem_Free(heads);
    PyMem_Free(srcs);
    PyMem_Free(iov);
    PyMem_Free(pieces);
    Py_XDECREF(digests);
    Py_DECREF(layers);
    return result;
}

PyDoc_STRVAR(send_layers_xxh3_64_doc,
             "send_layers_xxh3_64(fd, layers, block_nbytes) -> list[int]\n\n"
             "Send layers, a sequence of (head, src) pairs of sources (see xxh3_64), on the blocking socket fd: each\n"
             "layer's head, then its src cut into blocks of block_nbytes (the last may be shorter; each more\n"
             "than 240 bytes), one sendmsg each, and between layers the previous one's checksum as 8\n"
             "little-endian bytes. Returns each layer's checksum (the chained xxh3_64 of its blocks from 0, each\n"
             "hashed right after its send); the last one's is not sent. OSError on failure.");

/* One layer of copy_layers_xxh3_64: where to, what from, and the frame that announces it. */
typedef struct {
    Py_buffer dst, header;
    source_t src;
} slot_layer_t;

/* copy_layers_xxh3_64: the shm sender's loop over queued layers without Python between them. Each
   layer is copied into its slot block by block with streaming stores, each block hashed as it is
   copied; its checksum goes into its frame header, and the header out with one sendmsg, so the
   receiver verifies layer i while layer i+1 is copied. In Python a layer cost ~10 us beside the
   copy and the send, and the hand-off between layers ~4 us more. */
static PyObject *py_copy_layers_xxh3_64(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *keywords[] = {"fd", "layers", "block_nbytes", "checksum_offset", NULL};
    int fd;
    Py_ssize_t block, checksum_offset, n = 0, held = 0;
    PyObject *layers_obj, *layers = NULL, *digests = NULL, *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iOnn", keywords, &fd, &layers_obj, &block, &checksum_offset))
        return NULL;
    layers = PySequence_Fast(layers_obj, "layers must be a sequence of (dst, src, header) triples");
    if (layers == NULL) return NULL;
    n = PySequence_Fast_GET_SIZE(layers);
    slot_layer_t *items = PyMem_Calloc(n ? (size_t)n : 1, sizeof(slot_layer_t));
    piece_t *pieces = NULL;
    size_t most = 1;
    if (!items) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < n; held++) { /* every buffer held, and every layer checked, before a byte is copied */
        PyObject *item = PySequence_Fast_GET_ITEM(layers, held);
        slot_layer_t *layer = &items[held];
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_SetString(PyExc_TypeError, "layers must be a sequence of (dst, src, header) triples");
            goto done;
        }
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 0), &layer->dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 2), &layer->header, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            PyBuffer_Release(&layer->dst);
            goto done;
        }
        int ok = get_source(PyTuple_GET_ITEM(item, 1), &layer->src);
        if (ok && (size_t)layer->dst.len != layer->src.len) {
            PyErr_Format(PyExc_ValueError, "layer %zd: dst has %zd bytes and src %zu", held, layer->dst.len,
                         layer->src.len);
            ok = 0;
        } else if (ok && (checksum_offset < 0 || layer->header.len < 8 || checksum_offset > layer->header.len - 8)) {
            PyErr_Format(PyExc_ValueError, "layer %zd: no 8 bytes at checksum_offset %zd of its %zd-byte header",
                         held, checksum_offset, layer->header.len);
            ok = 0;
        }
        ok = ok && blocks_ok(layer->src.len, block, held);
        if (!ok) {
            if (layer->src.views) release_source(&layer->src);
            PyBuffer_Release(&layer->dst);
            PyBuffer_Release(&layer->header);
            goto done;
        }
        if ((size_t)layer->src.count > most) most = (size_t)layer->src.count;
    }
    pieces = PyMem_Calloc(most, sizeof(piece_t));
    digests = PyList_New(n);
    if (!pieces || !digests) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        slot_layer_t *layer = &items[i];
        uint8_t *dst = (uint8_t *)layer->dst.buf;
        uint64_t seed = 0;
        size_t index = 0, offset = 0, done_bytes = 0, total = layer->src.len;
        Py_BEGIN_ALLOW_THREADS
        while (done_bytes < total) {
            size_t len = total - done_bytes < (size_t)block ? total - done_bytes : (size_t)block;
            block_pieces(&layer->src, &index, &offset, len, pieces);
            seed = copy_hash_pieces(pieces, dst + done_bytes, len, seed, 1);
            done_bytes += len;
        }
        Py_END_ALLOW_THREADS
        write64((uint8_t *)layer->header.buf + checksum_offset, seed);
        struct iovec iov = {layer->header.buf, (size_t)layer->header.len};
        int error = send_then_hash(fd, &iov, 1, NULL, 0, NULL);
        if (error) {
            raise_send_error(error);
            goto done;
        }
        if (!set_digest(digests, i, seed)) goto done;
    }
    result = digests;
    digests = NULL;
done:
    for (Py_ssize_t i = 0; i < held; i++) {
        release_source(&items[i].src);
        PyBuffer_Release(&items[i].dst);
        PyBuffer_Release(&items[i].header);
    }
    PyMem_Free(items);
    PyMem_Free(pieces);
    Py_XDECREF(digests);
    Py_DECREF(layers);
    return result;
}

PyDoc_STRVAR(copy_layers_xxh3_64_doc,
             "copy_layers_xxh3_64(fd, layers, block_nbytes, checksum_offset) -> list[int]\n\n"
             "For each (dst, src, header) of layers: copy src (a source, see xxh3_64) into dst (as long) with\n"
             "streaming stores, block by block (block_nbytes; each block more than 240 bytes), write its\n"
             "checksum (the chained xxh3_64 of the blocks from 0) as 8 little-endian bytes at checksum_offset\n"
             "of header, and send header on the blocking socket fd. Returns the checksums. OSError on failure.");
#endif

PyDoc_STRVAR(copy_xxh3_64_doc,
             "copy_xxh3_64(dst, src, seed=0, nontemporal=False) -> int\n\n"
             "Copy src (a source, see xxh3_64) into dst (of the same total length, more than 240 bytes)\n"
             "and return xxh3_64(src, seed).");

static PyObject *py_copy_xxh3_64(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *keywords[] = {"dst", "src", "seed", "nontemporal", NULL};
    Py_buffer dst;
    PyObject *src_obj, *seed_obj = NULL;
    int nontemporal = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "w*O|Op", keywords, &dst, &src_obj, &seed_obj, &nontemporal))
        return NULL;
    PyObject *result = hash_source(src_obj, seed_obj, &dst, nontemporal);
    PyBuffer_Release(&dst);
    return result;
}

PyDoc_STRVAR(xxh3_64_doc,
             "xxh3_64(src, seed=0) -> int\n\n"
             "xxh3_64 of src, more than 240 bytes: a buffer, or a tuple or list of pieces taken as their\n"
             "concatenation, each a buffer or an (address, nbytes) pair of ints naming memory that the caller\n"
             "keeps alive, readable and unchanged for the whole call.");

static PyObject *py_xxh3_64(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *keywords[] = {"src", "seed", NULL};
    PyObject *src_obj, *seed_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O", keywords, &src_obj, &seed_obj)) return NULL;
    return hash_source(src_obj, seed_obj, NULL, 0);
}

PyDoc_STRVAR(use_isa_doc,
             "use_isa(name) -> None\n\n"
             "Run the stripe loop with 'avx512', 'avx2', 'sse2' or 'scalar' (tests compare them); ISA names the one in use.");

static PyObject *py_use_isa(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL) return NULL;
    if (strcmp(name, "scalar") == 0) {
        accumulate = accumulate_scalar;
        isa = "scalar";
#ifdef PD_X86
    } else if (strcmp(name, "sse2") == 0) {
        accumulate = accumulate_sse2;
        isa = "sse2";
    } else if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2")) {
        accumulate = accumulate_avx2;
        isa = "avx2";
    } else if (strcmp(name, "avx512") == 0 && __builtin_cpu_supports("avx512f")) {
        accumulate = accumulate_avx512;
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
    {"use_isa", py_use_isa, METH_O, use_isa_doc},
    {"copy_xxh3_64", (PyCFunction)(void (*)(void))py_copy_xxh3_64, METH_VARARGS | METH_KEYWORDS, copy_xxh3_64_doc},
    {"xxh3_64", (PyCFunction)(void (*)(void))py_xxh3_64, METH_VARARGS | METH_KEYWORDS, xxh3_64_doc},
#ifdef PD_SENDMSG
    {"send_layers_xxh3_64", (PyCFunction)(void (*)(void))py_send_layers_xxh3_64, METH_VARARGS | METH_KEYWORDS,
     send_layers_xxh3_64_doc},
    {"copy_layers_xxh3_64", (PyCFunction)(void (*)(void))py_copy_layers_xxh3_64, METH_VARARGS | METH_KEYWORDS,
     copy_layers_xxh3_64_doc},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_copyhash", "Fused copy + XXH3-64 for the KV transports.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__copyhash(void) {
#ifdef PD_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) { /* 3-10% over AVX2 here, cache-hot or from memory */
        accumulate = accumulate_avx512;
        isa = "avx512";
    } else if (__builtin_cpu_supports("avx2")) {
        accumulate = accumulate_avx2;
        isa = "avx2";
    } else {
        accumulate = accumulate_sse2;
        isa = "sse2";
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddStringConstant(m, "ISA", isa) < 0 || PyModule_AddIntConstant(m, "MIN_NBYTES", MIN_LEN) < 0 ||
        PyModule_AddStringConstant(m, "SOURCE_DIGEST", PD_SOURCE_DIGEST) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
