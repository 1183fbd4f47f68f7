/* The project's Firecracker-faithful client in C: a VMM restoring from a UFFD handler.
 *
 *   fc_client --socket S --mem-file F [--regions OFF:SIZE,...] [--threads T]
 *             [--fraction X] [--order seq|random] [--seed N] [--write] [--pin CPU]
 *             [--populated] [--sync] [--timeout SECONDS]
 *
 * It does what Firecracker's VMM does on a UFFD restore: mmap every region
 * MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE, create a uffd (/dev/userfaultfd +
 * USERFAULTFD_IOC_NEW, else the syscall; O_CLOEXEC|O_NONBLOCK, not user-mode-only),
 * UFFDIO_API requiring UFFD_FEATURE_EVENT_REMOVE, register every region MISSING,
 * connect, and send ONE sendmsg: the JSON array of regions (no length prefix, no
 * newline) with the uffd as SCM_RIGHTS. Socket and uffd stay open until exit.
 *
 * Then it plays the guest. Touch mode (default): the first chosen page is touched
 * alone (first_byte_ns: sendmsg to that page readable, the handshake included), then
 * T threads touch the rest, each a disjoint share, one access per page (a read, or a
 * locked or-with-0 with --write: a write fault that keeps the bytes); wall_ns and
 * ns_per_page cover that timed phase only. --fraction of the pages are chosen, evenly
 * spread in address order (seq) or a --seed permutation (random). --populated touches
 * nothing: it polls mincore until the handler has filled every page (wall_ns).
 * Afterwards every byte of every touched (or, --populated, every) page is compared
 * with the memory file, mapped read-only: a mismatch is an error, never a warning.
 *
 * --sync (for a driver starting several clients together): in touch mode print "ready"
 * once the handshake is done and the first page arrived and wait for a line on stdin
 * before the timed phase; in both modes, after the result, hold the VM (socket and
 * uffd open, so the handler's per-VM state is still alive) until stdin reaches EOF.
 *
 * Output: one JSON line {"ok", "pages", "timed_pages", "wall_ns", "ns_per_page",
 * "first_byte_ns", "t0_ns", "t1_ns" (CLOCK_MONOTONIC), "errors": [...]}; exit 0 iff ok.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ull
#define MAX_REGIONS 64
#define MAX_ERRORS 20

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

struct region {
    uint64_t offset, size; /* in the memory file */
    uint8_t *mem;          /* the guest region in this process */
    uint64_t first_page;   /* global index of its first page */
};

static struct region g_regions[MAX_REGIONS];
static int g_nregions;
static uint64_t g_total_pages;
static uint32_t *g_order; /* chosen global page indexes, in touch order */
static uint64_t g_chosen;
static int g_threads = 1, g_write;
static pthread_barrier_t g_start;
static uint64_t *g_thread_end;
static char g_errors[MAX_ERRORS][160];
static int g_nerrors, g_more_errors;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void error(const char *fmt, ...) {
    if (g_nerrors == MAX_ERRORS) {
        g_more_errors++;
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_errors[g_nerrors++], sizeof(g_errors[0]), fmt, ap);
    va_end(ap);
}

/* Print the result line; strings here never need JSON escaping beyond quotes. */
static void report(int ok, uint64_t pages, uint64_t timed, uint64_t wall, uint64_t first,
                   uint64_t t0, uint64_t t1) {
    printf("{\"ok\": %s, \"pages\": %llu, \"timed_pages\": %llu, \"wall_ns\": %llu, "
           "\"ns_per_page\": %.1f, \"first_byte_ns\": %llu, \"t0_ns\": %llu, \"t1_ns\": %llu, "
           "\"errors\": [", ok ? "true" : "false", (unsigned long long)pages,
           (unsigned long long)timed, (unsigned long long)wall,
           timed ? (double)wall / (double)timed : 0.0, (unsigned long long)first,
           (unsigned long long)t0, (unsigned long long)t1);
    for (int i = 0; i < g_nerrors; i++)
        printf("%s\"%s\"", i ? ", " : "", g_errors[i]);
    if (g_more_errors)
        printf("%s\"... and %d more\"", g_nerrors ? ", " : "", g_more_errors);
    printf("]}\n");
    fflush(stdout);
}

