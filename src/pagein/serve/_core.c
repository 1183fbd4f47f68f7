/* pagein.serve._core: the per-fault data plane of a session, in C, GIL released.
 *
 * It mirrors pagein/serve/session.py (the pure-Python engine) fault for fault: the
 * same extents, bitmaps, forward copy, readahead window, hole and REMOVE handling,
 * counters and records. Python keeps everything that is not per fault: applying
 * REMOVE/UNMAP/REMAP events to the bitmaps and extents, plans, the socket.
 *
 * Ordering rules this file keeps (the meaning of session.py's docstring):
 *  R1 One thread issues every fill for a VM and that thread also reads the events. A
 *     REMOVE lets the kernel zap as soon as it is *read*; a fill decided before the
 *     caller marks the range discarded would install stale snapshot bytes. So a drain
 *     that read any non-fault event defers all of its faults and returns them to the
 *     caller (REASON_EVENTS), which applies the events before run() serves them.
 *  R2 While a REMOVE/UNMAP/REMAP/FORK is unread every fill fails with EAGAIN: such a
 *     fault is deferred, with every fault after it (order kept), and retried after the
 *     events have been read.
 *  R3 EEXIST: another fill won the race; the page is there but its waiters may still
 *     sleep (only a successful fill wakes), so wake the range.
 *  R4 Non-fault events of one read are applied before that read's faults: a fault
 *     racing a REMOVE of its page gets zeros, which is what the guest asked for.
 *  R5 DONTWAKE fills are woken with one UFFDIO_WAKE per contiguous piece, never over a
 *     gap: a vCPU woken before its page is there only faults again.
 *  R6 On hugetlbfs the kernel also says EEXIST when the pool has no free huge page,
 *     although nothing was installed: waking then makes the vCPU fault again, forever.
 *     So a hugetlb EEXIST is checked in the VMM's /proc/PID/pagemap (`pagemap_fd`)
 *     before it is believed; a page that is not there fails the session, naming the
 *     pool. Every hugetlb EEXIST is checked, not only a repeated one: two vCPUs
 *     alternating between two pages would defeat "the same page again", and the check
 *     is one 8-byte pread next to a 2 MiB copy, on a path a fill that works never takes.
 *  R7 No fill ioctl is issued once the tripwire byte is set (pagein/serve/guard.py: the
 *     memory file changed while served): it is read before every one.
 *  R8 --share-pages (pagein/serve/pagecache.py): data pages go through the snapshot's
 *     page cache, a memfd every clone maps MAP_PRIVATE. A page not yet `present` in the
 *     cache is written into it first (pwrite: the kernel allocates the page cache page
 *     and copies in one call; hugetlbfs has no write(), so a memcpy through the cache
 *     mapping), then UFFDIO_CONTINUE maps the cache page itself, read-only, into the
 *     VMM. It answers MINOR faults (page in the cache, not mapped here) and MISSING ones
 *     (not in the cache yet: after the write it is) alike. Zeros (holes, REMOVEd pages)
 *     never go through the cache: they stay private zero pages, so a balloon's REMOVE
 *     in one clone never maps snapshot bytes there again nor touches another clone.
 *     Only snapshot bytes are ever written into the cache (R7 is checked first).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <endian.h>
#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <time.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

enum { REASON_STOP = 1, REASON_SOCKET, REASON_EVENTS, REASON_IDLE, REASON_UNSERVED,
       REASON_RECORDS, REASON_PEER_GONE, REASON_POLLERR };
enum { CAUSE_DEMAND, CAUSE_READAHEAD, CAUSE_PREFETCH, CAUSE_BACKGROUND, CAUSE_ZERO };
enum { C_FAULTS, C_PAGES, C_BYTES_FAULT, C_BYTES_READAHEAD, C_BYTES_BACKGROUND,
       C_ZERO_PAGES, C_RETRIES, C_EEXIST, C_REMOVES, C_REMOVED_BYTES, C_UNMAPS, C_REMAPS,
       /* written by the session (huge-page collapse, pagein.serve.collapse), never here */
       C_COLLAPSED, C_COLLAPSE_FAILED,
       C_LATENCY_US_SUM, C_LATENCY_BUCKETS, N_COUNTERS = C_LATENCY_BUCKETS + 14 };

#define BATCH 128                /* uffd messages per read() */
#define MIN_BULK_HOLE_PAGES 16   /* holes at least this long become zero pages in fills */
#define RECORDS_FULL 65536
#define HUGE_PAGE (2u << 20)
static const uint64_t LATENCY_BOUNDS_US[13] = {5, 10, 20, 50, 100, 200, 500, 1000, 2000,
                                               5000, 10000, 50000, 100000};

/* Outcome of an install or fill inside the core (never a Python object). */
enum { OK = 0, RETRY = 1, FAIL = -1 };

typedef struct {
    uint64_t offset, size, ps, pages, per;  /* per: readahead window in pages */
    Py_buffer filled, discarded, holes;     /* holes.buf NULL: no holes */
} region_t;
typedef struct { uint64_t address, length, rel; uint32_t region; } extent_t;
typedef struct { uint64_t offset, length, address; } overlay_t;
typedef struct { uint64_t address, flags, t_read; uint32_t tid; } fault_t;
typedef struct { uint64_t code, a, b, c; } event_t;
typedef struct { uint64_t address, length; } span_t;
typedef struct { uint64_t t_ns, offset; uint32_t x, y; } record_t;  /* 24 bytes */

/* A growable array of fixed-size items, malloc'd (usable with the GIL released). */
typedef struct { void *p; size_t n, cap, size; } vec_t;

static void *vec_push(vec_t *v) {
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        void *p = realloc(v->p, cap * v->size);
        if (!p) return NULL;
        v->p = p, v->cap = cap;
    }
    return (char *)v->p + v->size * v->n++;
}
static void vec_free(vec_t *v) { free(v->p); v->p = NULL; v->n = v->cap = 0; }

typedef struct {
    PyObject_HEAD
    int uffd, closed, busy, record;
    Py_ssize_t nregions;
    region_t *regions;
    Py_buffer counters_view;
    uint64_t *c;
    uint64_t base, zero_address, chunk_bytes;
    overlay_t *overlay; Py_ssize_t noverlay;
    extent_t *extents; Py_ssize_t nextents;
    /* Messages are read into `msgs`: our own buffer, or the VM's journal in shared memory
     * (the `journal` argument). Reading straight into the journal means a non-fault
     * event the kernel handed over is on record the moment read() returns: a worker
     * killed before applying it leaves it there for its successor (R6). */
    struct uffd_msg msgs_own[BATCH];
    struct uffd_msg *msgs;
    Py_buffer journal_view;
    int journal_dirty;  /* the journal holds events the caller has not applied yet */
    vec_t deferred; size_t dhead;   /* faults waiting for a retry: [dhead, n) */
    vec_t events, unserved, installed, fault_rec, fill_rec;
    uint32_t fault_region; uint64_t fault_page;  /* the page being faulted on */
    int pagemap_fd;                  /* the VMM's /proc/PID/pagemap (R6), or -1 */
    Py_buffer trip_view;             /* R7: byte 0 turns 1 when the source changed */
    const volatile uint8_t *trip;
    int err, custom; char msg[320];  /* the failure to raise once the GIL is back */
    /* epoll rather than poll: the registrations persist, so a wait per fault costs one
     * cheap syscall whatever the number of fds (measured: poll on 3 fds cost ~1 us more
     * per fault than a C handler's poll on 2 here). sock/stop fds must stay open while
     * registered (a session keeps them for its whole life). */
    int ep, ep_sock, ep_stop, ep_made;
    int crash_point; uint64_t crash_left;  /* set_crash(): the recovery tests only */
    /* R8: the page cache (cache_fd < 0: none). present: one bit per cache page. */
    int cache_fd; uint64_t cache_address, cache_ps, cache_pages;
    Py_buffer present_view;
} Core;

