/* jaxmerge's CPU kernels, called from XLA programs through the XLA FFI (plain C against its C API) and from
   Python through ctypes (jaxmerge_host).

   jaxmerge_ties: per task, the exact k-th smallest magnitude of the task vectors over every leaf of a model
   (a two-level radix select on the float bits: a histogram of the high 15 bits, then of the low 16 bits inside
   the bucket that holds the answer), and optionally the whole TIES merge (trim, sign election with the
   model's majority sign for zero sums, disjoint sum / mean / max, scale, add to the pretrained weights) in
   the same call, reading each model's leaves where they lie: no concatenated copy of the task vectors.
   The arithmetic is the one of jaxmerge's XLA programs (float32, same operation order), so the results
   agree with them; the radix select is exact.

   jaxmerge_host also runs task arithmetic and simple averaging (op 1 and 2: pre + scale * sum or mean of the
   task vectors, summed in task order as XLA's unrolled adds), and any of the three on DARE's dropped task
   vectors: with per-leaf keys, entry i of a leaf's (T, ...) task vectors survives when its counter-based
   uniform draw (jaxmerge.tree.leaf_uniform: three keyed rounds of the lowbias32 hash of i) is >= p, and is then
   multiplied by 1 / (1 - p) (XLA turns the division by a constant into this product).

   Inputs (buffers, float32): [scale (1,)] then, for each leaf, [pretrained] then either the T models'
   leaves or one stacked (T, ...) leaf. Outputs: thresholds (T,) float32, non-finite flags (T + 1,) int32
   (one per model, the pretrained model last), then in merge mode one merged leaf per leaf.
   Attributes (int64 scalars): tasks, has_pre, stacked, k (rank of the threshold, 0 keeps everything),
   merge (-1: thresholds only, 0: sum, 1: mean, 2: max), zero_sign (0: majority, 1: positive), threads. */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xla/ffi/api/c_api.h"

/* The hash of DARE's draws multiplies 32-bit integers: vectorized only from AVX2 on (SSE2, x86-64's baseline,
   has no such multiply). Its loops get an AVX2 copy, chosen at load time where the CPU has it (target_clones
   needs the C library's ifunc support: without it, jaxmerge.native.build compiles with JAXMERGE_NO_CLONES). */
#if defined(__x86_64__) && defined(__has_attribute) && !defined(JAXMERGE_NO_CLONES)
#if __has_attribute(target_clones)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef VECTOR_CLONES
#define VECTOR_CLONES
#endif

#define HI_BUCKETS 32768 /* magnitude bits >> 16 (the sign bit is clear) */
#define LO_BUCKETS 65536
#define CHUNK 32768      /* entries per work item */
#define BLOCK 256        /* entries per inner block of the merge */

enum { PHASE_HIGH, PHASE_LOW, PHASE_MERGE, PHASE_LINEAR };
enum { OP_TIES, OP_SUM, OP_MEAN };

typedef struct {
  int64_t n, cap, *seg, *idx;
} fixup_t;

typedef struct {
  int64_t nseg, tasks, threads;
  const float **pre;  /* nseg entries, NULL without a pretrained model (rows are task vectors) */
  const float **base; /* nseg entries added to the merged task vector (the pretrained weights), or NULL */
  const float **rows; /* nseg * tasks row pointers */
  float **out;        /* nseg merged leaves (merge mode) */
  int64_t *len;       /* nseg */
  int64_t nchunk, *cseg, *clo, *chi;
  int64_t next;
  int phase, merge, zero_sign, fma, op;
  float scale, majority;
  const uint32_t *keys; /* nseg * 3 keys of DARE's drop, or NULL (no drop) */
  int bf16;             /* pre, base, rows and out hold bfloat16 (uint16) entries, not float32 */
  float drop_p, drop_mul; /* survivors are multiplied by drop_mul, 1 / (1 - p) (0: kept as they are) */
  uint32_t hi[1024];
  float thr[1024];
  uint32_t *hist;    /* threads * tasks * buckets */
  int32_t *bad;      /* threads * (tasks + 1) */
  int64_t *signsum;  /* threads */
  fixup_t *fix;      /* threads: entries to merge again with the majority sign */
} job_t;

typedef struct {
  job_t *job;
  int tid;
} worker_t;

static inline uint32_t mag_bits(float x) {
  uint32_t b;
  memcpy(&b, &x, 4);
  return b & 0x7fffffffu;
}

static inline float from_bits(uint32_t b) {
  float x;
  memcpy(&x, &b, 4);
  return x;
}

/* jaxmerge.tree.leaf_uniform's draw for counter c under key k: the lowbias32 finalizer, three keyed rounds, top
   23 bits as a float in [0, 1). */
static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  return x ^ (x >> 15);
}

static inline float uniform(const uint32_t *k, uint32_t c) {
  uint32_t b = mix32(mix32(mix32(c ^ k[0]) + k[1]) ^ k[2]);
  return from_bits((b >> 9) | 0x3F800000u) - 1.0f;
}