static void fail(const char *what) {
    error("%s: %s", what, strerror(errno));
    report(0, 0, 0, 0, 0, 0, 0);
    exit(1);
}

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "{\"ok\": false, \"pages\": 0, \"errors\": [\"timed out: a "
                              "fault was never served or the handler never filled memory\"]}\n";
    (void)!write(1, msg, sizeof(msg) - 1);
    _exit(3);
}

static uint8_t *page_addr(uint64_t global) {
    for (int i = g_nregions - 1; i >= 0; i--)
        if (global >= g_regions[i].first_page)
            return g_regions[i].mem + (global - g_regions[i].first_page) * PAGE;
    return NULL;
}

static uint64_t page_file_offset(uint64_t global) {
    for (int i = g_nregions - 1; i >= 0; i--)
        if (global >= g_regions[i].first_page)
            return g_regions[i].offset + (global - g_regions[i].first_page) * PAGE;
    return 0;
}

static inline void touch(uint8_t *p) {
    if (g_write)
        __atomic_fetch_or((uint64_t *)p, 0, __ATOMIC_RELAXED); /* a write; bytes kept */
    else
        (void)*(volatile uint8_t *)p;
}

static void *guest_thread(void *arg) {
    long t = (long)arg;
    /* Page 0 of the order was touched alone; the rest is split into disjoint shares. */
    uint64_t rest = g_chosen - 1;
    uint64_t a = 1 + rest * (uint64_t)t / (uint64_t)g_threads;
    uint64_t b = 1 + rest * (uint64_t)(t + 1) / (uint64_t)g_threads;
    pthread_barrier_wait(&g_start);
    for (uint64_t i = a; i < b; i++)
        touch(page_addr(g_order[i]));
    g_thread_end[t] = now_ns();
    return NULL;
}

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void choose_pages(double fraction, int random_order, uint64_t seed) {
    g_chosen = (uint64_t)(fraction * (double)g_total_pages + 0.5);
    if (g_chosen < 2)
        g_chosen = g_total_pages < 2 ? g_total_pages : 2;
    if (g_chosen > g_total_pages)
        g_chosen = g_total_pages;
    g_order = malloc(g_total_pages * sizeof(uint32_t));
    if (random_order) {
        for (uint64_t i = 0; i < g_total_pages; i++)
            g_order[i] = (uint32_t)i;
        for (uint64_t i = g_total_pages - 1; i > 0; i--) { /* Fisher-Yates */
            uint64_t j = splitmix(&seed) % (i + 1);
            uint32_t x = g_order[i];
            g_order[i] = g_order[j], g_order[j] = x;
        }
    } else {
        for (uint64_t i = 0; i < g_chosen; i++)
            g_order[i] = (uint32_t)(i * g_total_pages / g_chosen);
    }
}

static int create_uffd(void) {
    int flags = O_CLOEXEC | O_NONBLOCK; /* as Firecracker; not UFFD_USER_MODE_ONLY */
    int fd = -1, dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
        close(dev);
    }
    if (fd < 0)
        fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd < 0)
        fail("userfaultfd (root, /dev/userfaultfd access or vm.unprivileged_userfaultfd=1)");
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
    if (ioctl(fd, UFFDIO_API, &api) || !(api.features & UFFD_FEATURE_EVENT_REMOVE))
        fail("UFFDIO_API with UFFD_FEATURE_EVENT_REMOVE");
    return fd;
}

static int connect_retry(const char *path, int timeout_s) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    uint64_t deadline = now_ns() + (uint64_t)timeout_s * 1000000000ull;
    for (;;) {
        int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0)
            fail("socket");
        if (connect(s, (struct sockaddr *)&addr, sizeof(addr)) == 0)
            return s;
        int e = errno;
        close(s);
        /* The handler may be between bind and listen, or not bound yet. */
        if ((e != ECONNREFUSED && e != ENOENT) || now_ns() > deadline) {
            errno = e;
            fail(path);
        }
        usleep(1000);
    }
}