enum { CRASH_FILL = 1, CRASH_EVENT = 2 };  /* pagein.serve.crash.CrashPoint */

/* Die like a SIGKILLed worker the crash_left-th time `point` is reached (set_crash). */
static void crash_point(Core *s, int point) {
    if (s->crash_point != point || !s->crash_left || --s->crash_left) return;
    dprintf(2, "pagein: crash point %s reached: SIGKILL (PAGEIN_CRASH_AT)\n",
            point == CRASH_FILL ? "fill" : "event");
    kill(getpid(), SIGKILL);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int fail(Core *s, int err, const char *op, uint64_t a, uint64_t len) {
    s->err = err, s->custom = 0;
    snprintf(s->msg, sizeof s->msg, "%s at 0x%llx length 0x%llx failed: %s", op,
             (unsigned long long)a, (unsigned long long)len, strerror(err));
    return FAIL;
}

/* --- bitmaps: bit i = page i, LSB first; searched 64 bits at a time -------------- */

static inline uint64_t load64(const uint8_t *b, size_t nbytes, size_t byte) {
    uint64_t w = 0;
    if (byte + 8 <= nbytes) memcpy(&w, b + byte, 8);
    else if (byte < nbytes) memcpy(&w, b + byte, nbytes - byte);
    return le64toh(w);
}
static inline int test_bit(const Py_buffer *m, uint64_t i) {
    return m->buf && (((const uint8_t *)m->buf)[i >> 3] >> (i & 7)) & 1;
}
/* First index in [from, limit) whose bit equals `want`, else limit. Bytes beyond the
 * buffer read as 0 (inverted: 1), at indices >= 8*len >= limit, so clamping is enough. */
static uint64_t next_bit(const Py_buffer *m, uint64_t from, uint64_t limit, int want) {
    if (!m->buf) return want ? limit : from < limit ? from : limit;
    const uint8_t *b = m->buf;
    size_t nbytes = (size_t)m->len;
    for (uint64_t i = from; i < limit;) {
        uint64_t w = load64(b, nbytes, i >> 3);
        if (!want) w = ~w;
        w >>= (i & 7);
        if (w) {
            uint64_t r = i + (uint64_t)__builtin_ctzll(w);
            return r < limit ? r : limit;
        }
        i += 64 - (i & 7);
    }
    return limit;
}
#define next_set(m, f, l) next_bit((m), (f), (l), 1)
#define next_clear(m, f, l) next_bit((m), (f), (l), 0)

static void set_bits(Py_buffer *m, uint64_t i, uint64_t n) {
    uint8_t *b = m->buf;
    uint64_t end = i + n;
    for (; i < end && (i & 7); i++) b[i >> 3] |= (uint8_t)(1u << (i & 7));
    if (end - i >= 8 && i < end) {
        memset(b + (i >> 3), 0xff, (end - i) >> 3);
        i += (end - i) & ~(uint64_t)7;
    }
    for (; i < end; i++) b[i >> 3] |= (uint8_t)(1u << (i & 7));
}

/* --- accounting and records -------------------------------------------------------- */

static int add_fill_record(Core *s, uint64_t offset, uint64_t pages, int cause) {
    record_t *r = vec_push(&s->fill_rec);
    if (!r) return fail(s, ENOMEM, "recording a fill", offset, pages);
    *r = (record_t){now_ns(), offset, (uint32_t)pages, (uint32_t)cause};
    return OK;
}

/* k pages from `page` were installed: mark them filled, count them by cause. For a
 * fault's install (CAUSE_DEMAND) only the faulting page is demand, the rest readahead. */
static int account(Core *s, uint32_t ri, uint64_t page, uint64_t k, int zero, int cause) {
    if (!k) return OK;
    region_t *r = &s->regions[ri];
    set_bits(&r->filled, page, k);
    s->c[C_PAGES] += k;
    uint64_t demand = cause == CAUSE_DEMAND && ri == s->fault_region && page == s->fault_page;
    int rest = cause == CAUSE_DEMAND ? CAUSE_READAHEAD : cause;
    if (zero) s->c[C_ZERO_PAGES] += k;
    else {
        s->c[C_BYTES_FAULT] += demand * r->ps;
        uint64_t nbytes = (k - demand) * r->ps;
        s->c[rest == CAUSE_READAHEAD ? C_BYTES_READAHEAD : C_BYTES_BACKGROUND] += nbytes;
    }
    if (!s->record) return OK;
    uint64_t off = r->offset + page * r->ps;
    if (zero) return add_fill_record(s, off, k, CAUSE_ZERO);
    if (demand && add_fill_record(s, off, 1, CAUSE_DEMAND)) return FAIL;
    if (k > demand) return add_fill_record(s, off + demand * r->ps, k - demand, rest);
    return OK;
}

/* --- ioctls ------------------------------------------------------------------------ */

static int wake(Core *s, uint64_t start, uint64_t len) {
    struct uffdio_range range = {.start = start, .len = len};
    if (ioctl(s->uffd, UFFDIO_WAKE, &range) < 0)
        return fail(s, errno, "UFFDIO_WAKE", start, len);
    return OK;
}

/* The source of a copy of `len` bytes at file offset `off`: an overlay run holding all
 * of it, else the raw memory file. */
static uint64_t source_of(Core *s, uint64_t off, uint64_t len) {
    Py_ssize_t lo = 0, hi = s->noverlay;
    while (lo < hi) {  /* the last run starting at or before off */
        Py_ssize_t mid = (lo + hi) / 2;
        if (s->overlay[mid].offset <= off) lo = mid + 1; else hi = mid;
    }
    if (lo > 0) {
        overlay_t *o = &s->overlay[lo - 1];
        if (off + len <= o->offset + o->length) return o->address + (off - o->offset);
    }
    return s->base + off;
}

/* R8: put the snapshot bytes of [off, off+len) into the page cache where they are not
 * yet present. 0 or an errno (*op names the call). */
static int ensure_cache(Core *s, uint64_t off, uint64_t len, const char **op) {
    Py_buffer *present = &s->present_view;
    uint64_t ps = s->cache_ps, first = off / ps, end = (off + len) / ps;
    if (next_clear(present, first, end) == end) return 0;  /* warm: the common case */
    for (uint64_t p = first; (p = next_clear(present, p, end)) < end;) {
        uint64_t q = next_set(present, p, end);
        uint64_t at = p * ps, n = (q - p) * ps;
        const char *src = (const char *)(uintptr_t)source_of(s, at, n);
        if (ps == 4096) {
            for (uint64_t done = 0; done < n;) {
                ssize_t w = pwrite(s->cache_fd, src + done, n - done, (off_t)(at + done));
                if (w < 0 && errno == EINTR) continue;
                if (w <= 0) { *op = "pwrite(page cache)"; return w < 0 ? errno : EIO; }
                done += (uint64_t)w;
            }
        } else {
            memcpy((char *)(uintptr_t)s->cache_address + at, src, n);
        }
        set_bits(present, p, q - p);
        p = q;
    }
    return 0;
}

/* Issue one fill ioctl for n pages at dst; return 0 or errno, with *done = bytes the
 * kernel reports as done (its progress field: bytes, or -errno). */
static int one_ioctl(Core *s, region_t *r, uint64_t dst, uint64_t page, uint64_t n,
                     int zero, int dontwake, int64_t *done, const char **op) {
    uint64_t len = n * r->ps;
    int rc;
    if (zero && r->ps == 4096) {
        struct uffdio_zeropage z = {.range = {dst, len},
                                    .mode = dontwake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0};
        *op = "UFFDIO_ZEROPAGE";
        rc = ioctl(s->uffd, UFFDIO_ZEROPAGE, &z);
        *done = z.zeropage;
    } else if (!zero && s->cache_fd >= 0) {  /* R8 */
        uint64_t off = r->offset + page * r->ps;
        int err = ensure_cache(s, off, len, op);
        *done = 0;
        if (err) return err;
        struct uffdio_continue c = {.range = {dst, len},
                                    .mode = dontwake ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0};
        *op = "UFFDIO_CONTINUE";
        rc = ioctl(s->uffd, UFFDIO_CONTINUE, &c);
        *done = c.mapped;
    } else {
        /* hugetlbfs has no zero page: copy from a zero buffer (n is 1 then) */
        uint64_t src = zero ? s->zero_address : source_of(s, r->offset + page * r->ps, len);
        struct uffdio_copy c = {.dst = dst, .src = src, .len = len,
                                .mode = dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0};
        *op = "UFFDIO_COPY";
        rc = ioctl(s->uffd, UFFDIO_COPY, &c);
        *done = c.copy;
    }
    if (rc == 0) { *done = (int64_t)len; return 0; }
    int err = errno;
    if (*done < 0) *done = 0;
    return err;
}

static int remember(Core *s, int dontwake, uint64_t dst, uint64_t len) {
    if (!dontwake || !len) return OK;
    span_t *sp = vec_push(&s->installed);
    if (!sp) return fail(s, ENOMEM, "remembering a fill", dst, len);
    *sp = (span_t){dst, len};
    return OK;
}

/* R6: whether the VMM really has the huge page at dst (its pagemap says present). An
 * unreadable pagemap (no fd, the VMM gone) believes the kernel, as before: the next
 * ioctl then reports ESRCH. */
static int huge_page_present(Core *s, uint64_t dst) {
    uint64_t entry = 0;
    if (s->pagemap_fd < 0) return 1;
    if (pread(s->pagemap_fd, &entry, sizeof entry, (off_t)(dst / 4096 * sizeof entry)) !=
        (ssize_t)sizeof entry)
        return 1;
    return (int)(le64toh(entry) >> 63);
}

static int pool_empty(Core *s, uint64_t dst, uint64_t ps) {
    s->err = ENOMEM, s->custom = 1;
    snprintf(s->msg, sizeof s->msg, "UFFDIO_COPY of the %llu KiB page at 0x%llx said EEXIST "
             "but the VMM has no page there: the hugetlb pool has no free %llu KiB page; "
             "raise vm.nr_hugepages (or /sys/kernel/mm/hugepages/hugepages-%llukB/"
             "nr_hugepages)", (unsigned long long)ps / 1024, (unsigned long long)dst,
             (unsigned long long)ps / 1024, (unsigned long long)ps / 1024);
    return FAIL;
}

/* Install `count` pages of region ri from `page` at dst, in chunks; mark them filled.
 * OK, RETRY (EAGAIN: the done part is accounted) or FAIL. */
static int install(Core *s, uint32_t ri, uint64_t dst, uint64_t page, uint64_t count,
                   int zero, int cause, int dontwake) {
    region_t *r = &s->regions[ri];
    uint64_t chunk = s->chunk_bytes / r->ps ? s->chunk_bytes / r->ps : 1;
    if (zero && r->ps != 4096) chunk = 1;  /* one zero-buffer copy per huge page */
    while (count) {
        uint64_t n = count < chunk ? count : chunk;
        int64_t done;
        const char *op;
        if (s->trip && __atomic_load_n(s->trip, __ATOMIC_ACQUIRE)) {  /* R7 */
            s->err = ESTALE, s->custom = 1;
            snprintf(s->msg, sizeof s->msg, "the memory file changed while it was served: "
                     "not filling 0x%llx length 0x%llx", (unsigned long long)dst,
                     (unsigned long long)(n * r->ps));
            return FAIL;
        }
        int err = one_ioctl(s, r, dst, page, n, zero, dontwake, &done, &op);
        uint64_t k = (uint64_t)done / r->ps;
        if (err == 0 || err == EAGAIN) {
            if (k > n) k = n;
            if (k) crash_point(s, CRASH_FILL);  /* installed, not yet marked filled */
            if (account(s, ri, page, k, zero, cause) || remember(s, dontwake, dst, k * r->ps))
                return FAIL;
            /* R2: EAGAIN with nothing done means an event is unread: retry after it. A
             * partial copy also ends in EAGAIN, e.g. at a page a racing fill installed:
             * go on at once; the kernel refuses again (nothing done) if an event is
             * pending, so this never fills ahead of an unread REMOVE. */
            if (err == EAGAIN && k == 0) return RETRY;
            dst += k * r->ps, page += k, count -= k;
        } else if (err == EEXIST) {
            /* R3: page+k exists (a racing fill won): skip it and wake its waiters,
             * which only a successful fill would have woken. */
            if (k >= n) k = n - 1;
            if (account(s, ri, page, k, zero, cause)) return FAIL;
            if (r->ps != 4096 && !huge_page_present(s, dst + k * r->ps))
                return pool_empty(s, dst + k * r->ps, r->ps);
            set_bits(&r->filled, page + k, 1);
            if (wake(s, dst, (k + 1) * r->ps) ||
                remember(s, dontwake, dst, (k + 1) * r->ps))
                return FAIL;
            s->c[C_EEXIST] += 1;
            dst += (k + 1) * r->ps, page += k + 1, count -= k + 1;
        } else if (err == ENOENT) {
            /* The range was unmapped behind us (no UNMAP event asked for). */
            set_bits(&r->filled, page, count);
            return OK;
        } else {
            return fail(s, err, op, dst, n * r->ps);
        }
    }
    return OK;
}

/* Install [p, q) of region ri at dst, zero-filling runs of >= MIN_BULK_HOLE_PAGES hole
 * pages; shorter holes are copied with their neighbours (one ioctl per small hole costs
 * more than the memory a zero page saves). */
static int install_split_holes(Core *s, uint32_t ri, uint64_t dst, uint64_t p, uint64_t q,
                               int cause, int dontwake) {
    region_t *r = &s->regions[ri];
    uint64_t pos = p, i = p;
    while ((i = next_set(&r->holes, i, q)) < q) {
        uint64_t j = next_clear(&r->holes, i, q);
        if (j - i >= MIN_BULK_HOLE_PAGES) {
            int rc;
            if (i > pos && (rc = install(s, ri, dst + (pos - p) * r->ps, pos, i - pos, 0,
                                         cause, dontwake)))
                return rc;
            if ((rc = install(s, ri, dst + (i - p) * r->ps, i, j - i, 1, cause, dontwake)))
                return rc;
            pos = j;
        }
        i = j;
    }
    return pos < q ? install(s, ri, dst + (pos - p) * r->ps, pos, q - pos, 0, cause,
                             dontwake) : OK;
}

/* Fill the unfilled pages of [first, first+pages) of region ri that lie in live
 * extents: discarded runs as zeros, long holes as zeros (not for PREFETCH), the rest
 * copied. Stops at the first EAGAIN (RETRY). */
static int fill(Core *s, uint32_t ri, uint64_t first, uint64_t pages, int cause,
                int dontwake) {
    region_t *r = &s->regions[ri];
    uint64_t lo = first * r->ps, hi = (first + pages) * r->ps;
    for (Py_ssize_t x = 0; x < s->nextents; x++) {
        extent_t *e = &s->extents[x];
        if (e->region != ri) continue;
        uint64_t a = lo > e->rel ? lo : e->rel;
        uint64_t b = hi < e->rel + e->length ? hi : e->rel + e->length;
        if (a >= b) continue;
        uint64_t pb = b / r->ps;
        for (uint64_t i = a / r->ps; (i = next_clear(&r->filled, i, pb)) < pb;) {
            uint64_t j = next_set(&r->filled, i, pb);
            while (i < j) {  /* split the clear run [i, j) into discarded / the rest */
                int zero = test_bit(&r->discarded, i);
                uint64_t q = zero ? next_clear(&r->discarded, i, j)
                                  : next_set(&r->discarded, i, j);
                uint64_t dst = e->address + i * r->ps - e->rel;
                int rc = zero || r->ps != 4096 || cause == CAUSE_PREFETCH || !r->holes.buf
                    ? install(s, ri, dst, i, q - i, zero, cause, dontwake)
                    : install_split_holes(s, ri, dst, i, q, cause, dontwake);
                if (rc) return rc;
                i = q;
            }
        }
    }
    return OK;
}

/* --- faults ------------------------------------------------------------------------ */

static Py_ssize_t locate(Core *s, uint64_t address) {
    Py_ssize_t lo = 0, hi = s->nextents;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (s->extents[mid].address <= address) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return -1;
    extent_t *e = &s->extents[lo - 1];
    return address < e->address + e->length ? lo - 1 : -1;
}

static void observe_latency(Core *s, uint64_t t_read) {
    uint64_t t = now_ns(), us = t > t_read ? (t - t_read) / 1000 : 0;
    int i = 0;
    while (i < 13 && us > LATENCY_BOUNDS_US[i]) i++;
    s->c[C_LATENCY_BUCKETS + i] += 1;
    s->c[C_LATENCY_US_SUM] += us;
}

/* Serve one fault: the faulting page, the pages a single copy can bring with it, then
 * the readahead window. OK, RETRY (defer it) or FAIL. */
static int serve_fault(Core *s, const fault_t *f) {
    Py_ssize_t x = locate(s, f->address);
    if (x < 0) {  /* outside every extent: the caller decides (that vCPU stays blocked) */
        fault_t *u = vec_push(&s->unserved);
        if (!u) return fail(s, ENOMEM, "queueing an unserved fault", f->address, 0);
        *u = *f;
        return OK;
    }
    extent_t *e = &s->extents[x];
    uint32_t ri = e->region;
    region_t *r = &s->regions[ri];
    uint64_t p = (e->rel + f->address - e->address) / r->ps;
    uint64_t dst = e->address + p * r->ps - e->rel;
    uint64_t left = (e->address + e->length - dst) / r->ps;
    int zero = test_bit(&r->discarded, p) || (r->ps == 4096 && test_bit(&r->holes, p));
    int window = r->per > 1;
    uint64_t first = window ? p - p % r->per : p;
    uint64_t wpages = window ? (r->per < r->pages - first ? r->per : r->pages - first) : 0;
    uint64_t n = 1;
    if (window && !zero) {
        /* Copy the unfilled, undiscarded pages after p with it (up to the window, the
         * extent, a long hole): a sequential reader is spared its next fault. */
        uint64_t stop = first + wpages < p + left ? first + wpages : p + left;
        stop = next_set(&r->filled, p + 1, stop);
        stop = next_set(&r->discarded, p + 1, stop);
        if (r->ps == 4096 && r->holes.buf)
            for (uint64_t i = p + 1; (i = next_set(&r->holes, i, stop)) < stop;) {
                uint64_t j = next_clear(&r->holes, i, stop);
                if (j - i >= MIN_BULK_HOLE_PAGES) { stop = i; break; }
                i = j;
            }
        n = stop > p ? stop - p : 1;
    }
    s->fault_region = ri, s->fault_page = p;
    /* Always install, even if `filled` says the page is there: a duplicate fault (two
     * vCPUs) then gets EEXIST and a wake, never a lost wakeup. */
    int rc = install(s, ri, dst, p, n, zero, CAUSE_DEMAND, 0);
    s->fault_page = UINT64_MAX;
    if (rc) return rc;
    s->c[C_FAULTS] += 1;
    if (s->record) {
        record_t *rec = vec_push(&s->fault_rec);
        if (!rec) return fail(s, ENOMEM, "recording a fault", f->address, 0);
        *rec = (record_t){now_ns(), r->offset + p * r->ps, f->tid, (uint32_t)zero};
    }
    /* The rest of the window; its EAGAIN is ignored: those pages come later. */
    if (window && fill(s, ri, first, wpages, CAUSE_READAHEAD, 0) == FAIL) return FAIL;
    observe_latency(s, f->t_read);
    return OK;
}

/* Serve the queued faults in order; on EAGAIN keep that one and all after it (R2). */
static int serve_queue(Core *s) {
    fault_t *q = s->deferred.p;
    while (s->dhead < s->deferred.n) {
        int rc = serve_fault(s, &q[s->dhead]);
        if (rc == FAIL) return FAIL;
        if (rc == RETRY) { s->c[C_RETRIES] += 1; return RETRY; }
        s->dhead++;
    }
    s->dhead = s->deferred.n = 0;
    return OK;
}

/* Read every pending message. Faults join the queue; other events go to `events` and
 * are counted. Return the number of non-fault events, or -1. */
static Py_ssize_t drain(Core *s) {
    Py_ssize_t nevents = 0;
    struct pollfd pfd = {.fd = s->uffd, .events = POLLIN};
    if (s->dhead && s->dhead == s->deferred.n) s->dhead = s->deferred.n = 0;
    for (;;) {
        /* Only read when poll said so: the VMM may have made the uffd blocking. */
        if (s->journal_dirty) break;  /* never overwrite events not yet applied */
        ssize_t got = read(s->uffd, s->msgs, BATCH * sizeof(struct uffd_msg));
        uint64_t t = now_ns();
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR) break;
            fail(s, errno, "read(uffd)", 0, BATCH * sizeof(struct uffd_msg));
            return -1;
        }
        size_t n = (size_t)got / sizeof(struct uffd_msg);
        Py_ssize_t had = nevents;
        for (size_t i = 0; i < n; i++) {
            struct uffd_msg *m = &s->msgs[i];
            if (m->event == UFFD_EVENT_PAGEFAULT) {
                fault_t *f = vec_push(&s->deferred);
                if (!f) { fail(s, ENOMEM, "queueing a fault", 0, 0); return -1; }
                *f = (fault_t){m->arg.pagefault.address, m->arg.pagefault.flags, t,
                               m->arg.pagefault.feat.ptid};
                /* A fault needs no record: its thread still waits, and a successor's
                 * wake of every range makes it fault again. */
                if (s->msgs != s->msgs_own) memset(m, 0, sizeof *m);
                continue;
            }
            if (s->msgs != s->msgs_own) s->journal_dirty = 1;
            event_t *ev = vec_push(&s->events);
            if (!ev) { fail(s, ENOMEM, "queueing an event", 0, 0); return -1; }
            nevents++;
            uint64_t w[3];
            memcpy(w, (const char *)m + 8, sizeof w);  /* the union's first 24 bytes */
            *ev = (event_t){m->event, w[0], w[1], w[2]};
            if (m->event == UFFD_EVENT_FORK) ev->a = m->arg.fork.ufd, ev->b = ev->c = 0;
            else if (m->event == UFFD_EVENT_REMOVE) {
                ev->c = 0;
                s->c[C_REMOVES] += 1, s->c[C_REMOVED_BYTES] += w[1] - w[0];
            } else if (m->event == UFFD_EVENT_UNMAP) ev->c = 0, s->c[C_UNMAPS] += 1;
            else if (m->event == UFFD_EVENT_REMAP) s->c[C_REMAPS] += 1;
        }
        if (nevents > had) crash_point(s, CRASH_EVENT);  /* read, not yet applied */
        /* A short read emptied the queue; a full one may have left more behind. */
        if (n < BATCH || poll(&pfd, 1, 0) <= 0) break;
    }
    return nevents;
}