/* DARE's drop of one task vector entry: counter c = t * len + j in the leaf's (T, ...) draws. */
static inline float dropped(const job_t *J, const uint32_t *k, uint32_t c, float x) {
  float y = uniform(k, c) >= J->drop_p ? x : 0.0f;
  return J->drop_mul != 0.0f ? y * J->drop_mul : y;
}

/* bfloat16 <-> float32: widening is exact; narrowing rounds to nearest even (XLA's convert), NaN stays NaN. */
static inline float bf16_to_f32(uint16_t h) { return from_bits((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40u);
  return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

/* m entries of a leaf buffer from entry lo, as float32. */
static inline void load_f32(const job_t *J, const float *src, int64_t lo, int m, float *d) {
  if (J->bf16) {
    const uint16_t *h = (const uint16_t *)(const void *)src + lo;
    for (int i = 0; i < m; ++i) d[i] = bf16_to_f32(h[i]);
  } else {
    memcpy(d, src + lo, sizeof(float) * (size_t)m);
  }
}

static inline float load1(const job_t *J, const float *src, int64_t j) {
  return J->bf16 ? bf16_to_f32(((const uint16_t *)(const void *)src)[j]) : src[j];
}

static inline void store1(const job_t *J, float *dst, int64_t j, float v) {
  if (J->bf16) ((uint16_t *)(void *)dst)[j] = f32_to_bf16(v);
  else dst[j] = v;
}

/* Whether entries [lo, lo + m) of a leaf buffer hold a NaN or Inf. */
static uint32_t leaf_nonfinite(const job_t *J, const float *src, int64_t lo, int64_t m) {
  uint32_t nf = 0;
  if (J->bf16) {
    const uint16_t *h = (const uint16_t *)(const void *)src + lo;
    for (int64_t j = 0; j < m; ++j) nf |= (h[j] & 0x7f80u) == 0x7f80u;
  } else {
    for (int64_t j = 0; j < m; ++j) nf |= mag_bits(src[lo + j]) >= 0x7f800000u;
  }
  return nf;
}

/* Entries [lo, lo + m) of task t's vector of leaf s (row minus pretrained, then DARE's drop when keyed). */
VECTOR_CLONES static void load_deltas(const job_t *J, int64_t s, int64_t t, int64_t lo, int m, float *d) {
  const float *r0 = J->rows[s * J->tasks + t], *p0 = J->pre[s];
  if (J->bf16) {
    const uint16_t *r = (const uint16_t *)(const void *)r0 + lo;
    if (p0) {
      const uint16_t *p = (const uint16_t *)(const void *)p0 + lo;
      for (int i = 0; i < m; ++i) d[i] = bf16_to_f32(r[i]) - bf16_to_f32(p[i]);
    } else {
      for (int i = 0; i < m; ++i) d[i] = bf16_to_f32(r[i]);
    }
  } else if (p0) {
    const float *r = r0 + lo, *p = p0 + lo;
    for (int i = 0; i < m; ++i) d[i] = r[i] - p[i];
  } else {
    const float *r = r0 + lo;
    for (int i = 0; i < m; ++i) d[i] = r[i];
  }
  if (J->keys) {
    const uint32_t *k = J->keys + 3 * s;
    const uint32_t c0 = (uint32_t)(t * J->len[s] + lo);
    const float dp = J->drop_p, dm = J->drop_mul;
    if (dm != 0.0f) {
      for (int i = 0; i < m; ++i) d[i] = (uniform(k, c0 + (uint32_t)i) >= dp ? d[i] : 0.0f) * dm;
    } else {
      for (int i = 0; i < m; ++i) d[i] = uniform(k, c0 + (uint32_t)i) >= dp ? d[i] : 0.0f;
    }
  }
}


static void high_chunk(job_t *J, int tid, int64_t s, int64_t lo, int64_t hi) {
  const int64_t T = J->tasks;
  const float *p = J->pre[s];
  int32_t *bad = J->bad + (size_t)tid * (T + 1);
  for (int64_t t = 0; t < T; ++t) {
    const float *r = J->rows[s * T + t];
    uint32_t *h = J->hist + ((size_t)tid * T + t) * HI_BUCKETS;
    uint32_t nf = 0;
    if (J->keys || J->bf16) { /* DARE's drop or bfloat16: the inputs are checked, the task vectors counted */
      float d[BLOCK];
      nf = leaf_nonfinite(J, r, lo, hi - lo);
      for (int64_t b0 = lo; b0 < hi; b0 += BLOCK) {
        const int m = (int)(hi - b0 < BLOCK ? hi - b0 : BLOCK);
        load_deltas(J, s, t, b0, m, d);
        for (int i = 0; i < m; ++i) h[mag_bits(d[i]) >> 16]++;
      }
    } else if (p) {
      for (int64_t j = lo; j < hi; ++j) {
        uint32_t b = mag_bits(r[j] - p[j]);
        nf |= b >= 0x7f800000u;
        h[b >> 16]++;
      }
    } else {
      for (int64_t j = lo; j < hi; ++j) {
        uint32_t b = mag_bits(r[j]);
        nf |= b >= 0x7f800000u;
        h[b >> 16]++;
      }
    }
    if (nf) bad[t] = 1;
  }
  if (p && leaf_nonfinite(J, p, lo, hi - lo)) bad[T] = 1;
}

static void low_chunk(job_t *J, int tid, int64_t s, int64_t lo, int64_t hi) {
  const int64_t T = J->tasks;
  const float *p = J->pre[s];
  for (int64_t t = 0; t < T; ++t) {
    const float *r = J->rows[s * T + t];
    uint32_t *h = J->hist + ((size_t)tid * T + t) * LO_BUCKETS;
    const uint32_t want = J->hi[t];
    if (J->keys || J->bf16) {
      float d[BLOCK];
      for (int64_t b0 = lo; b0 < hi; b0 += BLOCK) {
        const int m = (int)(hi - b0 < BLOCK ? hi - b0 : BLOCK);
        load_deltas(J, s, t, b0, m, d);
        for (int i = 0; i < m; ++i) {
          uint32_t b = mag_bits(d[i]);
          if ((b >> 16) == want) h[b & 0xffffu]++;
        }
      }
      continue;
    }
    for (int64_t j = lo; j < hi; ++j) {
      uint32_t b = mag_bits(p ? r[j] - p[j] : r[j]);
      if ((b >> 16) == want) h[b & 0xffffu]++;
    }
  }
}


/* x where its sign agrees with the elected sign (jnp.where(jnp.where(s > 0, x > 0, x < 0), x, 0)), given
   dir = s > 0 ? 1 : -1: x * dir > 0 exactly when they agree. Branch-free, so the loops vectorize. */
static inline float agree(float dir, float x) { return x * dir > 0.0f ? x : 0.0f; }

/* out = pre + scale * merged. XLA:CPU contracts this multiply-add into one fused multiply-add where the CPU has
   one, so the kernel does the same (a second copy of the loop compiled for FMA, chosen at run time). */
#define FINISH_BODY                                                             \
  for (int i = 0; i < m; ++i) {                                                 \
    float y = acc[i];                                                           \
    if (merge == 1) y = y / (cnt[i] >= 1.0f ? cnt[i] : 1.0f);                   \
    else if (merge == 2) y = y * sgn[i];                                        \
    float v = p ? MULADD(y, scale, p[i]) : y * scale;                           \
    o[i] = v;                                                                   \
  }

#define MULADD(a, b, c) ((a) * (b) + (c))
static void finish_plain(float *o, const float *p, const float *acc, const float *cnt, const float *sgn,
                         int m, int merge, float scale) {
  FINISH_BODY
}
#undef MULADD

#if defined(__x86_64__) || defined(__i386__)
#define MULADD(a, b, c) __builtin_fmaf((a), (b), (c))
__attribute__((target("fma"))) static void finish_fma(float *o, const float *p, const float *acc,
                                                        const float *cnt, const float *sgn, int m, int merge,
                                                        float scale) {
  FINISH_BODY
}
#undef MULADD
static int cpu_has_fma(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("fma");
}
#elif defined(__aarch64__)
#define MULADD(a, b, c) __builtin_fmaf((a), (b), (c))
static void finish_fma(float *o, const float *p, const float *acc, const float *cnt, const float *sgn,
                       int m, int merge, float scale) {
  FINISH_BODY
}
#undef MULADD
static int cpu_has_fma(void) { return 1; }
#else
#define finish_fma finish_plain
static int cpu_has_fma(void) { return 0; }
#endif

/* Entries [b0, b0 + m) of leaf s's output: base + scale * merged (the pretrained weights as base), converted to
   the leaves' dtype. */
static void finish_block(const job_t *J, int64_t s, int64_t b0, int m, const float *acc, const float *cnt,
                         const float *sgn, int merge, float scale) {
  const float *base = J->base[s];
  if (!J->bf16) {
    const float *q = base ? base + b0 : NULL;
    if (J->fma) finish_fma(J->out[s] + b0, q, acc, cnt, sgn, m, merge, scale);
    else finish_plain(J->out[s] + b0, q, acc, cnt, sgn, m, merge, scale);
    return;
  }
  float qb[BLOCK], ob[BLOCK];
  if (base) load_f32(J, base, b0, m, qb);
  if (J->fma) finish_fma(ob, base ? qb : NULL, acc, cnt, sgn, m, merge, scale);
  else finish_plain(ob, base ? qb : NULL, acc, cnt, sgn, m, merge, scale);
  uint16_t *o = (uint16_t *)(void *)J->out[s] + b0;
  for (int i = 0; i < m; ++i) o[i] = f32_to_bf16(ob[i]);
}

/* The TIES merge of entries [lo, hi) of leaf s, block by block (loops the compiler vectorizes). Entries whose
   trimmed task vectors cancel exactly (a zero sum with nonzero terms) depend on the model's majority sign, known
   only at the end: they are merged with +1 here and their positions kept for a fix-up. */
static void merge_chunk(job_t *J, int tid, int64_t s, int64_t lo, int64_t hi) {
  const int64_t T = J->tasks;
  const float *p = J->pre[s];
  float rbuf[16 * BLOCK];
  float *rr = T <= 16 ? rbuf : (float *)malloc(sizeof(float) * T * BLOCK);
  float total[BLOCK], acc[BLOCK], cnt[BLOCK], sgn[BLOCK], dir[BLOCK];
  int32_t anyv[BLOCK];
  int64_t signsum = 0;
  const float majority = J->majority;
  const int merge = J->merge, positive = J->zero_sign == 1;
  for (int64_t b0 = lo; b0 < hi; b0 += BLOCK) {
    const int m = (int)(hi - b0 < BLOCK ? hi - b0 : BLOCK);
    for (int64_t t = 0; t < T; ++t) {
      const float *r = J->rows[s * T + t] + b0;
      const float v = J->thr[t];
      float *d = rr + t * BLOCK;
      if (J->keys || J->bf16) {
        load_deltas(J, s, t, b0, m, d);
        for (int i = 0; i < m; ++i) d[i] = fabsf(d[i]) >= v ? d[i] : 0.0f;
      } else if (p) {
        const float *pp = p + b0;
        for (int i = 0; i < m; ++i) {
          float x = r[i] - pp[i];
          d[i] = fabsf(x) >= v ? x : 0.0f;
        }
      } else {
        for (int i = 0; i < m; ++i) d[i] = fabsf(r[i]) >= v ? r[i] : 0.0f;
      }
    }
    for (int i = 0; i < m; ++i) total[i] = rr[i];
    for (int64_t t = 1; t < T; ++t) {
      const float *d = rr + t * BLOCK;
      for (int i = 0; i < m; ++i) total[i] += d[i];
    }
    if (positive) {
      for (int i = 0; i < m; ++i) sgn[i] = total[i] >= 0.0f ? 1.0f : -1.0f;
    } else {
      int32_t bs = 0;
      for (int i = 0; i < m; ++i) bs += (int32_t)(total[i] > 0.0f) - (int32_t)(total[i] < 0.0f);
      for (int i = 0; i < m; ++i) {
        float z = total[i] < 0.0f ? -1.0f : majority;
        sgn[i] = total[i] > 0.0f ? 1.0f : z;
      }
      signsum += bs;
    }
    for (int i = 0; i < m; ++i) dir[i] = sgn[i] > 0.0f ? 1.0f : -1.0f;
    if (merge == 2) {
      for (int i = 0; i < m; ++i) {
        acc[i] = fabsf(agree(dir[i], rr[i]));
      }
      for (int64_t t = 1; t < T; ++t) {
        const float *d = rr + t * BLOCK;
        for (int i = 0; i < m; ++i) {
          float a = fabsf(agree(dir[i], d[i]));
          acc[i] = acc[i] >= a ? acc[i] : a;
        }
      }
    } else {
      for (int i = 0; i < m; ++i) acc[i] = agree(dir[i], rr[i]);
      for (int64_t t = 1; t < T; ++t) {
        const float *d = rr + t * BLOCK;
        for (int i = 0; i < m; ++i) acc[i] += agree(dir[i], d[i]);
      }
      if (merge == 1) {
        for (int i = 0; i < m; ++i) cnt[i] = agree(dir[i], rr[i]) != 0.0f ? 1.0f : 0.0f;
        for (int64_t t = 1; t < T; ++t) {
          const float *d = rr + t * BLOCK;
          for (int i = 0; i < m; ++i) cnt[i] += agree(dir[i], d[i]) != 0.0f ? 1.0f : 0.0f;
        }
      }
    }
    finish_block(J, s, b0, m, acc, cnt, sgn, merge, J->scale);
    if (!positive) {
      /* Exact cancellations: a zero sum with a nonzero term (rare; kept for the fix-up). */
      for (int i = 0; i < m; ++i) anyv[i] = 0;
      for (int64_t t = 0; t < T; ++t) {
        const float *d = rr + t * BLOCK;
        for (int i = 0; i < m; ++i) anyv[i] |= d[i] != 0.0f;
      }
      int32_t nfix = 0;
      for (int i = 0; i < m; ++i) nfix += anyv[i] & (total[i] == 0.0f);
      for (int i = 0; nfix > 0 && i < m; ++i) {
        if (anyv[i] && total[i] == 0.0f) {
          fixup_t *fx = &J->fix[tid];
          if (fx->n == fx->cap) {
            fx->cap = fx->cap ? 2 * fx->cap : 64;
            fx->seg = (int64_t *)realloc(fx->seg, sizeof(int64_t) * fx->cap);
            fx->idx = (int64_t *)realloc(fx->idx, sizeof(int64_t) * fx->cap);
          }
          fx->seg[fx->n] = s;
          fx->idx[fx->n] = b0 + i;
          fx->n++;
        }
      }
    }
  }
  if (rr != rbuf) free(rr);
  J->signsum[tid] += signsum;
}

/* Task arithmetic / simple averaging of entries [lo, hi) of leaf s: base + scale * (sum or mean of the task
   vectors), summed in task order (XLA's unrolled adds); the inputs' NaN/Inf flags on the way. */
static void linear_chunk(job_t *J, int tid, int64_t s, int64_t lo, int64_t hi) {
  const int64_t T = J->tasks;
  const float *p = J->pre[s];
  int32_t *bad = J->bad + (size_t)tid * (T + 1);
  float d[BLOCK], acc[BLOCK];
  const float inv_tasks = 1.0f / (float)T; /* XLA turns the mean's division by T into this product */
  for (int64_t t = 0; t < T; ++t)
    if (leaf_nonfinite(J, J->rows[s * T + t], lo, hi - lo)) bad[t] = 1;
  if (p && leaf_nonfinite(J, p, lo, hi - lo)) bad[T] = 1;
  for (int64_t b0 = lo; b0 < hi; b0 += BLOCK) {
    const int m = (int)(hi - b0 < BLOCK ? hi - b0 : BLOCK);
    load_deltas(J, s, 0, b0, m, acc);
    for (int64_t t = 1; t < T; ++t) {
      load_deltas(J, s, t, b0, m, d);
      for (int i = 0; i < m; ++i) acc[i] += d[i];
    }
    /* The mean's 1 / T and the scale are constants of XLA's programs: it folds them into one factor. */
    const float scale = J->op == OP_MEAN ? inv_tasks * J->scale : J->scale;
    finish_block(J, s, b0, m, acc, NULL, NULL, 0, scale);
  }
}

/* One entry of the merge, recomputed with the model's majority sign (the fix-up of exact cancellations). */
static void merge_one(job_t *J, int64_t s, int64_t j) {
  const int64_t T = J->tasks;
  const float *p = J->pre[s];
  float r[1024];
  for (int64_t t = 0; t < T; ++t) {
    float x = load1(J, J->rows[s * T + t], j) - (p ? load1(J, p, j) : 0.0f);
    if (J->keys) x = dropped(J, J->keys + 3 * s, (uint32_t)(t * J->len[s] + j), x);
    r[t] = fabsf(x) >= J->thr[t] ? x : 0.0f;
  }
  float sg = J->majority; /* the sum is zero */
  float acc = 0.0f, cnt = 0.0f;
  for (int64_t t = 0; t < T; ++t) {
    float sel = agree(sg > 0.0f ? 1.0f : -1.0f, r[t]);
    if (J->merge == 2) {
      float a = fabsf(sel);
      acc = t == 0 ? a : (acc >= a ? acc : a);
    } else {
      acc = t == 0 ? sel : acc + sel;
      cnt = t == 0 ? (sel != 0.0f) : cnt + (sel != 0.0f ? 1.0f : 0.0f);
    }
  }
  float y = acc;
  if (J->merge == 1) y = y / (cnt >= 1.0f ? cnt : 1.0f);
  else if (J->merge == 2) y = y * sg;
  const float *q = J->base[s];
  const float b = q ? load1(J, q, j) : 0.0f;
  store1(J, J->out[s], j, q ? (J->fma ? fmaf(y, J->scale, b) : y * J->scale + b) : y * J->scale);
}

static void *work(void *arg) {
  worker_t *w = (worker_t *)arg;
  job_t *J = w->job;
  for (;;) {
    int64_t c = __atomic_fetch_add(&J->next, 1, __ATOMIC_RELAXED);
    if (c >= J->nchunk) break;
    int64_t s = J->cseg[c], lo = J->clo[c], hi = J->chi[c];
    switch (J->phase) {
      case PHASE_HIGH: high_chunk(J, w->tid, s, lo, hi); break;
      case PHASE_LOW: low_chunk(J, w->tid, s, lo, hi); break;
      case PHASE_LINEAR: linear_chunk(J, w->tid, s, lo, hi); break;
      default: merge_chunk(J, w->tid, s, lo, hi); break;
    }
  }
  return NULL;
}

static void run_phase(job_t *J, int phase) {
  J->phase = phase;
  J->next = 0;
  int n = (int)J->threads;
  if (n > J->nchunk) n = (int)J->nchunk;
  if (n < 1) n = 1;
  pthread_t th[64];
  worker_t ws[64];
  int started = 0;
  for (int i = 0; i < n; ++i) ws[i] = (worker_t){J, i};
  for (int i = 1; i < n; ++i) {
    if (pthread_create(&th[i], NULL, work, &ws[i]) != 0) break;
    started = i;
  }
  work(&ws[0]);
  for (int i = 1; i <= started; ++i) pthread_join(th[i], NULL);
}

/* The smallest bucket whose cumulative count reaches k (searchsorted, side="left"), and k's rank inside it. */
static uint32_t pick(const uint64_t *h, int64_t nb, int64_t k, int64_t *k_in) {
  int64_t cum = 0;
  for (int64_t b = 0; b < nb; ++b) {
    if (cum + (int64_t)h[b] >= k) {
      *k_in = k - cum;
      return (uint32_t)b;
    }
    cum += (int64_t)h[b];
  }
  *k_in = 1;
  return (uint32_t)(nb - 1);
}

/* ---- FFI plumbing ---- */

static XLA_FFI_Error *fail(const XLA_FFI_Api *api, const char *msg) {
  XLA_FFI_Error_Create_Args a;
  memset(&a, 0, sizeof(a));
  a.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
  a.message = msg;
  a.errc = XLA_FFI_Error_Code_INVALID_ARGUMENT;
  return api->XLA_FFI_Error_Create(&a);
}

static int attr_i64(const XLA_FFI_CallFrame *f, const char *name, int64_t *out) {
  for (int64_t i = 0; i < f->attrs.size; ++i) {
    const XLA_FFI_ByteSpan *nm = f->attrs.names[i];
    if (nm->len == strlen(name) && memcmp(nm->ptr, name, nm->len) == 0) {
      if (f->attrs.types[i] != XLA_FFI_AttrType_SCALAR) return 0;
      const XLA_FFI_Scalar *sc = (const XLA_FFI_Scalar *)f->attrs.attrs[i];
      if (sc->dtype != XLA_FFI_DataType_S64) return 0;
      *out = *(const int64_t *)sc->value;
      return 1;
    }
  }
  return 0;
}

static int64_t numel(const XLA_FFI_Buffer *b) {
  int64_t n = 1;
  for (int64_t i = 0; i < b->rank; ++i) n *= b->dims[i];
  return n;
}

/* Allocates a job's pointer tables (the caller fills pre, rows, out and len). */
static int job_init(job_t *J, int64_t op, int64_t nseg, int64_t T, int64_t threads, int64_t merge,
                    int64_t zero_sign, float scale) {
  memset(J, 0, sizeof(*J));
  J->op = (int)op;
  J->nseg = nseg;
  J->tasks = T;
  J->threads = threads < 1 ? 1 : (threads > 64 ? 64 : threads);
  /* TIES: each thread keeps T histograms of LO_BUCKETS 32-bit counters, at most ~256 MB of them in all. */
  const int64_t per_thread = T * LO_BUCKETS * (int64_t)sizeof(uint32_t);
  const int64_t cap = ((int64_t)256 << 20) / per_thread;
  if (op == OP_TIES && J->threads > cap) J->threads = cap < 1 ? 1 : cap;
  J->merge = (int)merge;
  J->zero_sign = (int)zero_sign;
  J->scale = scale;
  J->majority = 1.0f;
  J->fma = cpu_has_fma();
  J->pre = (const float **)calloc(nseg + 1, sizeof(float *));
  J->base = (const float **)calloc(nseg + 1, sizeof(float *));
  J->rows = (const float **)calloc(nseg * T + 1, sizeof(float *));
  J->out = (float **)calloc(nseg + 1, sizeof(float *));
  J->len = (int64_t *)calloc(nseg + 1, sizeof(int64_t));
  J->bad = (int32_t *)calloc(J->threads * (T + 1), sizeof(int32_t));
  J->signsum = (int64_t *)calloc(J->threads, sizeof(int64_t));
  J->fix = (fixup_t *)calloc(J->threads, sizeof(fixup_t));
  return J->pre && J->base && J->rows && J->out && J->len && J->bad && J->signsum && J->fix;
}

static void job_free(job_t *J) {
  free(J->hist);
  free(J->pre);
  free(J->base);
  free(J->rows);
  free(J->out);
  free(J->len);
  free(J->cseg);
  free(J->clo);
  free(J->chi);
  free(J->bad);
  free(J->signsum);
  if (J->fix)
    for (int64_t w = 0; w < J->threads; ++w) {
      free(J->fix[w].seg);
      free(J->fix[w].idx);
    }
  free(J->fix);
}

/* Sums the threads' histograms of task t into sum. */
static void reduce_hist(const job_t *J, int64_t t, int64_t nb, uint64_t *sum) {
  for (int64_t b = 0; b < nb; ++b) {
    uint64_t v = 0;
    for (int64_t w = 0; w < J->threads; ++w) v += J->hist[((size_t)w * J->tasks + t) * nb + b];
    sum[b] = v;
  }
}

/* Runs a filled-in job: TIES (thresholds, non-finite flags and in merge mode the merged leaves) or one pass of
   task arithmetic / averaging (flags and merged leaves); NULL or an error. */
static const char *job_run(job_t *J, int64_t k, float *thr_out, int32_t *bad_out) {
  const int64_t T = J->tasks;
  int64_t nchunk = 0;
  for (int64_t s = 0; s < J->nseg; ++s) nchunk += (J->len[s] + CHUNK - 1) / CHUNK;
  J->nchunk = nchunk;
  J->cseg = (int64_t *)malloc(sizeof(int64_t) * (nchunk + 1));
  J->clo = (int64_t *)malloc(sizeof(int64_t) * (nchunk + 1));
  J->chi = (int64_t *)malloc(sizeof(int64_t) * (nchunk + 1));
  uint64_t *sum = (uint64_t *)malloc(sizeof(uint64_t) * LO_BUCKETS);
  if (J->op == OP_TIES) J->hist = (uint32_t *)calloc((size_t)J->threads * T * HI_BUCKETS, sizeof(uint32_t));
  if (!J->cseg || !J->clo || !J->chi || !sum || (J->op == OP_TIES && !J->hist)) {
    free(sum);
    return "jaxmerge: out of memory";
  }
  for (int64_t s = 0, c = 0; s < J->nseg; ++s)
    for (int64_t lo = 0; lo < J->len[s]; lo += CHUNK, ++c) {
      J->cseg[c] = s;
      J->clo[c] = lo;
      J->chi[c] = lo + CHUNK < J->len[s] ? lo + CHUNK : J->len[s];
    }
  if (J->op != OP_TIES) { /* task arithmetic or simple averaging: one pass */
    free(sum);
    run_phase(J, PHASE_LINEAR);
    for (int64_t t = 0; t < T; ++t) thr_out[t] = 0.0f;
    for (int64_t t = 0; t <= T; ++t) {
      int32_t v = 0;
      for (int64_t w = 0; w < J->threads; ++w) v |= J->bad[w * (T + 1) + t];
      bad_out[t] = v;
    }
    return NULL;
  }
  run_phase(J, PHASE_HIGH); /* with k = 0 (everything kept) only for the non-finite flags */
  if (k > 0) {
    int64_t kin[1024];
    for (int64_t t = 0; t < T; ++t) {
      reduce_hist(J, t, HI_BUCKETS, sum);
      J->hi[t] = pick(sum, HI_BUCKETS, k, &kin[t]);
    }
    free(J->hist);
    J->hist = (uint32_t *)calloc((size_t)J->threads * T * LO_BUCKETS, sizeof(uint32_t));
    if (!J->hist) {
      free(sum);
      return "jaxmerge: out of memory";
    }
    run_phase(J, PHASE_LOW);
    for (int64_t t = 0; t < T; ++t) {
      int64_t unused;
      reduce_hist(J, t, LO_BUCKETS, sum);
      J->thr[t] = from_bits((J->hi[t] << 16) | pick(sum, LO_BUCKETS, kin[t], &unused));
    }
  } else {
    for (int64_t t = 0; t < T; ++t) J->thr[t] = 0.0f;
  }
  free(sum);
  for (int64_t t = 0; t < T; ++t) thr_out[t] = J->thr[t];
  for (int64_t t = 0; t <= T; ++t) {
    int32_t v = 0;
    for (int64_t w = 0; w < J->threads; ++w) v |= J->bad[w * (T + 1) + t];
    bad_out[t] = v;
  }
  if (J->merge >= 0) {
    run_phase(J, PHASE_MERGE);
    if (J->zero_sign == 0) {
      int64_t ss = 0;
      for (int64_t w = 0; w < J->threads; ++w) ss += J->signsum[w];
      J->majority = ss > 0 ? 1.0f : (ss < 0 ? -1.0f : 0.0f);
      if (J->majority != 1.0f)
        for (int64_t w = 0; w < J->threads; ++w)
          for (int64_t i = 0; i < J->fix[w].n; ++i) merge_one(J, J->fix[w].seg[i], J->fix[w].idx[i]);
    }
  }
  return NULL;
}

/* ---- Entry points ---- */

/* The XLA FFI handler (see the top of this file for its operands). */
XLA_FFI_Error *jaxmerge_ties(XLA_FFI_CallFrame *f) {
  if (f->extension_start != NULL && f->extension_start->type == XLA_FFI_Extension_Metadata) {
    XLA_FFI_Metadata_Extension *ext = (XLA_FFI_Metadata_Extension *)f->extension_start;
    ext->metadata->api_version.struct_size = XLA_FFI_Api_Version_STRUCT_SIZE;
    ext->metadata->api_version.extension_start = NULL;
    ext->metadata->api_version.major_version = XLA_FFI_API_MAJOR;
    ext->metadata->api_version.minor_version = XLA_FFI_API_MINOR;
    ext->metadata->traits = 0;
    return NULL;
  }
  const XLA_FFI_Api *api = f->api;
  if (f->stage != XLA_FFI_ExecutionStage_EXECUTE) return NULL;
  int64_t T, has_pre, stacked, k, merge, zero_sign, threads;
  if (!attr_i64(f, "tasks", &T) || !attr_i64(f, "has_pre", &has_pre) || !attr_i64(f, "stacked", &stacked) ||
      !attr_i64(f, "k", &k) || !attr_i64(f, "merge", &merge) || !attr_i64(f, "zero_sign", &zero_sign) ||
      !attr_i64(f, "threads", &threads))
    return fail(api, "jaxmerge_ties: missing or mistyped attribute");
  if (T < 1 || T > 1024) return fail(api, "jaxmerge_ties: tasks must be in 1..1024");
  const int64_t per_seg = (has_pre ? 1 : 0) + (stacked ? 1 : T);
  const int64_t first = merge >= 0 ? 1 : 0;
  const int64_t nargs = f->args.size;
  if (nargs < first || (nargs - first) % per_seg != 0) return fail(api, "jaxmerge_ties: wrong number of inputs");
  const int64_t nseg = (nargs - first) / per_seg;
  if (f->rets.size != 2 + (merge >= 0 ? nseg : 0)) return fail(api, "jaxmerge_ties: wrong number of outputs");
  for (int64_t i = 0; i < nargs; ++i)
    if (((XLA_FFI_Buffer *)f->args.args[i])->dtype != XLA_FFI_DataType_F32)
      return fail(api, "jaxmerge_ties: inputs must be float32");
  job_t J;
  float scale = merge >= 0 ? *(const float *)((XLA_FFI_Buffer *)f->args.args[0])->data : 1.0f;
  const char *msg = NULL;
  if (!job_init(&J, OP_TIES, nseg, T, threads, merge, zero_sign, scale)) {
    msg = "jaxmerge_ties: out of memory";
  } else {
    for (int64_t s = 0; s < nseg; ++s) {
      int64_t a = first + s * per_seg;
      XLA_FFI_Buffer *b0 = (XLA_FFI_Buffer *)f->args.args[a];
      int64_t n;
      if (has_pre) {
        J.pre[s] = J.base[s] = (const float *)b0->data;
        n = numel(b0);
        a++;
      } else {
        n = stacked ? numel(b0) / T : numel(b0);
      }
      J.len[s] = n;
      for (int64_t t = 0; t < T; ++t) {
        XLA_FFI_Buffer *b = (XLA_FFI_Buffer *)f->args.args[stacked ? a : a + t];
        J.rows[s * T + t] = (const float *)b->data + (stacked ? t * n : 0);
      }
      if (merge >= 0) J.out[s] = (float *)((XLA_FFI_Buffer *)f->rets.rets[2 + s])->data;
    }
    msg = job_run(&J, k, (float *)((XLA_FFI_Buffer *)f->rets.rets[0])->data,
                    (int32_t *)((XLA_FFI_Buffer *)f->rets.rets[1])->data);
  }
  job_free(&J);
  return msg ? fail(api, msg) : NULL;
}

/* The same computations on plain host pointers (NumPy arrays and CPU-resident JAX arrays, called through
   ctypes with the GIL released). bf16: the buffers hold bfloat16 entries (float32 math, outputs rounded to
   nearest even), else float32. op: 0 TIES (k, zero_sign, merge as the FFI attributes), 1 task arithmetic
   (base + scale * sum of the task vectors), 2 simple averaging (base + scale * their mean). pre: nseg pointers
   subtracted from the rows, or NULL when the rows are task vectors; base: nseg pointers added to the merged task
   vectors, or NULL for pre; rows: nseg * T pointers, task-major within a leaf; out: nseg pointers, or NULL for
   TIES's thresholds only; len: nseg entry counts; keys: nseg * 3 keys of DARE's drop (drop probability drop_p,
   survivors multiplied by drop_mul, 0 for none), or NULL. Returns 0, -1 when out of memory, -2 for a bad task
   count. */
int jaxmerge_host(int64_t op, int64_t bf16, int64_t nseg, int64_t T, const float *const *pre, const float *const *base,
                  const float *const *rows, float *const *out, const int64_t *len, int64_t k, int64_t zero_sign,
                  int64_t merge, const uint32_t *keys, float drop_p, float drop_mul, int64_t threads, float scale,
                  float *thr, int32_t *bad) {
  if (T < 1 || T > 1024 || op < OP_TIES || op > OP_MEAN || (op != OP_TIES && !out)) return -2;
  job_t J;
  const char *msg = "out of memory";
  if (job_init(&J, op, nseg, T, threads, out ? merge : -1, zero_sign, scale)) {
    J.keys = keys;
    J.bf16 = bf16 != 0;
    J.drop_p = drop_p;
    J.drop_mul = drop_mul;
    for (int64_t s = 0; s < nseg; ++s) {
      J.pre[s] = pre ? pre[s] : NULL;
      J.base[s] = base ? base[s] : J.pre[s];
      J.len[s] = len[s];
      for (int64_t t = 0; t < T; ++t) J.rows[s * T + t] = rows[s * T + t];
      J.out[s] = out ? out[s] : NULL;
    }
    msg = job_run(&J, k, thr, bad);
  }
  job_free(&J);
  return msg ? -1 : 0;
}