static void send_handshake(int sock, int uffd) {
    char json[MAX_REGIONS * 160 + 4];
    size_t n = 0;
    json[n++] = '[';
    for (int i = 0; i < g_nregions; i++)
        n += (size_t)snprintf(json + n, sizeof(json) - n,
                              "%s{\"base_host_virt_addr\":%llu,\"size\":%llu,\"offset\":%llu,"
                              "\"page_size\":4096,\"page_size_kib\":4096}",
                              i ? "," : "", (unsigned long long)(uintptr_t)g_regions[i].mem,
                              (unsigned long long)g_regions[i].size,
                              (unsigned long long)g_regions[i].offset);
    json[n++] = ']';
    char cbuf[CMSG_SPACE(sizeof(int))] = {0};
    struct iovec iov = {json, n};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                        .msg_controllen = sizeof(cbuf)};
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS, c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &uffd, sizeof(int));
    if (sendmsg(sock, &mh, MSG_NOSIGNAL) != (ssize_t)n)
        fail("sendmsg(handshake)");
}

/* Wait until every page of every region is present; return the time that took. */
static uint64_t wait_populated(uint64_t t_send, uint64_t *first) {
    unsigned char *vec = malloc(g_total_pages);
    *first = 0;
    for (int i = 0; i < g_nregions; i++) {
        uint64_t pages = g_regions[i].size / PAGE, done = 0;
        while (done < pages) {
            if (mincore(g_regions[i].mem + done * PAGE, (pages - done) * PAGE, vec))
                fail("mincore");
            uint64_t k = 0;
            while (k < pages - done && (vec[k] & 1))
                k++;
            if (k && !*first)
                *first = now_ns() - t_send;
            done += k;
            if (done < pages)
                usleep(100); /* poll lightly: the handler may share this CPU */
        }
    }
    free(vec);
    return now_ns() - t_send;
}

static void verify(uint64_t i0, uint64_t n, const uint8_t *file, int all) {
    for (uint64_t i = i0; i < i0 + n; i++) {
        uint64_t g = all ? i : g_order[i];
        const uint8_t *got = page_addr(g), *want = file + page_file_offset(g);
        if (memcmp(got, want, PAGE)) {
            int zeros = 1;
            for (uint64_t k = 0; k < PAGE && zeros; k++)
                zeros = got[k] == 0;
            error("page at file offset 0x%llx: read %s instead of the snapshot",
                  (unsigned long long)page_file_offset(g), zeros ? "zeros" : "other bytes");
        }
    }
}

static void hold_until_eof(void) {
    char b[256];
    while (read(0, b, sizeof(b)) > 0)
        ;
}