#define RUN_EINTR (-2)

/* The loop of run(), GIL released. Returns a reason, FAIL or RUN_EINTR. */
/* Watch `fd` (or nothing, -1) under `tag` instead of whatever `*cur` was. */
static int ep_watch(Core *s, int *cur, int fd, uint32_t tag) {
    if (*cur == fd) return 0;
    if (*cur >= 0) epoll_ctl(s->ep, EPOLL_CTL_DEL, *cur, NULL);  /* may be closed: fine */
    *cur = -1;
    if (fd < 0) return 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = tag};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev) < 0) return fail(s, errno, "epoll_ctl", (uint64_t)fd, 0);
    *cur = fd;
    return 0;
}

static int ep_setup(Core *s, int stop_fd, int sock_fd) {
    if (!s->ep_made) {
        s->ep = epoll_create1(EPOLL_CLOEXEC);
        if (s->ep < 0) return fail(s, errno, "epoll_create1", 0, 0);
        s->ep_made = 1, s->ep_sock = s->ep_stop = -1;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0};
        if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->uffd, &ev) < 0)
            return fail(s, errno, "epoll_ctl(uffd)", (uint64_t)s->uffd, 0);
    }
    if (ep_watch(s, &s->ep_sock, sock_fd, 1) == FAIL) return FAIL;
    return ep_watch(s, &s->ep_stop, stop_fd, 2);
}

