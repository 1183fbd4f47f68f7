/* The C reference handler: a minimal Firecracker-protocol page-fault server.
 *
 *   fc_handler [--populate] SOCKET MEMFILE
 *
 * What a user would otherwise write, and the baseline benchmarks/serve_scaling.py
 * measures `pagein serve` against. Listen on SOCKET; for every VMM that connects start
 * one thread, which receives the handshake Firecracker sends (ONE message: a JSON array
 * of regions {"base_host_virt_addr", "size", "offset", "page_size", ...} and the uffd as
 * SCM_RIGHTS, no length prefix) and then serves that VM until its socket reaches EOF:
 *
 *   blocking poll(uffd, socket) -> read up to 64 uffd_msg -> apply every REMOVE of the
 *   batch to a per-region bitmap -> one UFFDIO_COPY of 4 KiB per fault from MEMFILE
 *   (UFFDIO_ZEROPAGE where the guest removed the page) -> EEXIST: UFFDIO_WAKE;
 *   EAGAIN: an event is unread, drain the uffd, then retry.
 *
 * MEMFILE is mapped once, read-only, shared, MAP_POPULATE: a copy never faults on its
 * source. --populate first copies every region in 2 MiB chunks (the bulk baseline),
 * then serves faults. Prints nothing per fault; errors go to stderr and end the process
 * (a VM whose faults nobody serves is frozen: fail loudly).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define PAGE 4096ull
#define BATCH 64
#define CHUNK_PAGES 512 /* 2 MiB */
#define MAX_REGIONS 64
#define MAX_HANDSHAKE (1 << 20)

static const uint8_t *g_file;
static uint64_t g_file_size;
static int g_populate;

struct region {
    uint64_t base, size, offset, page_size;
    uint64_t *removed; /* one bit per page: read zeros from now on */
};

struct vm {
    int sock, uffd;
    int nregions;
    struct region regions[MAX_REGIONS];
    uint64_t *pending; /* fault addresses read but not yet served */
    size_t npending, cap;
};

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void fatal(const char *msg, uint64_t a, uint64_t b) {
    fprintf(stderr, "fc_handler: %s (0x%llx, 0x%llx)\n", msg, (unsigned long long)a,
            (unsigned long long)b);
    exit(2);
}

/* --- the handshake --------------------------------------------------------------- */

/* Read the number after "key": inside [obj, end); -1 when absent. */
static long long json_field(const char *obj, const char *end, const char *key) {
    char pat[64];
    snprintf(pat, sizeof(pat), "\"%s\"", key);
    size_t n = strlen(pat);
    for (const char *p = obj; p + n < end; p++) {
        if (memcmp(p, pat, n))
            continue;
        p += n;
        while (p < end && (*p == ' ' || *p == ':'))
            p++;
        return strtoll(p, NULL, 10);
    }
    return -1;
}

/* Receive the JSON array and the uffd; fill vm->regions. Returns 0, or -1 on EOF. */
static int receive_handshake(struct vm *vm) {
    char *buf = malloc(MAX_HANDSHAKE + 1);
    size_t len = 0;
    int depth = 0, started = 0, done = 0;
    vm->uffd = -1;
    while (!done) {
        char cbuf[CMSG_SPACE(sizeof(int) * 4)];
        struct iovec iov = {buf + len, MAX_HANDSHAKE - len};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                            .msg_controllen = sizeof(cbuf)};
        ssize_t got = recvmsg(vm->sock, &mh, MSG_CMSG_CLOEXEC);
        if (got <= 0) {
            free(buf);
            return -1;
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && vm->uffd < 0)
                memcpy(&vm->uffd, CMSG_DATA(c), sizeof(int));
        /* No length prefix: the array ends where its brackets balance. */
        for (ssize_t i = 0; i < got && !done; i++) {
            char ch = buf[len + i];
            if (ch == '[' || ch == '{')
                depth++, started = 1;
            else if (ch == ']' || ch == '}')
                depth--;
            if (started && depth == 0)
                done = 1;
        }
        len += (size_t)got;
        if (len >= MAX_HANDSHAKE)
            fatal("handshake too large", len, 0);
    }
    buf[len] = 0;
    if (vm->uffd < 0)
        fatal("handshake carried no file descriptor", len, 0);
    vm->nregions = 0;
    for (char *o = strchr(buf, '{'); o; o = strchr(o + 1, '{')) {
        char *e = strchr(o, '}');
        if (!e || vm->nregions == MAX_REGIONS)
            fatal("bad region list", vm->nregions, 0);
        struct region *r = &vm->regions[vm->nregions++];
        long long base = json_field(o, e, "base_host_virt_addr");
        long long size = json_field(o, e, "size"), off = json_field(o, e, "offset");
        long long ps = json_field(o, e, "page_size");
        if (ps < 0)
            ps = json_field(o, e, "page_size_kib"); /* legacy name, holds bytes */
        if (ps < 0)
            ps = PAGE; /* Firecracker < 1.7 */
        if (base < 0 || size <= 0 || off < 0 || ps != (long long)PAGE ||
            (uint64_t)off + (uint64_t)size > g_file_size)
            fatal("bad region (base, size)", (uint64_t)base, (uint64_t)size);
        r->base = (uint64_t)base, r->size = (uint64_t)size, r->offset = (uint64_t)off;
        r->page_size = (uint64_t)ps;
        r->removed = calloc((r->size / PAGE + 63) / 64, 8);
    }
    free(buf);
    return 0;
}