static void usage(void) {
    fprintf(stderr, "usage: fc_client --socket S --mem-file F [--regions OFF:SIZE,...] "
                    "[--threads T] [--fraction X] [--order seq|random] [--seed N] [--write] "
                    "[--pin CPU] [--populated] [--sync] [--timeout S]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *sock_path = NULL, *mem_path = NULL, *layout = NULL;
    double fraction = 0.25;
    int random_order = 0, pin = -1, populated = 0, sync = 0, timeout_s = 120;
    uint64_t seed = 1;
    static const struct option opts[] = {
        {"socket", 1, 0, 's'}, {"mem-file", 1, 0, 'm'}, {"regions", 1, 0, 'r'},
        {"threads", 1, 0, 't'}, {"fraction", 1, 0, 'f'}, {"order", 1, 0, 'o'},
        {"seed", 1, 0, 'S'}, {"write", 0, 0, 'w'}, {"pin", 1, 0, 'p'},
        {"populated", 0, 0, 'P'}, {"sync", 0, 0, 'y'}, {"timeout", 1, 0, 'T'}, {0, 0, 0, 0}};
    for (int c; (c = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        switch (c) {
        case 's': sock_path = optarg; break;
        case 'm': mem_path = optarg; break;
        case 'r': layout = optarg; break;
        case 't': g_threads = atoi(optarg); break;
        case 'f': fraction = atof(optarg); break;
        case 'o':
            if (strcmp(optarg, "seq") && strcmp(optarg, "random"))
                usage();
            random_order = !strcmp(optarg, "random");
            break;
        case 'S': seed = strtoull(optarg, NULL, 0); break;
        case 'w': g_write = 1; break;
        case 'p': pin = atoi(optarg); break;
        case 'P': populated = 1; break;
        case 'y': sync = 1; break;
        case 'T': timeout_s = atoi(optarg); break;
        default: usage();
        }
    }
    if (!sock_path || !mem_path || g_threads < 1 || fraction <= 0 || fraction > 1)
        usage();
    signal(SIGALRM, on_alarm);
    alarm((unsigned)timeout_s);
    if (pin >= 0) { /* before any thread exists: every thread inherits it */
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(pin, &set);
        if (sched_setaffinity(0, sizeof(set), &set))
            fail("sched_setaffinity");
    }
    int fd = open(mem_path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st))
        fail(mem_path);
    const uint8_t *file = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED | MAP_POPULATE,
                               fd, 0);
    if (file == MAP_FAILED)
        fail("mmap(mem-file)");
    close(fd);

    /* Guest memory, the uffd, registration: the VMM's side of a UFFD restore. */
    char def[64];
    snprintf(def, sizeof(def), "0:%llu", (unsigned long long)st.st_size);
    char *spec = strdup(layout ? layout : def);
    for (char *save, *part = strtok_r(spec, ",", &save); part; part = strtok_r(NULL, ",", &save)) {
        struct region *r = &g_regions[g_nregions];
        char *colon = strchr(part, ':');
        if (!colon || g_nregions == MAX_REGIONS)
            usage();
        r->offset = strtoull(part, NULL, 0), r->size = strtoull(colon + 1, NULL, 0);
        if (r->size == 0 || r->size % PAGE || r->offset % PAGE ||
            r->offset + r->size > (uint64_t)st.st_size)
            usage();
        r->mem = mmap(NULL, r->size, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (r->mem == MAP_FAILED)
            fail("mmap(guest region)");
        r->first_page = g_total_pages;
        g_total_pages += r->size / PAGE;
        g_nregions++;
    }
    int uffd = create_uffd();
    for (int i = 0; i < g_nregions; i++) {
        struct uffdio_register reg = {
            .range = {(uint64_t)(uintptr_t)g_regions[i].mem, g_regions[i].size},
            .mode = UFFDIO_REGISTER_MODE_MISSING};
        if (ioctl(uffd, UFFDIO_REGISTER, &reg))
            fail("UFFDIO_REGISTER");
    }
    choose_pages(fraction, random_order, seed);
    pthread_t *threads = calloc((size_t)g_threads, sizeof(pthread_t));
    g_thread_end = calloc((size_t)g_threads, sizeof(uint64_t));
    if (!populated) {
        pthread_barrier_init(&g_start, NULL, (unsigned)g_threads + 1);
        for (long t = 0; t < g_threads; t++)
            if (pthread_create(&threads[t], NULL, guest_thread, (void *)t))
                fail("pthread_create");
    }

    int sock = connect_retry(sock_path, timeout_s);
    send_handshake(sock, uffd);
    uint64_t t_send = now_ns(), first = 0, wall, t0, t1, pages, timed;
    if (populated) {
        wall = wait_populated(t_send, &first);
        t0 = t_send, t1 = t_send + wall;
        pages = timed = g_total_pages;
        verify(0, g_total_pages, file, 1);
    } else {
        touch(page_addr(g_order[0]));
        first = now_ns() - t_send;
        if (sync) {
            char line[16];
            printf("ready\n");
            fflush(stdout);
            if (!fgets(line, sizeof(line), stdin))
                fail("waiting for the go line on stdin");
        }
        t0 = now_ns();
        pthread_barrier_wait(&g_start);
        t1 = t0;
        for (int t = 0; t < g_threads; t++) {
            pthread_join(threads[t], NULL);
            if (g_thread_end[t] > t1)
                t1 = g_thread_end[t];
        }
        wall = t1 - t0;
        pages = g_chosen, timed = g_chosen - 1;
        verify(0, g_chosen, file, 0);
    }
    alarm(0);
    int ok = g_nerrors == 0 && g_more_errors == 0;
    report(ok, pages, timed, wall, first, t0, t1);
    if (sync)
        hold_until_eof(); /* the VM keeps running: socket and uffd stay open */
    close(sock);
    close(uffd);
    return ok ? 0 : 1;
}