static int run_loop(Core *s, int stop_fd, int sock_fd, int timeout_ms) {
    uint64_t idle_since = now_ns();
    int turns = 0;
    if (s->journal_dirty)  /* reading on would overwrite events nobody applied */
        return fail(s, EBUSY, "run() before applied()", 0, 0);
    if (ep_setup(s, stop_fd, sock_fd) == FAIL) return FAIL;
    if (s->dhead < s->deferred.n) {  /* the caller applied the events: retry at once */
        int rc = serve_queue(s);
        if (rc == FAIL) return FAIL;
    }
    for (;; turns++) {
        struct epoll_event evs[3];
        uint32_t rev[3] = {0, 0, 0};  /* uffd, socket, stop */
        int deferred = s->dhead < s->deferred.n, wait = -1;
        if (timeout_ms >= 0) {
            uint64_t gone = (now_ns() - idle_since) / 1000000;
            wait = gone >= (uint64_t)timeout_ms ? 0 : timeout_ms - (int)gone;
        }
        if (deferred && (wait < 0 || wait > 1)) wait = 1;  /* retry soon */
        int ready = epoll_wait(s->ep, evs, 3, wait);
        if (ready < 0) {
            if (errno == EINTR) return RUN_EINTR;
            return fail(s, errno, "epoll_wait", 0, 0);
        }
        for (int i = 0; i < ready; i++) rev[evs[i].data.u32 % 3] |= evs[i].events;
        if (rev[2]) return REASON_STOP;
        if (rev[0] & EPOLLERR) return REASON_POLLERR;
        if (rev[0] & EPOLLIN) {
            Py_ssize_t nevents = drain(s);
            if (nevents < 0) return FAIL;
            /* R1/R4: the caller applies these events before any of the faults is served;
             * the faults wait in the queue (deferred) and are served by the next run(). */
            if (nevents > 0) return REASON_EVENTS;
        }
        if (s->dhead < s->deferred.n && serve_queue(s) == FAIL)
            return s->err == ESRCH ? REASON_PEER_GONE : FAIL;
        if (s->unserved.n) return REASON_UNSERVED;
        if (rev[1] & (EPOLLIN | EPOLLHUP | EPOLLERR)) return REASON_SOCKET;
        if (ready) idle_since = now_ns();
        if (timeout_ms == 0 ||
            (timeout_ms >= 0 && !ready &&
             now_ns() - idle_since >= (uint64_t)timeout_ms * 1000000))
            return REASON_IDLE;
        if (s->record && s->fault_rec.n + s->fill_rec.n >= RECORDS_FULL) return REASON_RECORDS;
    }
}