/* --- events and fills ----------------------------------------------------------- */

static struct region *region_of(struct vm *vm, uint64_t addr) {
    for (int i = 0; i < vm->nregions; i++)
        if (addr - vm->regions[i].base < vm->regions[i].size)
            return &vm->regions[i];
    return NULL;
}

static int is_removed(const struct region *r, uint64_t page) {
    return (r->removed[page / 64] >> (page % 64)) & 1;
}

static void mark_removed(struct vm *vm, uint64_t start, uint64_t end) {
    for (int i = 0; i < vm->nregions; i++) {
        struct region *r = &vm->regions[i];
        uint64_t a = start > r->base ? start : r->base;
        uint64_t b = end < r->base + r->size ? end : r->base + r->size;
        if (a >= b)
            continue;
        for (uint64_t p = (a - r->base) / PAGE; p < (b - r->base + PAGE - 1) / PAGE; p++)
            r->removed[p / 64] |= 1ull << (p % 64);
    }
}

/* Read what the uffd holds (nonblocking). Every REMOVE of the batch is applied before
 * any fault of it is queued: reading a REMOVE lets the kernel zap at once, so a fault
 * read in the same batch must see the bitmap with it, or it would install stale data
 * into a range the guest has just given back. Returns the messages read. */
static int drain(struct vm *vm) {
    struct uffd_msg msgs[BATCH];
    ssize_t n = read(vm->uffd, msgs, sizeof(msgs));
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        die("read(uffd)");
    }
    int count = (int)(n / (ssize_t)sizeof(struct uffd_msg));
    for (int i = 0; i < count; i++)
        if (msgs[i].event == UFFD_EVENT_REMOVE)
            mark_removed(vm, msgs[i].arg.remove.start, msgs[i].arg.remove.end);
    for (int i = 0; i < count; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
            continue;
        if (vm->npending == vm->cap) {
            vm->cap = vm->cap ? vm->cap * 2 : 256;
            vm->pending = realloc(vm->pending, vm->cap * sizeof(uint64_t));
        }
        vm->pending[vm->npending++] = msgs[i].arg.pagefault.address & ~(PAGE - 1);
    }
    return count;
}

/* One ioctl: copy (or zero) n pages at page p of r. Returns pages done (> 0), or
 * -EEXIST / -EAGAIN when nothing was done. */
static long fill_once(struct vm *vm, struct region *r, uint64_t p, uint64_t n, int zero) {
    uint64_t dst = r->base + p * PAGE, len = n * PAGE;
    long long done;
    int rc;
    if (zero) {
        struct uffdio_zeropage z = {.range = {dst, len}};
        rc = ioctl(vm->uffd, UFFDIO_ZEROPAGE, &z);
        done = z.zeropage;
    } else {
        struct uffdio_copy c = {.dst = dst, .src = (uint64_t)(uintptr_t)(g_file + r->offset + p * PAGE),
                                .len = len};
        rc = ioctl(vm->uffd, UFFDIO_COPY, &c);
        done = c.copy;
    }
    if (rc == 0)
        return (long)n;
    if (done > 0) /* partial: the rest hit an existing page or a pending event */
        return (long)(done / (long long)PAGE);
    if (errno == EEXIST || errno == EAGAIN)
        return -errno;
    die(zero ? "UFFDIO_ZEROPAGE" : "UFFDIO_COPY");
    return 0;
}