/* --- the Python object (everything below runs with the GIL held) ------------------- */

static int fetch_u64(PyObject *o, const char *what, uint64_t *out) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.50s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_ValueError, "%s must be a non-negative 64-bit int", what);
        return -1;
    }
    *out = v;
    return 0;
}

/* Unpack a sequence of int tuples of width `w` into a malloc'd uint64 array. */
static uint64_t *int_rows(PyObject *seq, Py_ssize_t w, const char *what, Py_ssize_t *n) {
    PyObject *fast = PySequence_Fast(seq, "");
    if (!fast) {
        PyErr_Format(PyExc_TypeError, "%s must be a sequence", what);
        return NULL;
    }
    *n = PySequence_Fast_GET_SIZE(fast);
    uint64_t *out = PyMem_Calloc((size_t)(*n ? *n : 1) * (size_t)w, sizeof(uint64_t));
    if (!out) { Py_DECREF(fast); PyErr_NoMemory(); return NULL; }
    for (Py_ssize_t i = 0; i < *n; i++) {
        PyObject *row = PySequence_Fast_GET_ITEM(fast, i);
        if (w == 1) {
            if (fetch_u64(row, what, &out[i])) goto bad;
            continue;
        }
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != w) {
            PyErr_Format(PyExc_TypeError, "%s[%zd] must be a tuple of %zd ints", what, i, w);
            goto bad;
        }
        for (Py_ssize_t j = 0; j < w; j++)
            if (fetch_u64(PyTuple_GET_ITEM(row, j), what, &out[i * w + j])) goto bad;
    }
    Py_DECREF(fast);
    return out;
bad:
    Py_DECREF(fast);
    PyMem_Free(out);
    return NULL;
}

/* Take per-region buffers from `seq` into the views at `field` of each region. */
static int take_buffers(Core *s, PyObject *seq, size_t field, int writable, int none_ok,
                        const char *what) {
    PyObject *fast = PySequence_Fast(seq, "");
    if (!fast) { PyErr_Format(PyExc_TypeError, "%s must be a sequence", what); return -1; }
    int rc = -1;
    if (PySequence_Fast_GET_SIZE(fast) != s->nregions) {
        PyErr_Format(PyExc_ValueError, "%s has %zd entries for %zd regions", what,
                     PySequence_Fast_GET_SIZE(fast), s->nregions);
        goto out;
    }
    for (Py_ssize_t i = 0; i < s->nregions; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(fast, i);
        Py_buffer *v = (Py_buffer *)((char *)&s->regions[i] + field);
        if (o == Py_None && none_ok) continue;
        if (PyObject_GetBuffer(o, v, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
            v->buf = NULL;
            PyErr_Format(PyExc_TypeError, "%s[%zd] must be a %scontiguous buffer, not %.50s",
                         what, i, writable ? "writable " : "", Py_TYPE(o)->tp_name);
            goto out;
        }
        if ((uint64_t)v->len < (s->regions[i].pages + 7) / 8) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] has %zd bytes; region %zd has %llu pages "
                         "and needs %llu", what, i, v->len, i,
                         (unsigned long long)s->regions[i].pages,
                         (unsigned long long)(s->regions[i].pages + 7) / 8);
            PyBuffer_Release(v);
            v->buf = NULL;
            goto out;
        }
    }
    rc = 0;
out:
    Py_DECREF(fast);
    return rc;
}

static void core_release(Core *s) {
    for (Py_ssize_t i = 0; s->regions && i < s->nregions; i++) {
        region_t *r = &s->regions[i];
        if (r->filled.buf) PyBuffer_Release(&r->filled);
        if (r->discarded.buf) PyBuffer_Release(&r->discarded);
        if (r->holes.buf) PyBuffer_Release(&r->holes);
    }
    PyMem_Free(s->regions);
    s->regions = NULL, s->nregions = 0;
    if (s->c) PyBuffer_Release(&s->counters_view);
    s->c = NULL;
    PyMem_Free(s->overlay); s->overlay = NULL, s->noverlay = 0;
    PyMem_Free(s->extents); s->extents = NULL, s->nextents = 0;
    vec_t *vecs[] = {&s->deferred, &s->events, &s->unserved, &s->installed, &s->fault_rec,
                     &s->fill_rec};
    for (size_t i = 0; i < sizeof vecs / sizeof *vecs; i++) vec_free(vecs[i]);
    s->dhead = 0;
    if (s->journal_view.buf) PyBuffer_Release(&s->journal_view);
    s->journal_view.buf = NULL;
    if (s->trip_view.buf) PyBuffer_Release(&s->trip_view);
    s->trip_view.buf = NULL, s->trip = NULL;
    if (s->present_view.buf) PyBuffer_Release(&s->present_view);
    s->present_view.buf = NULL, s->cache_fd = -1;
    s->msgs = s->msgs_own;
    if (s->ep_made) close(s->ep);
    s->ep_made = 0;
    s->closed = 1;
}

/* The `cache` argument (R8): (data memfd, its address in this process, its size in
 * bytes, the present bitmap, the page size). Every region must use the cache's page
 * size and lie inside it: a fault would otherwise write past the cache or map another
 * page. */
static int take_cache(Core *s, PyObject *cache) {
    int fd;
    PyObject *address, *present;
    unsigned long long size, ps;
    if (!PyArg_ParseTuple(cache, "iOKOK:cache", &fd, &address, &size, &present, &ps))
        return -1;
    if (fd < 0 || (ps != 4096 && ps != HUGE_PAGE)) {
        PyErr_Format(PyExc_ValueError, "cache: fd %d and page size %llu must be >= 0 and "
                     "4096 or 2 MiB", fd, ps);
        return -1;
    }
    if (fetch_u64(address, "cache address", &s->cache_address)) return -1;
    if (PyObject_GetBuffer(present, &s->present_view, PyBUF_WRITABLE) < 0) {
        s->present_view.buf = NULL;
        return -1;
    }
    s->cache_ps = ps, s->cache_pages = size / ps;
    if ((uint64_t)s->present_view.len * 8 < s->cache_pages) {
        PyErr_Format(PyExc_ValueError, "cache: the present bitmap has %zd bytes for %llu pages",
                     s->present_view.len, (unsigned long long)s->cache_pages);
        return -1;
    }
    for (Py_ssize_t i = 0; i < s->nregions; i++) {
        region_t *r = &s->regions[i];
        if (r->ps != ps || (r->offset + r->size) / ps > s->cache_pages) {
            char m[200];  /* PyErr_Format has no %llx */
            snprintf(m, sizeof m, "region %zd (offset 0x%llx, size 0x%llx, page size %llu) "
                     "does not fit the page cache of %llu %llu-byte pages", i,
                     (unsigned long long)r->offset, (unsigned long long)r->size,
                     (unsigned long long)r->ps, (unsigned long long)s->cache_pages, ps);
            PyErr_SetString(PyExc_ValueError, m);
            return -1;
        }
    }
    s->cache_fd = fd;
    return 0;
}

static int core_init(Core *s, PyObject *args, PyObject *kw) {
    static char *names[] = {"uffd_fd", "regions", "filled", "discarded", "holes", "counters",
                            "base_address", "overlay", "zero_address", "readahead_pages",
                            "chunk_bytes", "record", "journal", "pagemap_fd", "tripwire",
                            "cache", NULL};
    int fd, record, pagemap_fd = -1;
    PyObject *regions, *filled, *discarded, *holes, *counters, *base, *overlay, *zero,
        *readahead, *journal = Py_None, *tripwire = Py_None, *cache = Py_None;
    long long chunk;
    if (s->regions || s->c || s->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Core.__init__ called twice");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iOOOOOOOOOLp|OiOO", names, &fd, &regions,
                                     &filled, &discarded, &holes, &counters, &base, &overlay,
                                     &zero, &readahead, &chunk, &record, &journal,
                                     &pagemap_fd, &tripwire, &cache))
        return -1;
    s->cache_fd = -1;
    if (tripwire != Py_None) {
        if (PyObject_GetBuffer(tripwire, &s->trip_view, PyBUF_SIMPLE) < 0) return -1;
        if (s->trip_view.len < 1) {
            PyErr_SetString(PyExc_ValueError, "tripwire must be a buffer of at least 1 byte");
            PyBuffer_Release(&s->trip_view);
            s->trip_view.buf = NULL;
            return -1;
        }
        s->trip = s->trip_view.buf;
    }
    s->msgs = s->msgs_own;
    if (journal != Py_None) {
        if (PyObject_GetBuffer(journal, &s->journal_view, PyBUF_WRITABLE) < 0) return -1;
        if (s->journal_view.len < (Py_ssize_t)(BATCH * sizeof(struct uffd_msg)) ||
            (uintptr_t)s->journal_view.buf % 8) {
            PyErr_Format(PyExc_ValueError, "journal must be an 8-byte aligned buffer of at "
                         "least %zu bytes", BATCH * sizeof(struct uffd_msg));
            PyBuffer_Release(&s->journal_view);
            s->journal_view.buf = NULL;
            return -1;
        }
        s->msgs = s->journal_view.buf;
    }
    vec_t init[] = {{NULL, 0, 0, sizeof(fault_t)}, {NULL, 0, 0, sizeof(event_t)},
                    {NULL, 0, 0, sizeof(fault_t)}, {NULL, 0, 0, sizeof(span_t)},
                    {NULL, 0, 0, sizeof(record_t)}, {NULL, 0, 0, sizeof(record_t)}};
    s->deferred = init[0], s->events = init[1], s->unserved = init[2];
    s->installed = init[3], s->fault_rec = init[4], s->fill_rec = init[5];
    s->closed = 0, s->uffd = fd, s->record = record, s->fault_page = UINT64_MAX;
    s->pagemap_fd = pagemap_fd < 0 ? -1 : pagemap_fd;
    if (fd < 0) { PyErr_SetString(PyExc_ValueError, "uffd_fd must be >= 0"); goto bad; }
    if (chunk <= 0) {
        PyErr_Format(PyExc_ValueError, "chunk_bytes must be > 0, not %lld", chunk);
        goto bad;
    }
    s->chunk_bytes = (uint64_t)chunk;
    if (fetch_u64(base, "base_address", &s->base) ||
        fetch_u64(zero, "zero_address", &s->zero_address))
        goto bad;
    Py_ssize_t n, nra;
    uint64_t *rows = int_rows(regions, 3, "regions", &n);
    if (!rows) goto bad;
    s->regions = PyMem_Calloc((size_t)(n ? n : 1), sizeof(region_t));
    if (!s->regions) { PyMem_Free(rows); PyErr_NoMemory(); goto bad; }
    s->nregions = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        region_t *r = &s->regions[i];
        r->offset = rows[3 * i], r->size = rows[3 * i + 1], r->ps = rows[3 * i + 2];
        if (r->ps != 4096 && r->ps != HUGE_PAGE) {
            PyErr_Format(PyExc_ValueError, "region %zd: page size %llu is neither 4096 nor "
                         "2 MiB", i, (unsigned long long)r->ps);
            PyMem_Free(rows);
            goto bad;
        }
        if (r->size % r->ps) {
            PyErr_Format(PyExc_ValueError, "region %zd: size %llu is not a multiple of its "
                         "page size", i, (unsigned long long)r->size);
            PyMem_Free(rows);
            goto bad;
        }
        r->pages = r->size / r->ps;
    }
    PyMem_Free(rows);
    if (cache != Py_None && take_cache(s, cache)) goto bad;
    if (take_buffers(s, filled, offsetof(region_t, filled), 1, 0, "filled") ||
        take_buffers(s, discarded, offsetof(region_t, discarded), 1, 0, "discarded") ||
        take_buffers(s, holes, offsetof(region_t, holes), 0, 1, "holes"))
        goto bad;
    uint64_t *ra = int_rows(readahead, 1, "readahead_pages", &nra);
    if (!ra) goto bad;
    if (nra != n) {
        PyErr_Format(PyExc_ValueError, "readahead_pages has %zd entries for %zd regions",
                     nra, n);
        PyMem_Free(ra);
        goto bad;
    }
    for (Py_ssize_t i = 0; i < n; i++) s->regions[i].per = ra[i];
    PyMem_Free(ra);
    s->overlay = (overlay_t *)int_rows(overlay, 3, "overlay", &s->noverlay);
    if (!s->overlay) goto bad;
    for (Py_ssize_t i = 1; i < s->noverlay; i++)
        if (s->overlay[i].offset < s->overlay[i - 1].offset + s->overlay[i - 1].length) {
            PyErr_Format(PyExc_ValueError, "overlay[%zd] is not sorted and disjoint", i);
            goto bad;
        }
    if (PyObject_GetBuffer(counters, &s->counters_view, PyBUF_WRITABLE) < 0) {
        PyErr_Format(PyExc_TypeError, "counters must be a writable buffer, not %.50s",
                     Py_TYPE(counters)->tp_name);
        goto bad;
    }
    if (s->counters_view.len < N_COUNTERS * 8 || (uintptr_t)s->counters_view.buf % 8) {
        PyErr_Format(PyExc_ValueError, "counters must be a writable, 8-byte aligned buffer "
                     "of at least %d bytes (has %zd)", N_COUNTERS * 8, s->counters_view.len);
        PyBuffer_Release(&s->counters_view);
        goto bad;
    }
    s->c = s->counters_view.buf;
    return 0;