/* Fill pages [p, p+n) of r: the snapshot, or zeros where the guest removed pages. */
static void fill(struct vm *vm, struct region *r, uint64_t p, uint64_t n) {
    while (n) {
        int zero = is_removed(r, p);
        uint64_t k = 1;
        while (k < n && k < CHUNK_PAGES && is_removed(r, p + k) == zero)
            k++;
        long done = fill_once(vm, r, p, k, zero);
        if (done > 0) {
            p += (uint64_t)done, n -= (uint64_t)done;
        } else if (done == -EEXIST) {
            /* A racing fill installed it; whoever faulted on it still sleeps: wake. */
            struct uffdio_range w = {r->base + p * PAGE, PAGE};
            if (ioctl(vm->uffd, UFFDIO_WAKE, &w))
                die("UFFDIO_WAKE");
            p++, n--;
        } else {
            /* EAGAIN: an event is unread and every fill fails until it is. Drain, then
             * retry: the loop re-reads the bitmap the drained REMOVEs updated. */
            drain(vm);
        }
    }
}

static void serve_pending(struct vm *vm) {
    for (size_t i = 0; i < vm->npending; i++) { /* fill() may append: re-read npending */
        uint64_t addr = vm->pending[i];
        struct region *r = region_of(vm, addr);
        if (!r)
            fatal("fault outside every region", addr, 0);
        fill(vm, r, (addr - r->base) / PAGE, 1);
    }
    vm->npending = 0;
}

static void *serve_vm(void *arg) {
    struct vm *vm = arg;
    if (receive_handshake(vm) == 0) {
        int fl = fcntl(vm->uffd, F_GETFL);
        fcntl(vm->uffd, F_SETFL, fl | O_NONBLOCK);
        if (g_populate)
            for (int i = 0; i < vm->nregions; i++)
                fill(vm, &vm->regions[i], 0, vm->regions[i].size / PAGE);
        serve_pending(vm);
        struct pollfd pfd[2] = {{vm->uffd, POLLIN, 0}, {vm->sock, POLLIN, 0}};
        for (;;) {
            if (poll(pfd, 2, -1) < 0) {
                if (errno == EINTR)
                    continue;
                die("poll");
            }
            if (pfd[0].revents & POLLIN) {
                drain(vm);
                serve_pending(vm);
            }
            if (pfd[0].revents & (POLLERR | POLLHUP))
                break;
            if (pfd[1].revents) {
                char b[256];
                ssize_t got = recv(vm->sock, b, sizeof(b), MSG_DONTWAIT);
                if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR))
                    break; /* the VMM is gone */
            }
        }
        close(vm->uffd);
    }
    close(vm->sock);
    for (int i = 0; i < vm->nregions; i++)
        free(vm->regions[i].removed);
    free(vm->pending);
    free(vm);
    return NULL;
}

int main(int argc, char **argv) {
    int a = 1;
    if (a < argc && !strcmp(argv[a], "--populate"))
        g_populate = 1, a++;
    if (argc - a != 2) {
        fprintf(stderr, "usage: fc_handler [--populate] SOCKET MEMFILE\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int fd = open(argv[a + 1], O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st))
        die(argv[a + 1]);
    g_file_size = (uint64_t)st.st_size;
    g_file = mmap(NULL, g_file_size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (g_file == MAP_FAILED)
        die("mmap(MEMFILE)");
    close(fd);
    int l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[a], sizeof(addr.sun_path) - 1);
    unlink(argv[a]);
    if (bind(l, (struct sockaddr *)&addr, sizeof(addr)) || listen(l, 64))
        die("bind/listen");
    for (;;) {
        int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            die("accept");
        }
        struct vm *vm = calloc(1, sizeof(*vm));
        vm->sock = c;
        pthread_t t;
        if (pthread_create(&t, NULL, serve_vm, vm))
            die("pthread_create");
        pthread_detach(t);
    }
}