bad:
    core_release(s);
    return -1;
}

/* Refuse a closed core, and a second thread while one is inside run()/fill(). */
static int usable(Core *s) {
    if (!s->c) { PyErr_SetString(PyExc_ValueError, "the Core is closed"); return 0; }
    if (s->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the Core is in use by another thread");
        return 0;
    }
    return 1;
}

static PyObject *raise_failure(Core *s) {
    if (s->err == ENOMEM && !s->custom) return PyErr_NoMemory();
    PyObject *e = Py_BuildValue("(is)", s->err, s->msg);
    if (e) PyErr_SetObject(PyExc_OSError, e);
    Py_XDECREF(e);
    return NULL;
}

static PyObject *core_set_extents(Core *s, PyObject *arg) {
    if (!usable(s)) return NULL;
    Py_ssize_t n;
    uint64_t *rows = int_rows(arg, 4, "extents", &n);
    if (!rows) return NULL;
    extent_t *ex = PyMem_Calloc((size_t)(n ? n : 1), sizeof(extent_t));
    if (!ex) { PyMem_Free(rows); return PyErr_NoMemory(); }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t *w = &rows[4 * i];
        ex[i] = (extent_t){w[0], w[1], w[3], (uint32_t)w[2]};
        region_t *r = w[2] < (uint64_t)s->nregions ? &s->regions[w[2]] : NULL;
        const char *why = !r ? "names no region"
            : w[1] == 0 || w[1] % r->ps || w[0] % r->ps || w[3] % r->ps ? "is not page-aligned"
            : w[3] > r->size || w[1] > r->size - w[3] ? "runs past the end of its region"
            : i && w[0] < ex[i - 1].address + ex[i - 1].length ? "is not sorted and disjoint"
            : NULL;
        if (why) {
            char m[160];
            snprintf(m, sizeof m, "extent %zd (0x%llx, 0x%llx, %llu, 0x%llx) %s", i,
                     (unsigned long long)w[0], (unsigned long long)w[1],
                     (unsigned long long)w[2], (unsigned long long)w[3], why);
            PyErr_SetString(PyExc_ValueError, m);
            PyMem_Free(rows);
            PyMem_Free(ex);
            return NULL;
        }
    }
    PyMem_Free(rows);
    PyMem_Free(s->extents);
    s->extents = ex, s->nextents = n;
    Py_RETURN_NONE;
}

static PyObject *rows_to_list(const vec_t *v, int fault) {
    PyObject *out = PyList_New((Py_ssize_t)v->n);
    for (size_t i = 0; out && i < v->n; i++) {
        PyObject *t;
        if (fault) {
            const fault_t *f = (const fault_t *)v->p + i;
            t = Py_BuildValue("(KKIK)", f->address, f->flags, f->tid, f->t_read);
        } else {
            const event_t *e = (const event_t *)v->p + i;
            t = Py_BuildValue("(KKKK)", e->code, e->a, e->b, e->c);
        }
        if (!t) { Py_CLEAR(out); break; }
        PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    return out;
}

static PyObject *core_run(Core *s, PyObject *args) {
    int stop_fd, sock_fd, timeout_ms, rc;
    if (!PyArg_ParseTuple(args, "iii:run", &stop_fd, &sock_fd, &timeout_ms) || !usable(s))
        return NULL;
    s->events.n = s->unserved.n = 0;
    s->busy = 1;
    do {
        Py_BEGIN_ALLOW_THREADS
        rc = run_loop(s, stop_fd, sock_fd, timeout_ms);
        Py_END_ALLOW_THREADS
        /* A signal: let Python run its handler (KeyboardInterrupt), then go on. */
    } while (rc == RUN_EINTR && PyErr_CheckSignals() == 0);
    s->busy = 0;
    if (rc == RUN_EINTR) return NULL;
    if (rc == FAIL && s->err == ESRCH) rc = REASON_PEER_GONE;
    if (rc == FAIL) return raise_failure(s);
    PyObject *ev = rows_to_list(&s->events, 0), *un = ev ? rows_to_list(&s->unserved, 1) : NULL;
    s->events.n = s->unserved.n = 0;
    if (!un) { Py_XDECREF(ev); return NULL; }
    return Py_BuildValue("(iNN)", rc, ev, un);
}

static PyObject *core_fill(Core *s, PyObject *args) {
    unsigned int region, cause;
    unsigned long long first, pages;
    int dontwake, rc;
    if (!PyArg_ParseTuple(args, "IKKIp:fill", &region, &first, &pages, &cause, &dontwake) ||
        !usable(s))
        return NULL;
    if (region >= (unsigned)s->nregions || cause > CAUSE_BACKGROUND ||
        first > s->regions[region].pages || pages > s->regions[region].pages - first) {
        PyErr_Format(PyExc_ValueError, "fill(region=%u, first_page=%llu, pages=%llu, "
                     "cause=%u) is outside the regions or names no cause", region, first,
                     pages, cause);
        return NULL;
    }
    s->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = fill(s, region, first, pages, (int)cause, dontwake);
    Py_END_ALLOW_THREADS
    s->busy = 0;
    if (rc == FAIL) return raise_failure(s);
    return PyBool_FromLong(rc == OK);
}

/* drain(timeout_ms): wait for messages, queue the faults (deferred), return the other
 * events. For a blocking plan (REAP), which must apply events without serving faults. */
static PyObject *core_drain(Core *s, PyObject *args) {
    int timeout_ms, ready;
    Py_ssize_t n = 0;
    if (!PyArg_ParseTuple(args, "i:drain", &timeout_ms) || !usable(s)) return NULL;
    if (s->journal_dirty) {
        PyErr_SetString(PyExc_RuntimeError, "drain() before applied(): events would be lost");
        return NULL;
    }
    s->events.n = 0;
    s->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    struct pollfd pfd = {.fd = s->uffd, .events = POLLIN};
    ready = poll(&pfd, 1, timeout_ms);
    if (ready > 0 && (pfd.revents & POLLIN)) n = drain(s);
    Py_END_ALLOW_THREADS
    s->busy = 0;
    if (n < 0) return raise_failure(s);
    PyObject *ev = rows_to_list(&s->events, 0);
    s->events.n = 0;
    return ev;
}

/* applied(): the caller has applied the events run() or drain() returned: clear the
 * journal so the next read may use it. */
static PyObject *core_applied(Core *s, PyObject *unused) {
    if (!usable(s)) return NULL;
    if (s->msgs != s->msgs_own) memset(s->msgs, 0, BATCH * sizeof(struct uffd_msg));
    s->journal_dirty = 0;
    Py_RETURN_NONE;
}

static int by_address(const void *a, const void *b) {
    const span_t *x = a, *y = b;
    return x->address < y->address ? -1 : x->address > y->address;
}

static PyObject *core_wake_installed(Core *s, PyObject *unused) {
    if (!usable(s)) return NULL;
    span_t *v = s->installed.p;
    size_t n = s->installed.n;
    int rc = OK;
    s->installed.n = 0;
    s->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    qsort(v, n, sizeof *v, by_address);
    /* R5: one wake per contiguous piece; a gap starts a new piece. */
    for (size_t i = 0; i < n && rc == OK;) {
        uint64_t lo = v[i].address, hi = lo + v[i].length;
        for (i++; i < n && v[i].address <= hi; i++)
            if (v[i].address + v[i].length > hi) hi = v[i].address + v[i].length;
        rc = wake(s, lo, hi - lo);
    }
    Py_END_ALLOW_THREADS
    s->busy = 0;
    return rc == FAIL ? raise_failure(s) : Py_NewRef(Py_None);
}

static PyObject *core_wake(Core *s, PyObject *args) {
    unsigned long long start, length;
    int rc;
    if (!PyArg_ParseTuple(args, "KK:wake", &start, &length) || !usable(s)) return NULL;
    s->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = wake(s, start, length);
    Py_END_ALLOW_THREADS
    s->busy = 0;
    return rc == FAIL ? raise_failure(s) : Py_NewRef(Py_None);
}

static PyObject *core_take_records(Core *s, PyObject *unused) {
    if (!usable(s)) return NULL;
    /* y# turns a NULL pointer into None: an empty buffer must still be bytes. */
    PyObject *out = Py_BuildValue("(y#y#)", s->fault_rec.p ? (const char *)s->fault_rec.p : "",
                                  (Py_ssize_t)(s->fault_rec.n * sizeof(record_t)),
                                  s->fill_rec.p ? (const char *)s->fill_rec.p : "",
                                  (Py_ssize_t)(s->fill_rec.n * sizeof(record_t)));
    if (out) s->fault_rec.n = s->fill_rec.n = 0;
    return out;
}

static PyObject *core_set_crash(Core *s, PyObject *args) {
    int point;
    unsigned long long left;
    if (!PyArg_ParseTuple(args, "iK", &point, &left)) return NULL;
    s->crash_point = point, s->crash_left = left;
    Py_RETURN_NONE;
}

static PyObject *core_close(Core *s, PyObject *unused) {
    if (s->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the Core is in use by another thread");
        return NULL;
    }
    core_release(s);
    Py_RETURN_NONE;
}

static PyObject *core_deferred(Core *s, void *unused) {
    return PyLong_FromSize_t(s->deferred.n - s->dhead);
}

static void core_dealloc(Core *s) {
    core_release(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMethodDef core_methods[] = {
    {"set_extents", (PyCFunction)core_set_extents, METH_O, "Replace the live extents."},
    {"run", (PyCFunction)core_run, METH_VARARGS, "Serve faults until a reason to return."},
    {"fill", (PyCFunction)core_fill, METH_VARARGS, "Fill the unfilled pages of a range."},
    {"wake_installed", (PyCFunction)core_wake_installed, METH_NOARGS,
     "Wake each contiguous piece installed with dontwake."},
    {"wake", (PyCFunction)core_wake, METH_VARARGS, "UFFDIO_WAKE a range."},
    {"applied", (PyCFunction)core_applied, METH_NOARGS,
     "The returned events are applied: clear the journal."},
    {"drain", (PyCFunction)core_drain, METH_VARARGS,
     "Wait for messages; defer the faults, return the other events."},
    {"take_records", (PyCFunction)core_take_records, METH_NOARGS,
     "Return and clear the (fault, fill) record buffers."},
    {"close", (PyCFunction)core_close, METH_NOARGS, "Release the buffers (idempotent)."},
    {"set_crash", (PyCFunction)core_set_crash, METH_VARARGS,
     "SIGKILL this process the n-th time a crash point is reached (tests only)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef core_getset[] = {
    {"deferred", (getter)core_deferred, NULL, "Faults waiting for a retry.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pagein.serve._core.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One VM's fault-serving core (see pagein/serve/_core.pyi).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
    .tp_getset = core_getset,
};

static struct PyModuleDef core_module = {PyModuleDef_HEAD_INIT, "_core",
                                         "The per-fault data plane in C.", -1, NULL};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&CoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (!m) return NULL;
#define K(name) {#name, name}
    static const struct { const char *name; long value; } k[] = {
        K(REASON_STOP), K(REASON_SOCKET), K(REASON_EVENTS), K(REASON_IDLE),
        K(REASON_UNSERVED), K(REASON_RECORDS), K(REASON_PEER_GONE), K(REASON_POLLERR),
        K(CAUSE_DEMAND), K(CAUSE_READAHEAD), K(CAUSE_PREFETCH), K(CAUSE_BACKGROUND),
        K(CAUSE_ZERO), K(N_COUNTERS), K(C_FAULTS), K(C_PAGES), K(C_BYTES_FAULT),
        K(C_BYTES_READAHEAD), K(C_BYTES_BACKGROUND), K(C_ZERO_PAGES), K(C_RETRIES),
        K(C_EEXIST), K(C_REMOVES), K(C_REMOVED_BYTES), K(C_UNMAPS), K(C_REMAPS),
        K(C_COLLAPSED), K(C_COLLAPSE_FAILED),
        K(C_LATENCY_US_SUM), K(C_LATENCY_BUCKETS), {"RECORD_SIZE", (long)sizeof(record_t)},
    };
#undef K
    for (size_t i = 0; i < sizeof k / sizeof *k; i++)
        if (PyModule_AddIntConstant(m, k[i].name, k[i].value) < 0) goto bad;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        goto bad;
    }
    return m;
bad:
    Py_DECREF(m);
    return NULL;
}
