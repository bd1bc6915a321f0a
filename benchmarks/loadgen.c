/*
 * loadgen — the connserver benchmark load generator (see benchmarks/README.md).
 *
 *   cc -O2 -Wall -Wextra -o benchmarks/loadgen benchmarks/loadgen.c -lm
 *   loadgen --mode echo --host 127.0.0.1 --port 7070 --connections 10 --size 64
 *
 * One thread, one epoll set, non-blocking sockets, no allocation per
 * operation. Modes: echo, framed, hold, churn, fanout, paced. Every mode is
 * bounded in time (--duration, --warmup, --connect-timeout, --barrier-timeout,
 * --drain) and in count (--connections, --max-requests, --max-cycles,
 * --messages). Loopback only: any host outside 127.0.0.0/8 and ::1 is refused.
 *
 * stdout: exactly one JSON object on one line per run. stderr: hints only.
 * Exit status: 0 ok, 1 verification failure (wrong bytes), 2 usage error,
 * 3 run failed (nothing could connect, setup error).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define LOADGEN_VERSION 1
#define MAX_EVENTS 512
#define SCRATCH_SIZE (256u * 1024u)
#define MAX_SIZE (16L * 1024 * 1024)
#define MAX_CONNECTIONS 200000L
#define OPEN_BATCH 256          /* connects issued per loop turn, so replies keep flowing */
#define SCAN_INTERVAL_NS 100000000ull

enum { M_ECHO, M_FRAMED, M_HOLD, M_CHURN, M_FANOUT, M_PACED, M_COUNT };
static const char *const MODE_NAMES[] = {"echo", "framed", "hold", "churn", "fanout", "paced"};
enum { CLOSE_AUTO, CLOSE_FIN, CLOSE_RST };
static const char *const CLOSE_NAMES[] = {"auto", "fin", "rst"};

/* Connection states. */
enum { ST_NONE, ST_CONNECTING, ST_ACTIVE, ST_CLOSED, ST_FAILED };

/* ------------------------------------------------------------------ options */

static struct {
    int mode;
    const char *host;
    long port;
    long connections;
    long size;
    double duration, warmup, connect_rate, connect_timeout, drain, rate;
    long subscribers, publisher_port, stalled;
    long max_requests, max_cycles, messages;
    const char *hello, *publisher_hello;
    int close_mode;
    int per_conn;
    long source_addrs;
    double probe_interval;
    int wait_reply;
    int barrier;
    int framed;
    int websocket;
    double barrier_timeout;
    long server_pid;
    double slice;
} O;

/* How many of `total` connections should be open `elapsed_ns` after the start:
   all of them, or as many as --connect-rate allows by now. */
static long connect_target(uint64_t elapsed_ns, long total) {
    if (O.connect_rate <= 0) return total;
    long target = (long)((double)elapsed_ns / 1e9 * O.connect_rate) + 1;
    return target > total ? total : target;
}

static volatile sig_atomic_t g_stop;
static int g_failed;            /* a verification failure: exit 1 */
static int g_run_failed;        /* the run could not happen: exit 3 */
static char g_error[768];

static void on_signal(int sig) { (void)sig; g_stop = 1; }

static void fail(const char *fmt, ...)
{
    if (g_failed) return;
    g_failed = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
}

static void run_failed(const char *fmt, ...)
{
    if (g_failed || g_run_failed) return;
    g_run_failed = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
}

static void hint(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* --------------------------------------------------------------------- time */

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t sec_ns(double s) { return s <= 0 ? 0 : (uint64_t)(s * 1e9); }
static double ns_sec(uint64_t ns) { return (double)ns / 1e9; }
static uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }
/* now - t, or 0 when t was taken after now (a connect issued later in the same loop turn). */
static inline uint64_t since(uint64_t now, uint64_t t) { return now > t ? now - t : 0; }

static void cpu_times(double *user, double *sys)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
    *sys = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* ------------------------------------------------------- the server's /proc */
/* --server-pid: the server's CPU time, RSS and thread count, read from /proc at
 * the moments a measured window starts and ends, so that "CPU per operation"
 * covers exactly the operations counted. CPU is user + system of the whole
 * process (every thread, including threads that have ended) plus its waited-for
 * children: /proc/PID/stat fields utime, stime, cutime, cstime. */

typedef struct { int ok; double cpu_s; long rss_kib, threads; } srvsnap_t;

static struct {
    long rss_kib_max, threads_max;
    uint64_t next_tick;
    int lost;                   /* the process went away during the run */
} g_srv;

#define SRV_TICK_NS 500000000ull

static srvsnap_t srv_snap(void)
{
    srvsnap_t s;
    memset(&s, 0, sizeof s);
    if (O.server_pid <= 0) return s;
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", O.server_pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { g_srv.lost = 1; return s; }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) { g_srv.lost = 1; return s; }
    buf[n] = 0;
    char *p = strrchr(buf, ')');   /* the command name may hold spaces and parentheses */
    if (!p) return s;
    unsigned long long f[20];
    int got = 0;
    char *save = NULL;
    for (char *tok = strtok_r(p + 1, " ", &save); tok && got < 20; tok = strtok_r(NULL, " ", &save))
        f[got++] = strtoull(tok, NULL, 10);   /* f[0] is the state letter (parses as 0) */
    if (got < 18) return s;
    static long tck, page_kib;
    if (!tck) { tck = sysconf(_SC_CLK_TCK); page_kib = sysconf(_SC_PAGESIZE) / 1024; }
    s.cpu_s = (double)(f[11] + f[12] + f[13] + f[14]) / (double)tck;
    s.threads = (long)f[17];
    snprintf(path, sizeof path, "/proc/%ld/statm", O.server_pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { g_srv.lost = 1; return s; }
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return s;
    buf[n] = 0;
    unsigned long long size_pages, resident_pages;
    if (sscanf(buf, "%llu %llu", &size_pages, &resident_pages) != 2) return s;
    s.rss_kib = (long)resident_pages * page_kib;
    s.ok = 1;
    if (s.rss_kib > g_srv.rss_kib_max) g_srv.rss_kib_max = s.rss_kib;
    if (s.threads > g_srv.threads_max) g_srv.threads_max = s.threads;
    return s;
}

/* Called from each mode's loop: samples RSS and threads twice a second for their maxima. */
static void srv_tick(uint64_t now)
{
    if (O.server_pid <= 0 || now < g_srv.next_tick) return;
    g_srv.next_tick = now + SRV_TICK_NS;
    srv_snap();
}

/* CPU used by this process (and, with --server-pid, by the server) over a measured interval. */
typedef struct { double u0, s0, u1, s1; uint64_t t0, t1; int started, ended; srvsnap_t srv0, srv1; } cpuwin_t;
static void cpuwin_start(cpuwin_t *w)
{
    if (w->started) return;
    w->srv0 = srv_snap();
    cpu_times(&w->u0, &w->s0);
    w->t0 = now_ns();
    w->started = 1;
}
static void cpuwin_end(cpuwin_t *w)
{
    if (!w->started || w->ended) return;
    cpu_times(&w->u1, &w->s1);
    w->t1 = now_ns();
    w->srv1 = srv_snap();
    w->ended = 1;
}

/* ---------------------------------------------------------------- histogram */
/* Log-bucket (HDR-style) histogram of nanoseconds: 128 linear sub-buckets per
 * power of two, so any reported value is within 0.4% of a recorded one. */

#define H_SUB_BITS 7
#define H_SUB (1u << H_SUB_BITS)
#define H_MAX_SHIFT 36
#define H_BUCKETS ((H_MAX_SHIFT + 2) * H_SUB)

typedef struct { uint64_t n, min, max; double sum; uint64_t b[H_BUCKETS]; } hist_t;

static hist_t *hist_new(void)
{
    hist_t *h = calloc(1, sizeof *h);
    if (!h) { perror("calloc"); exit(3); }
    h->min = UINT64_MAX;
    return h;
}

static inline void hist_add(hist_t *h, uint64_t v)
{
    unsigned idx;
    if (v < 2 * H_SUB) {
        idx = (unsigned)v;
    } else {
        unsigned shift = (unsigned)(63 - __builtin_clzll(v)) - H_SUB_BITS;
        uint64_t c = v;
        if (shift > H_MAX_SHIFT) { shift = H_MAX_SHIFT; c = ((uint64_t)(2 * H_SUB) << shift) - 1; }
        idx = (shift << H_SUB_BITS) + (unsigned)(c >> shift);
    }
    h->b[idx]++;
    h->n++;
    h->sum += (double)v;
    if (v < h->min) h->min = v;
    if (v > h->max) h->max = v;
}

static double bucket_mid(unsigned i)
{
    if (i < 2 * H_SUB) return (double)i;
    unsigned shift = (i >> H_SUB_BITS) - 1;
    uint64_t mant = i - ((uint64_t)shift << H_SUB_BITS);
    uint64_t low = mant << shift;
    return (double)low + (double)((1ull << shift) - 1) / 2.0;
}

static double hist_pct(const hist_t *h, double p)
{
    if (!h->n) return NAN;
    uint64_t rank = (uint64_t)ceil(p * (double)h->n);
    if (rank < 1) rank = 1;
    if (rank > h->n) rank = h->n;
    uint64_t cum = 0;
    for (unsigned i = 0; i < H_BUCKETS; i++) {
        cum += h->b[i];
        if (cum >= rank) {
            double v = bucket_mid(i);
            if (v < (double)h->min) v = (double)h->min;
            if (v > (double)h->max) v = (double)h->max;
            return v;
        }
    }
    return (double)h->max;
}

/* ---------------------------------------------------------------- JSON out */

static char *J;
static size_t Jlen, Jcap;
static int Jfirst[32];
static int Jdepth;

static void jraw(const char *s, size_t n)
{
    if (Jlen + n + 1 > Jcap) {
        size_t cap = Jcap ? Jcap : 4096;
        while (cap < Jlen + n + 1) cap *= 2;
        char *p = realloc(J, cap);
        if (!p) { perror("realloc"); exit(3); }
        J = p;
        Jcap = cap;
    }
    memcpy(J + Jlen, s, n);
    Jlen += n;
    J[Jlen] = 0;
}

static void jprintf(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > 0) jraw(buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

static void jquote(const char *s)
{
    jraw("\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') { char e[2] = {'\\', (char)*p}; jraw(e, 2); }
        else if (*p == '\n') jraw("\\n", 2);
        else if (*p == '\r') jraw("\\r", 2);
        else if (*p == '\t') jraw("\\t", 2);
        else if (*p < 0x20 || *p >= 0x7f) jprintf("\\u%04x", *p);
        else jraw((const char *)p, 1);
    }
    jraw("\"", 1);
}

static void jsep(const char *key)
{
    if (!Jfirst[Jdepth]) jraw(",", 1);
    Jfirst[Jdepth] = 0;
    if (key) { jquote(key); jraw(":", 1); }
}

static void jobj(const char *key) { jsep(key); jraw("{", 1); Jfirst[++Jdepth] = 1; }
static void jend(void) { jraw("}", 1); Jdepth--; }
static void jarr(const char *key) { jsep(key); jraw("[", 1); Jfirst[++Jdepth] = 1; }
static void jend_arr(void) { jraw("]", 1); Jdepth--; }
static void jint(const char *key, long long v) { jsep(key); jprintf("%lld", v); }
static void juint(const char *key, unsigned long long v) { jsep(key); jprintf("%llu", v); }
static void jbool(const char *key, int v) { jsep(key); jraw(v ? "true" : "false", v ? 4 : 5); }
static void jnull(const char *key) { jsep(key); jraw("null", 4); }
static void jstr(const char *key, const char *s) { jsep(key); if (s) jquote(s); else jraw("null", 4); }

static void jnum(const char *key, double v, int decimals)
{
    jsep(key);
    if (!isfinite(v)) jraw("null", 4);
    else jprintf("%.*f", decimals, v);
}

static void jlatency(const char *key, const hist_t *h)
{
    jobj(key);
    juint("count", h->n);
    if (!h->n) {
        jnull("min_us"); jnull("mean_us"); jnull("p50_us"); jnull("p90_us");
        jnull("p99_us"); jnull("p999_us"); jnull("max_us");
    } else {
        jnum("min_us", (double)h->min / 1e3, 1);
        jnum("mean_us", h->sum / (double)h->n / 1e3, 1);
        jnum("p50_us", hist_pct(h, 0.50) / 1e3, 1);
        jnum("p90_us", hist_pct(h, 0.90) / 1e3, 1);
        jnum("p99_us", hist_pct(h, 0.99) / 1e3, 1);
        jnum("p999_us", hist_pct(h, 0.999) / 1e3, 1);
        jnum("max_us", (double)h->max / 1e3, 1);
    }
    jend();
}

static void jcpu(const char *key, const cpuwin_t *w)
{
    jobj(key);
    if (w->started && w->ended && w->t1 > w->t0 + 10000000ull) {   /* at least 10 ms */
        double wall = ns_sec(w->t1 - w->t0);
        jnum("user_s", w->u1 - w->u0, 3);
        jnum("sys_s", w->s1 - w->s0, 3);
        jnum("wall_s", wall, 3);
        jnum("util", ((w->u1 - w->u0) + (w->s1 - w->s0)) / wall, 3);
    } else {
        jnull("user_s"); jnull("sys_s"); jnull("wall_s"); jnull("util");
    }
    jend();
}

/* The server over a window: its CPU time and utilisation (of one core), RSS and
 * threads at both ends, and the maxima sampled during the run. Omitted without
 * --server-pid. */
static void jserver(const char *key, const srvsnap_t *a, const srvsnap_t *b, uint64_t t0, uint64_t t1)
{
    if (O.server_pid <= 0) return;
    jobj(key);
    jint("pid", O.server_pid);
    int both = a->ok && b->ok && t1 > t0;
    double wall = both ? ns_sec(t1 - t0) : NAN;
    jnum("cpu_s", both ? b->cpu_s - a->cpu_s : NAN, 3);
    jnum("wall_s", wall, 3);
    jnum("util", both && wall >= 0.01 ? (b->cpu_s - a->cpu_s) / wall : NAN, 3);
    if (a->ok) { jint("rss_kib_start", a->rss_kib); jint("threads_start", a->threads); }
    else { jnull("rss_kib_start"); jnull("threads_start"); }
    if (b->ok) { jint("rss_kib_end", b->rss_kib); jint("threads_end", b->threads); }
    else { jnull("rss_kib_end"); jnull("threads_end"); }
    jint("rss_kib_max", g_srv.rss_kib_max);
    jint("threads_max", g_srv.threads_max);
    jbool("lost", g_srv.lost);
    jend();
}

static void jserver_window(const char *key, const cpuwin_t *w)
{
    jserver(key, &w->srv0, &w->srv1, w->t0, w->t1);
}

/* ------------------------------------------------------------ errno counts */

#define ERR_LOCAL_TIMEOUT (-1)
#define ERR_EARLY_EOF (-2)
#define ERR_OTHER (-3)

typedef struct { int code[24]; uint64_t n[24]; int used; uint64_t total; } errtab_t;

static void err_add(errtab_t *t, int code)
{
    t->total++;
    for (int i = 0; i < t->used; i++)
        if (t->code[i] == code) { t->n[i]++; return; }
    if (t->used < 23) { t->code[t->used] = code; t->n[t->used++] = 1; return; }
    for (int i = 0; i < t->used; i++)
        if (t->code[i] == ERR_OTHER) { t->n[i]++; return; }
    t->code[t->used] = ERR_OTHER;
    t->n[t->used++] = 1;
}

static const char *errname(int e)
{
    static char buf[32];
    switch (e) {
    case ERR_LOCAL_TIMEOUT: return "timeout";
    case ERR_EARLY_EOF: return "eof_before_reply";
    case ERR_OTHER: return "other";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ECONNRESET: return "ECONNRESET";
    case ECONNABORTED: return "ECONNABORTED";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case EADDRINUSE: return "EADDRINUSE";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case ENOBUFS: return "ENOBUFS";
    case ENOMEM: return "ENOMEM";
    case EPIPE: return "EPIPE";
    case EAGAIN: return "EAGAIN";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ENETUNREACH: return "ENETUNREACH";
    case EINVAL: return "EINVAL";
    default: snprintf(buf, sizeof buf, "errno_%d", e); return buf;
    }
}

static void jerrors(const char *key, const errtab_t *t)
{
    jobj(key);
    for (int i = 0; i < t->used; i++) juint(errname(t->code[i]), t->n[i]);
    jend();
}

/* ------------------------------------------------------------------ address */

static struct sockaddr_storage g_addr, g_pub_addr;
static socklen_t g_addrlen;

/* Parse a numeric loopback address; anything else is refused. */
static int make_addr(const char *host, long port, struct sockaddr_storage *ss, socklen_t *len,
                     char *why, size_t whylen)
{
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (port < 1 || port > 65535) { snprintf(why, whylen, "port %ld out of range 1-65535", port); return -1; }
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        if ((ntohl(a4->sin_addr.s_addr) >> 24) != 127) {
            snprintf(why, whylen, "refusing host %s: loopback only (127.0.0.0/8 or ::1)", host);
            return -1;
        }
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        *len = sizeof *a4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        if (!IN6_IS_ADDR_LOOPBACK(&a6->sin6_addr)) {
            snprintf(why, whylen, "refusing host %s: loopback only (127.0.0.0/8 or ::1)", host);
            return -1;
        }
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        *len = sizeof *a6;
        return 0;
    }
    snprintf(why, whylen, "refusing host %s: a numeric loopback address is required (127.0.0.0/8 or ::1)", host);
    return -1;
}

/* ------------------------------------------------------------ socket helpers */

static int ep_ctl(int ep, int op, int fd, uint32_t events, uint64_t data)
{
    struct epoll_event e;
    memset(&e, 0, sizeof e);
    e.events = events;
    e.data.u64 = data;
    return epoll_ctl(ep, op, fd, &e);
}

/* epoll wait with a nanosecond timeout (epoll_pwait2 where the kernel has it). */
static int ep_wait(int ep, struct epoll_event *ev, int max, int64_t timeout_ns)
{
    static int no_pwait2;
    int n;
    if (timeout_ns < 0) timeout_ns = 0;
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
    if (!no_pwait2) {
        struct timespec ts = {(time_t)(timeout_ns / 1000000000), (long)(timeout_ns % 1000000000)};
        n = epoll_pwait2(ep, ev, max, &ts, NULL);
        if (n >= 0) return n;
        if (errno == EINTR) return 0;
        if (errno != ENOSYS) { perror("epoll_pwait2"); exit(3); }
        no_pwait2 = 1;
    }
#else
    (void)no_pwait2;
#endif
    int ms = (int)((timeout_ns + 999999) / 1000000);
    if (timeout_ns > (int64_t)1000000 * 1000000) ms = 1000000;
    n = epoll_wait(ep, ev, max, ms);
    if (n < 0) {
        if (errno == EINTR) return 0;
        perror("epoll_wait");
        exit(3);
    }
    return n;
}

/* --source-addrs: connections are spread over 127.0.0.1 .. 127.0.0.K (IPv4
 * only), each with its own ephemeral port space; the port is chosen at
 * connect() (IP_BIND_ADDRESS_NO_PORT), so TIME_WAIT reuse still applies. */
static long g_nsrc = 1;
static uint64_t g_src_next;

/* Start a non-blocking connect; returns the fd (connect in progress) or -1 with *err. */
static int open_socket(const struct sockaddr_storage *sa, socklen_t len, int rcvbuf, int *err)
{
    int fd = socket(sa->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (fd < 0) { *err = errno; return -1; }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (g_nsrc > 1 && sa->ss_family == AF_INET) {
        struct sockaddr_in src;
        memset(&src, 0, sizeof src);
        src.sin_family = AF_INET;
        src.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(g_src_next++ % (uint64_t)g_nsrc));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (const struct sockaddr *)&src, sizeof src) < 0) { *err = errno; close(fd); return -1; }
    }
    if (connect(fd, (const struct sockaddr *)sa, len) < 0 && errno != EINPROGRESS) {
        *err = errno;
        close(fd);
        return -1;
    }
    *err = 0;
    return fd;
}

static int so_error(int fd)
{
    int err = 0;
    socklen_t l = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0) return errno;
    return err;
}

static void close_rst(int fd)
{
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* Send a short greeting (at most a few hundred bytes) right after connecting. */
static void send_small(int fd, const char *buf, size_t len)
{
    size_t off = 0;
    uint64_t give_up = now_ns() + 1000000000ull;
    while (off < len && now_ns() < give_up) {
        ssize_t n = send(fd, buf + off, len - off, MSG_NOSIGNAL);
        if (n > 0) off += (size_t)n;
        else if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        else break;
    }
}

/* --hello template: C escapes (\n \r \t \\) expanded, %d replaced by the connection index. */
static char g_hello_t[512], g_pub_hello[512];
static size_t g_pub_hello_len;

static int expand_escapes(const char *in, char *out, size_t cap)
{
    size_t o = 0;
    for (const char *p = in; *p; p++) {
        char c = *p;
        if (c == '\\' && p[1]) {
            p++;
            switch (*p) {
            case 'n': c = '\n'; break;
            case 'r': c = '\r'; break;
            case 't': c = '\t'; break;
            case '\\': c = '\\'; break;
            default: c = *p; break;
            }
        }
        if (o + 1 >= cap) return -1;
        out[o++] = c;
    }
    out[o] = 0;
    return (int)o;
}

static size_t format_hello(char *out, size_t cap, long index)
{
    size_t o = 0;
    for (const char *p = g_hello_t; *p && o + 24 < cap; p++) {
        if (p[0] == '%' && p[1] == 'd') { o += (size_t)snprintf(out + o, cap - o, "%ld", index); p++; }
        else if (p[0] == '%' && p[1] == '%') { out[o++] = '%'; p++; }
        else out[o++] = *p;
    }
    return o;
}

/* ---------------------------------------------------------- payload pattern */

static int g_framed;                   /* every message is a frame: 4-byte big-endian length, payload */
static unsigned char *g_pattern;       /* pseudo-random bytes, size + 1024 long */
static unsigned char *g_scratch;       /* receive buffer */

static void init_pattern(size_t size)
{
    g_pattern = malloc(size + 1024);
    g_scratch = malloc(SCRATCH_SIZE);
    if (!g_pattern || !g_scratch) { perror("malloc"); exit(3); }
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < size + 1024; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        g_pattern[i] = (unsigned char)(x >> 24);
    }
}

/* The request for (connection or slot idx, request seq): a window of the
 * pattern that moves with seq and idx, with seq and idx xor-ed into the first
 * 12 bytes, so an echo of another request or another connection is caught. */
static void build_request(unsigned char *m, uint64_t idx, uint64_t seq)
{
    size_t off = 0, s = (size_t)O.size;
    if (g_framed) {
        uint32_t be = htonl((uint32_t)O.size);
        memcpy(m, &be, 4);
        off = 4;
    }
    size_t po = (size_t)((seq * 131u + idx * 29u) & 1023u);
    memcpy(m + off, g_pattern + po, s);
    unsigned char tag[12];
    for (int i = 0; i < 8; i++) tag[i] = (unsigned char)(seq >> (8 * i));
    for (int i = 0; i < 4; i++) tag[8 + i] = (unsigned char)(idx >> (8 * i));
    size_t tn = s < 12 ? s : 12;
    for (size_t i = 0; i < tn; i++) m[off + i] ^= tag[i];
}

/* --websocket: each connection first does the HTTP/1.1 upgrade (RFC 6455 section 4, with the
 * RFC's sample key, so the expected Sec-WebSocket-Accept is fixed); then every request is one
 * binary frame, masked as a client must, and the echo one unmasked binary frame with the same
 * payload. Payloads up to 65,535 bytes (7- or 16-bit length). */
static int g_ws;
static const char WS_UPGRADE[] =
    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
static const char WS_ACCEPT[] = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
#define WS_HS_CAP 1024u

static size_t ws_header_len(size_t size) { return size < 126 ? 2 : 4; }

/* The request frame (masked) into req, the frame the server must send back into exp. */
static void build_ws(unsigned char *req, unsigned char *exp, uint64_t idx, uint64_t seq)
{
    size_t s = (size_t)O.size, h = ws_header_len(s);
    exp[0] = 0x82;   /* FIN, binary */
    if (h == 2) exp[1] = (unsigned char)s;
    else { exp[1] = 126; exp[2] = (unsigned char)(s >> 8); exp[3] = (unsigned char)s; }
    int saved = g_framed;
    g_framed = 0;
    build_request(exp + h, idx, seq);
    g_framed = saved;
    memcpy(req, exp, h);
    req[1] |= 0x80;  /* MASK */
    uint32_t key = (uint32_t)(seq * 2654435761u) ^ (uint32_t)(idx * 40503u) ^ 0x5bd1e995u;
    unsigned char mk[4] = {(unsigned char)key, (unsigned char)(key >> 8), (unsigned char)(key >> 16),
                           (unsigned char)(key >> 24)};
    memcpy(req + h, mk, 4);
    for (size_t i = 0; i < s; i++) req[h + 4 + i] = exp[h + i] ^ mk[i & 3];
}

/* Whether a complete upgrade response (through the blank line, nothing after it) is a 101
 * with the expected accept key; NULL if so, otherwise what is wrong. */
static const char *ws_check_response(const char *hs, size_t len)
{
    const char *end = strstr(hs, "\r\n\r\n");
    if (!end) return "no end of headers";
    if ((size_t)(end + 4 - hs) != len) return "data after the 101 response";
    if (strncmp(hs, "HTTP/1.1 101", 12) != 0) return "not a 101 response";
    const char *a = strcasestr(hs, "\r\nsec-websocket-accept:");
    if (!a || a > end) return "no Sec-WebSocket-Accept";
    a += 24;
    while (*a == ' ' || *a == '\t') a++;
    if (strncmp(a, WS_ACCEPT, sizeof WS_ACCEPT - 1) != 0) return "wrong Sec-WebSocket-Accept";
    return NULL;
}

static void describe_mismatch(const char *what, const char *unit, long idx, const char *req, uint64_t seq,
                              const unsigned char *expect, const unsigned char *got, size_t n, size_t base,
                              size_t total)
{
    size_t i = 0;
    while (i < n && expect[i] == got[i]) i++;
    fail("%s: %s %ld %s %llu: byte %zu of %zu differs (expected 0x%02x, got 0x%02x)", what, unit, idx, req,
         (unsigned long long)seq, base + i, total, expect[i], got[i]);
}

/* ----------------------------------------------------------- shared output */

static void jparams_common(void)
{
    jstr("host", O.host);
    jint("port", O.port);
    jint("source_addrs", g_nsrc);
    jbool("framed", g_framed);
    jbool("websocket", g_ws);
}

static void cpu_list(char *out, size_t cap)
{
    cpu_set_t set;
    out[0] = 0;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return;
    size_t o = 0;
    for (int c = 0; c < CPU_SETSIZE && o + 8 < cap; c++)
        if (CPU_ISSET(c, &set)) o += (size_t)snprintf(out + o, cap - o, o ? ",%d" : "%d", c);
}

/* Fairness over per-connection counts (only the given ones). */
static void jfairness(const uint64_t *counts, long n, const uint64_t *total_counts, long extra_starved)
{
    long starved = 0, never = 0;
    uint64_t mn = UINT64_MAX, mx = 0;
    double sum = 0, sumsq = 0;
    for (long i = 0; i < n; i++) {
        uint64_t v = counts[i];
        if (!v) starved++;
        if (total_counts && !total_counts[i]) never++;
        if (v < mn) mn = v;
        if (v > mx) mx = v;
        sum += (double)v;
        sumsq += (double)v * (double)v;
    }
    jobj("fairness");
    jint("connections", n);
    jint("starved", starved + extra_starved);
    if (total_counts) jint("never_served", never);
    if (n && sumsq > 0) jnum("jain", sum * sum / ((double)n * sumsq), 4);
    else jnull("jain");
    if (n) { juint("min", mn); juint("max", mx); jnum("mean", sum / (double)n, 1); }
    else { jnull("min"); jnull("max"); jnull("mean"); }
    jend();
}

/* ================================================================ echo/framed */

typedef struct {
    int fd;
    uint8_t state, wout, busy, established, upgrading;
    uint32_t sent, rcvd;
    uint64_t seq, t_conn, t_req;
    unsigned char *msg, *exp;     /* the request, and the reply expected (the same bytes unless --websocket) */
    char *hs;                     /* --websocket: the upgrade response while it arrives */
    uint32_t hslen;
} econn_t;

typedef struct {
    int ep;
    size_t msglen, replen;       /* request and reply on the wire */
    uint64_t ws, we;
    int running;
    uint64_t issued, outstanding, total_rt, win_rt, verified;
    long active;
    uint64_t *win;              /* per-connection round trips in the window */
    uint64_t *all;              /* per-connection round trips in the whole run */
    hist_t *lat, *first;
    errtab_t ioerr;
    uint64_t closed_eof, closed_err;
    /* --barrier: no second request anywhere until every connection has had its first reply */
    int released;               /* the barrier is down (always, without --barrier) */
    long served_first;          /* connections that have had their first reply */
    long waiting_first;         /* open connections still waiting for it */
    uint64_t t_last_first;      /* when the last first reply arrived */
} echo_t;

static void echo_close(echo_t *E, econn_t *k, int how_err)
{
    if (k->fd >= 0) close(k->fd);
    k->fd = -1;
    if (k->busy) { k->busy = 0; E->outstanding--; }
    if (k->state == ST_ACTIVE) E->active--;
    if (k->state == ST_ACTIVE && k->seq == 0) E->waiting_first--;
    k->state = ST_CLOSED;
    if (how_err == 0) E->closed_eof++;
    else { E->closed_err++; err_add(&E->ioerr, how_err); }
}

static void echo_send(echo_t *E, econn_t *k, long idx)
{
    while (k->sent < E->msglen) {
        ssize_t n = send(k->fd, k->msg + k->sent, E->msglen - k->sent, MSG_NOSIGNAL);
        if (n > 0) { k->sent += (uint32_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) {
            if (!k->wout) { ep_ctl(E->ep, EPOLL_CTL_MOD, k->fd, EPOLLIN | EPOLLOUT, (uint64_t)idx); k->wout = 1; }
            return;
        }
        echo_close(E, k, n < 0 ? errno : ERR_OTHER);
        return;
    }
    if (k->wout) { ep_ctl(E->ep, EPOLL_CTL_MOD, k->fd, EPOLLIN, (uint64_t)idx); k->wout = 0; }
}

static int echo_may_issue(echo_t *E, const econn_t *k, uint64_t t)
{
    if (!E->released && k->seq > 0) return 0;
    return E->running && t < E->we && !g_stop && !(O.max_requests > 0 && E->issued >= (uint64_t)O.max_requests);
}

static void echo_start(echo_t *E, econn_t *k, long idx, uint64_t t)
{
    if (g_ws) build_ws(k->msg, k->exp, (uint64_t)idx, k->seq);
    else build_request(k->msg, (uint64_t)idx, k->seq);
    k->sent = k->rcvd = 0;
    k->t_req = t;
    k->busy = 1;
    E->issued++;
    E->outstanding++;
    echo_send(E, k, idx);
}

/* --websocket: the upgrade response; once it is complete and right, the first request goes. */
static void echo_upgrade_read(echo_t *E, econn_t *k, long idx)
{
    ssize_t r = recv(k->fd, k->hs + k->hslen, WS_HS_CAP - 1 - k->hslen, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        echo_close(E, k, errno);
        return;
    }
    if (r == 0) { echo_close(E, k, ERR_EARLY_EOF); return; }
    k->hslen += (uint32_t)r;
    k->hs[k->hslen] = 0;
    if (!strstr(k->hs, "\r\n\r\n")) {
        if (k->hslen >= WS_HS_CAP - 1) fail("%s: connection %ld: upgrade response over %u bytes", MODE_NAMES[O.mode], idx, WS_HS_CAP);
        return;
    }
    const char *wrong = ws_check_response(k->hs, k->hslen);
    if (wrong) {
        char *eol = strstr(k->hs, "\r\n");
        if (eol) *eol = 0;
        fail("%s: connection %ld: upgrade refused (%s): %.120s", MODE_NAMES[O.mode], idx, wrong, k->hs);
        return;
    }
    free(k->hs);
    k->hs = NULL;
    k->upgrading = 0;
    uint64_t t = now_ns();
    if (echo_may_issue(E, k, t)) echo_start(E, k, idx, t);
}

static void echo_read(echo_t *E, econn_t *k, long idx)
{
    if (k->upgrading) { echo_upgrade_read(E, k, idx); return; }
    size_t rem = k->busy ? E->replen - k->rcvd : 0;
    size_t want = rem + 1 < SCRATCH_SIZE ? rem + 1 : SCRATCH_SIZE;
    ssize_t r = recv(k->fd, g_scratch, want, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        echo_close(E, k, errno);
        return;
    }
    if (r == 0) { echo_close(E, k, 0); return; }
    if ((size_t)r > rem) {
        fail("%s: connection %ld received %zd bytes with only %zu outstanding (request %llu)",
             MODE_NAMES[O.mode], idx, r, rem, (unsigned long long)k->seq);
        return;
    }
    if (memcmp(g_scratch, k->exp + k->rcvd, (size_t)r) != 0) {
        describe_mismatch(MODE_NAMES[O.mode], "connection", idx, "request", k->seq, k->exp + k->rcvd, g_scratch, (size_t)r,
                          k->rcvd, E->replen);
        return;
    }
    k->rcvd += (uint32_t)r;
    E->verified += (uint64_t)r;
    if (k->rcvd < E->replen) return;

    uint64_t t = now_ns();
    if (k->seq == 0) {
        hist_add(E->first, t - k->t_conn);
        E->served_first++;
        E->waiting_first--;
        E->t_last_first = t;
    }
    k->seq++;
    k->busy = 0;
    E->outstanding--;
    E->total_rt++;
    E->all[idx]++;
    if (t >= E->ws && t < E->we) {
        E->win[idx]++;
        E->win_rt++;
        hist_add(E->lat, t - k->t_req);
    }
    if (echo_may_issue(E, k, t)) echo_start(E, k, idx, t);
}

/* --probe-interval: during the window, a fresh connection every interval does
 * one request and closes; its connect-start -> echo time shows how long a new
 * client waits for service while the others keep the server busy. */
#define PROBE_TAG ((uint64_t)1 << 40)
typedef struct {
    int fd, state, wout;
    uint32_t sent, rcvd;
    uint64_t t_start, next, started, ok;
    unsigned char *msg;
    hist_t *h;
    errtab_t err;
} probe_t;

static void probe_end(probe_t *pr, int err, uint64_t now)
{
    if (pr->fd >= 0) close(pr->fd);
    pr->fd = -1;
    pr->state = ST_NONE;
    if (err) err_add(&pr->err, err);
    pr->next = now + sec_ns(O.probe_interval);
}

static void probe_maybe_start(echo_t *E, probe_t *pr, uint64_t now)
{
    if (O.probe_interval <= 0 || pr->state != ST_NONE || now < pr->next || !E->running || now >= E->we) return;
    int err;
    pr->t_start = now_ns();
    pr->started++;
    pr->fd = open_socket(&g_addr, g_addrlen, 0, &err);
    if (pr->fd < 0) { pr->fd = -1; probe_end(pr, err, now); return; }
    pr->state = ST_CONNECTING;
    ep_ctl(E->ep, EPOLL_CTL_ADD, pr->fd, EPOLLOUT, PROBE_TAG);
}

static void probe_event(echo_t *E, probe_t *pr, uint32_t ev)
{
    if (pr->state == ST_CONNECTING) {
        int err = so_error(pr->fd);
        if (err) { probe_end(pr, err, now_ns()); return; }
        pr->state = ST_ACTIVE;
        pr->sent = pr->rcvd = 0;
        build_request(pr->msg, (uint64_t)O.connections, pr->started);
        ep_ctl(E->ep, EPOLL_CTL_MOD, pr->fd, EPOLLIN | EPOLLOUT, PROBE_TAG);
        pr->wout = 1;
        ev |= EPOLLOUT;
    }
    if (pr->state != ST_ACTIVE) return;
    if ((ev & EPOLLOUT) && pr->sent < E->msglen) {
        while (pr->sent < E->msglen) {
            ssize_t w = send(pr->fd, pr->msg + pr->sent, E->msglen - pr->sent, MSG_NOSIGNAL);
            if (w > 0) { pr->sent += (uint32_t)w; continue; }
            if (w < 0 && errno == EINTR) continue;
            if (w < 0 && errno == EAGAIN) break;
            probe_end(pr, w < 0 ? errno : ERR_OTHER, now_ns());
            return;
        }
        if (pr->sent == E->msglen && pr->wout) { ep_ctl(E->ep, EPOLL_CTL_MOD, pr->fd, EPOLLIN, PROBE_TAG); pr->wout = 0; }
    }
    if (!(ev & (EPOLLIN | EPOLLERR | EPOLLHUP))) return;
    size_t rem = E->msglen - pr->rcvd;
    size_t want = rem + 1 < SCRATCH_SIZE ? rem + 1 : SCRATCH_SIZE;
    ssize_t r = recv(pr->fd, g_scratch, want, 0);
    if (r < 0) { if (errno != EAGAIN && errno != EINTR) probe_end(pr, errno, now_ns()); return; }
    if (r == 0) { probe_end(pr, ERR_EARLY_EOF, now_ns()); return; }
    if ((size_t)r > rem) {
        fail("%s: probe %llu received %zd bytes with only %zu outstanding", MODE_NAMES[O.mode],
             (unsigned long long)pr->started, r, rem);
        return;
    }
    if (memcmp(g_scratch, pr->msg + pr->rcvd, (size_t)r) != 0) {
        describe_mismatch(MODE_NAMES[O.mode], "probe", (long)pr->started, "request", 0, pr->msg + pr->rcvd,
                          g_scratch, (size_t)r, pr->rcvd, E->msglen);
        return;
    }
    pr->rcvd += (uint32_t)r;
    E->verified += (uint64_t)r;
    if (pr->rcvd < E->msglen) return;
    uint64_t t = now_ns();
    hist_add(pr->h, t - pr->t_start);
    pr->ok++;
    probe_end(pr, 0, t);
}

static int run_echo(void)
{
    long N = O.connections;
    echo_t E;
    memset(&E, 0, sizeof E);
    E.msglen = (size_t)O.size + (g_framed ? 4 : 0);
    E.replen = E.msglen;
    if (g_ws) { E.replen = (size_t)O.size + ws_header_len((size_t)O.size); E.msglen = E.replen + 4; }
    size_t slot = E.msglen + (g_ws ? E.replen : 0);
    econn_t *c = calloc((size_t)N, sizeof *c);
    unsigned char *arena = malloc((size_t)(N + 1) * slot);   /* +1: the probe */
    E.win = calloc((size_t)N, sizeof *E.win);
    E.all = calloc((size_t)N, sizeof *E.all);
    if (!c || !arena || !E.win || !E.all) { perror("malloc"); exit(3); }
    E.lat = hist_new();
    E.first = hist_new();
    hist_t *conn_h = hist_new();
    errtab_t cerr;
    memset(&cerr, 0, sizeof cerr);
    E.ep = epoll_create1(EPOLL_CLOEXEC);
    if (E.ep < 0) { perror("epoll_create1"); exit(3); }
    for (long i = 0; i < N; i++) {
        c[i].fd = -1;
        c[i].msg = arena + (size_t)i * slot;
        c[i].exp = g_ws ? c[i].msg + E.msglen : c[i].msg;
    }

    struct epoll_event evs[MAX_EVENTS];
    cpuwin_t cw;
    memset(&cw, 0, sizeof cw);
    srvsnap_t srv_b0 = srv_snap(), srv_b1;
    memset(&srv_b1, 0, sizeof srv_b1);
    uint64_t t0 = now_ns(), t_release = 0;
    int barrier_timed_out = 0;
    E.released = !O.barrier;
    E.ws = E.released ? t0 + sec_ns(O.warmup) : UINT64_MAX;   /* --barrier: set when it comes down */
    E.we = E.released ? E.ws + sec_ns(O.duration) : UINT64_MAX;
    E.running = 1;
    long opened = 0, connecting = 0, established = 0, conn_timeouts = 0;
    uint64_t next_scan = t0 + SCAN_INTERVAL_NS, drain_end = 0, window_end = 0;
    uint64_t t_all_connected = 0;
    int drain_timed_out = 0;
    probe_t pr;
    memset(&pr, 0, sizeof pr);
    pr.fd = -1;
    pr.msg = arena + (size_t)N * slot;
    pr.h = hist_new();
    pr.next = E.ws;
    if (O.server_pid > 0) g_srv.next_tick = t0 + SRV_TICK_NS;

    for (;;) {
        uint64_t now = now_ns();
        if (g_failed) break;
        if (E.running) {
            int all_done = opened == N && connecting == 0 && E.active == 0;
            int max_done = O.max_requests > 0 && E.issued >= (uint64_t)O.max_requests && E.outstanding == 0;
            if (now >= E.we || g_stop || all_done || max_done) {
                E.running = 0;
                window_end = now < E.we ? now : E.we;
                cpuwin_end(&cw);
                drain_end = now + sec_ns(O.drain);
            }
        }
        if (!E.running && (E.outstanding == 0 || now >= drain_end || g_stop)) {
            drain_timed_out = E.outstanding > 0;
            break;
        }
        if (!E.released) {
            /* the burst is over once every connection has connected and had its first reply
               (or failed); the steady state is measured only after that */
            int all_in = opened == N && connecting == 0 && E.waiting_first == 0;
            if (all_in || now - t0 >= sec_ns(O.barrier_timeout)) {
                E.released = 1;
                t_release = now;
                barrier_timed_out = !all_in;
                srv_b1 = srv_snap();
                E.ws = now + sec_ns(O.warmup);
                E.we = E.ws + sec_ns(O.duration);
                pr.next = E.ws;
                for (long i = 0; i < opened; i++)
                    if (c[i].state == ST_ACTIVE && !c[i].busy && !c[i].upgrading && echo_may_issue(&E, &c[i], now))
                        echo_start(&E, &c[i], i, now);
            }
        }
        if (!cw.started && E.running && now >= E.ws) cpuwin_start(&cw);
        srv_tick(now);

        /* open connections: all at once (in batches) or paced by --connect-rate */
        int64_t timeout = !E.running ? (int64_t)(drain_end - now)
                          : E.released ? (int64_t)(E.we - now) : (int64_t)SCAN_INTERVAL_NS;
        if (E.running && opened < N) {
            long target = connect_target(now - t0, N);
            for (int b = 0; opened < target && b < OPEN_BATCH; b++) {
                econn_t *k = &c[opened];
                k->t_conn = now_ns();
                int err;
                k->fd = open_socket(&g_addr, g_addrlen, 0, &err);
                if (k->fd < 0) { err_add(&cerr, err); k->state = ST_FAILED; }
                else { k->state = ST_CONNECTING; connecting++; ep_ctl(E.ep, EPOLL_CTL_ADD, k->fd, EPOLLOUT, (uint64_t)opened); }
                opened++;
            }
            if (opened < target) timeout = 0;
            else if (opened < N) {
                uint64_t next = t0 + (uint64_t)((double)opened / O.connect_rate * 1e9);
                int64_t d = next > now ? (int64_t)(next - now) : 0;
                if (d < timeout) timeout = d;
            }
        }
        if (O.probe_interval > 0) {
            if (pr.state != ST_NONE && since(now, pr.t_start) > sec_ns(O.connect_timeout))
                probe_end(&pr, ERR_LOCAL_TIMEOUT, now);
            probe_maybe_start(&E, &pr, now);
            if (pr.state == ST_NONE && E.running && pr.next < E.we) {
                int64_t d = pr.next > now ? (int64_t)(pr.next - now) : 0;
                if (d < timeout) timeout = d;
            }
            if (pr.state != ST_NONE && timeout > (int64_t)SCAN_INTERVAL_NS) timeout = (int64_t)SCAN_INTERVAL_NS;
        }
        if (connecting > 0) {
            if (now >= next_scan) {
                for (long i = 0; i < opened; i++) {
                    econn_t *k = &c[i];
                    if (k->state == ST_CONNECTING && since(now, k->t_conn) > sec_ns(O.connect_timeout)) {
                        close(k->fd); k->fd = -1; k->state = ST_FAILED; connecting--;
                        err_add(&cerr, ERR_LOCAL_TIMEOUT); conn_timeouts++;
                    }
                }
                next_scan = now + SCAN_INTERVAL_NS;
            }
            if ((int64_t)SCAN_INTERVAL_NS < timeout) timeout = (int64_t)SCAN_INTERVAL_NS;
        }

        int n = ep_wait(E.ep, evs, MAX_EVENTS, timeout);
        for (int i = 0; i < n && !g_failed; i++) {
            if (evs[i].data.u64 == PROBE_TAG) { probe_event(&E, &pr, evs[i].events); continue; }
            long idx = (long)evs[i].data.u64;
            econn_t *k = &c[idx];
            uint32_t ev = evs[i].events;
            if (k->state == ST_CONNECTING) {
                int err = so_error(k->fd);
                connecting--;
                if (err) { close(k->fd); k->fd = -1; k->state = ST_FAILED; err_add(&cerr, err); continue; }
                uint64_t t = now_ns();
                hist_add(conn_h, t - k->t_conn);
                k->state = ST_ACTIVE;
                k->established = 1;
                established++;
                E.active++;
                if (opened == N && connecting == 0) t_all_connected = t;
                ep_ctl(E.ep, EPOLL_CTL_MOD, k->fd, EPOLLIN, (uint64_t)idx);
                E.waiting_first++;
                if (g_ws) {
                    k->hs = malloc(WS_HS_CAP);
                    if (!k->hs) { perror("malloc"); exit(3); }
                    k->hslen = 0;
                    k->upgrading = 1;
                    send_small(k->fd, WS_UPGRADE, sizeof WS_UPGRADE - 1);
                } else if (echo_may_issue(&E, k, t)) echo_start(&E, k, idx, t);
                continue;
            }
            if (k->state != ST_ACTIVE) continue;
            if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) echo_read(&E, k, idx);
            if (k->state == ST_ACTIVE && (ev & EPOLLOUT) && k->busy && k->sent < E.msglen) echo_send(&E, k, idx);
        }
    }
    for (long i = 0; i < N; i++) free(c[i].hs);
    cpuwin_end(&cw);
    if (pr.fd >= 0) close(pr.fd);
    uint64_t t_stop = now_ns();
    long pending = 0, still_open = 0;
    for (long i = 0; i < N; i++) {
        if (c[i].state == ST_CONNECTING) pending++;
        if (c[i].state == ST_ACTIVE) still_open++;
        if (c[i].fd >= 0) close(c[i].fd);
    }
    if (!window_end) window_end = t_stop < E.we ? t_stop : E.we;
    double window_s = window_end > E.ws ? ns_sec(window_end - E.ws) : 0;
    if (!g_failed && established == 0) run_failed("no connection could be established");
    if (!g_failed && established > 0 && E.total_rt == 0) run_failed("no round trip completed");

    /* fairness over established connections */
    uint64_t *wc = malloc(sizeof *wc * (size_t)(established ? established : 1));
    uint64_t *ac = malloc(sizeof *ac * (size_t)(established ? established : 1));
    long m = 0;
    for (long i = 0; i < N; i++) if (c[i].established) { wc[m] = E.win[i]; ac[m] = E.all[i]; m++; }

    jobj("params");
    jparams_common();
    jint("connections", N);
    jint("size", O.size);
    jnum("duration_s", O.duration, 3);
    jnum("warmup_s", O.warmup, 3);
    jnum("connect_rate", O.connect_rate, 1);
    jint("max_requests", O.max_requests);
    jnum("probe_interval_s", O.probe_interval, 3);
    jbool("barrier", O.barrier);
    jend();
    jobj("results");
    if (O.barrier) {
        jobj("burst");
        jint("connections", N);
        jint("served", E.served_first);
        if (E.served_first == N && E.t_last_first) jnum("all_served_s", ns_sec(E.t_last_first - t0), 4);
        else jnull("all_served_s");
        if (t_release) jnum("released_s", ns_sec(t_release - t0), 4);
        else jnull("released_s");
        jbool("timed_out", barrier_timed_out);
        if (O.server_pid > 0 && srv_b0.ok && srv_b1.ok) jnum("server_cpu_s", srv_b1.cpu_s - srv_b0.cpu_s, 3);
        else jnull("server_cpu_s");
        jend();
    }
    juint("round_trips", E.win_rt);
    jnum("window_s", window_s, 3);
    jnum("round_trips_per_s", window_s > 0 ? (double)E.win_rt / window_s : NAN, 1);
    jnum("payload_bytes_per_s", window_s > 0 ? (double)E.win_rt * (double)O.size / window_s : NAN, 0);
    jlatency("latency", E.lat);
    jfairness(wc, m, ac, 0);
    jlatency("first_request", E.first);
    jlatency("connect", conn_h);
    jobj("connections");
    jint("opened", opened);
    jint("established", established);
    jint("still_open", still_open);
    jint("connect_pending", pending);
    jerrors("connect_errors", &cerr);
    juint("closed_by_server", E.closed_eof);
    juint("closed_with_error", E.closed_err);
    jerrors("io_errors", &E.ioerr);
    if (t_all_connected) jnum("all_connected_s", ns_sec(t_all_connected - t0), 3);
    else jnull("all_connected_s");
    jend();
    if (O.probe_interval > 0) {
        jobj("probe");
        juint("started", pr.started);
        juint("completed", pr.ok);
        jerrors("errors", &pr.err);
        jlatency("latency", pr.h);
        jend();
    }
    juint("total_round_trips", E.total_rt);
    juint("verified_bytes", E.verified);
    jbool("drain_timed_out", drain_timed_out);
    if (O.per_conn) {
        jarr("per_connection");
        for (long i = 0; i < N; i++) {
            if (c[i].established) { jsep(NULL); jprintf("%llu", (unsigned long long)E.win[i]); }
            else jnull(NULL);
        }
        jend_arr();
    }
    jend();
    jcpu("loadgen_cpu", &cw);
    jserver_window("server", &cw);
    hint("%s: %llu round trips in %.2f s = %.0f/s; %ld/%ld established", MODE_NAMES[O.mode],
         (unsigned long long)E.win_rt, window_s, window_s > 0 ? (double)E.win_rt / window_s : 0.0,
         established, N);
    close(E.ep);
    return 0;
}

/* ====================================================================== hold */

static int run_hold(void)
{
    long N = O.connections;
    typedef struct { int fd; uint8_t state, established, served; uint64_t t_conn; } hconn_t;
    hconn_t *c = calloc((size_t)N, sizeof *c);
    if (!c) { perror("calloc"); exit(3); }
    hist_t *conn_h = hist_new();
    errtab_t cerr, closeerr;
    memset(&cerr, 0, sizeof cerr);
    memset(&closeerr, 0, sizeof closeerr);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) { perror("epoll_create1"); exit(3); }
    struct epoll_event evs[MAX_EVENTS];
    cpuwin_t cw;
    memset(&cw, 0, sizeof cw);
    cpuwin_start(&cw);
    srvsnap_t srv_h0 = cw.srv0, srv_h1;   /* the server before connecting, and at the end of the hold */
    memset(&srv_h1, 0, sizeof srv_h1);

    uint64_t t0 = now_ns(), t_last_open = t0, t_hold = 0, t_end = 0;
    if (O.server_pid > 0) g_srv.next_tick = t0 + SRV_TICK_NS;
    long opened = 0, connecting = 0, established = 0, open_now = 0;
    long closed_eof = 0, closed_err = 0, closed_in_hold = 0, served = 0, served_open = 0;
    uint64_t bytes_rx = 0, next_scan = t0 + SCAN_INTERVAL_NS;
    char hello[600];

    for (;;) {
        uint64_t now = now_ns();
        if (g_stop || g_failed) break;
        if (!t_hold) {
            int all = opened == N && connecting == 0 && (!O.wait_reply || served_open == open_now);
            int late = opened == N && since(now, t_last_open) >= sec_ns(O.connect_timeout);
            if (all || late) {
                t_hold = now;
                t_end = now + sec_ns(O.duration);
                hint("hold: ready established=%ld open=%ld served=%ld of %ld; holding for %.1f s", established,
                     open_now, served_open, N, O.duration);
            }
        } else if (now >= t_end) break;
        srv_tick(now);

        int64_t timeout = t_hold ? (int64_t)(t_end - now) : (int64_t)SCAN_INTERVAL_NS;
        if (O.server_pid > 0 && timeout > (int64_t)SRV_TICK_NS) timeout = (int64_t)SRV_TICK_NS;
        if (opened < N) {
            long target = connect_target(now - t0, N);
            for (int b = 0; opened < target && b < OPEN_BATCH; b++) {
                hconn_t *k = &c[opened];
                k->t_conn = now_ns();
                int err;
                k->fd = open_socket(&g_addr, g_addrlen, 0, &err);
                if (k->fd < 0) { err_add(&cerr, err); k->state = ST_FAILED; }
                else { k->state = ST_CONNECTING; connecting++; ep_ctl(ep, EPOLL_CTL_ADD, k->fd, EPOLLOUT, (uint64_t)opened); }
                opened++;
                t_last_open = k->t_conn;
            }
            if (opened < target) timeout = 0;
            else if (opened < N) {
                uint64_t next = t0 + (uint64_t)((double)opened / O.connect_rate * 1e9);
                int64_t d = next > now ? (int64_t)(next - now) : 0;
                if (d < timeout) timeout = d;
            }
        }
        if (connecting > 0 && now >= next_scan) {
            for (long i = 0; i < opened; i++) {
                hconn_t *k = &c[i];
                if (k->state == ST_CONNECTING && since(now, k->t_conn) > sec_ns(O.connect_timeout)) {
                    close(k->fd); k->fd = -1; k->state = ST_FAILED; connecting--;
                    err_add(&cerr, ERR_LOCAL_TIMEOUT);
                }
            }
            next_scan = now + SCAN_INTERVAL_NS;
        }
        if (connecting > 0 && timeout > (int64_t)SCAN_INTERVAL_NS) timeout = (int64_t)SCAN_INTERVAL_NS;

        int n = ep_wait(ep, evs, MAX_EVENTS, timeout);
        for (int i = 0; i < n; i++) {
            long idx = (long)evs[i].data.u64;
            hconn_t *k = &c[idx];
            if (k->state == ST_CONNECTING) {
                int err = so_error(k->fd);
                connecting--;
                if (err) { close(k->fd); k->fd = -1; k->state = ST_FAILED; err_add(&cerr, err); continue; }
                hist_add(conn_h, now_ns() - k->t_conn);
                k->state = ST_ACTIVE;
                k->established = 1;
                established++;
                open_now++;
                if (g_ws) send_small(k->fd, WS_UPGRADE, sizeof WS_UPGRADE - 1);
                else if (g_hello_t[0] || O.framed) {
                    /* --framed: the greeting goes as one frame ("h" if no --hello), so a framed
                       echo server answers it too */
                    size_t hl = g_hello_t[0] ? format_hello(hello + 4, sizeof hello - 4, idx) : 1;
                    if (!g_hello_t[0]) hello[4] = 'h';
                    uint32_t be = htonl((uint32_t)hl);
                    memcpy(hello, &be, 4);
                    if (O.framed) send_small(k->fd, hello, hl + 4);
                    else send_small(k->fd, hello + 4, hl);
                }
                ep_ctl(ep, EPOLL_CTL_MOD, k->fd, EPOLLIN | EPOLLRDHUP, (uint64_t)idx);
                continue;
            }
            if (k->state != ST_ACTIVE) continue;
            ssize_t r = recv(k->fd, g_scratch, SCRATCH_SIZE, 0);
            if (r > 0) {
                bytes_rx += (uint64_t)r;
                if (!k->served && g_ws && (r < 12 || memcmp(g_scratch, "HTTP/1.1 101", 12) != 0)) {
                    fail("hold: connection %ld: the upgrade was refused: %.60s", idx, (const char *)g_scratch);
                    break;
                }
                if (!k->served) { k->served = 1; served++; served_open++; }
                continue;
            }
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r == 0) closed_eof++;
            else { closed_err++; err_add(&closeerr, errno); }
            if (t_hold) closed_in_hold++;
            if (k->served) served_open--;
            close(k->fd); k->fd = -1; k->state = ST_CLOSED; open_now--;
        }
    }
    uint64_t t_stop = now_ns();
    srv_h1 = srv_snap();   /* before closing: what the server holds for N connections */
    cpuwin_end(&cw);
    long pending = 0;
    for (long i = 0; i < N; i++) {
        if (c[i].state == ST_CONNECTING) pending++;
        if (c[i].fd >= 0) close(c[i].fd);
    }
    if (established == 0) run_failed("no connection could be established");

    jobj("params");
    jparams_common();
    jint("connections", N);
    jnum("duration_s", O.duration, 3);
    jnum("connect_rate", O.connect_rate, 1);
    jnum("connect_timeout_s", O.connect_timeout, 3);
    jstr("hello", O.hello);
    jbool("wait_reply", O.wait_reply);
    jend();
    jobj("results");
    jint("opened", opened);
    jint("established", established);
    jint("still_open", open_now);
    jint("served", served);
    jint("closed_by_server", closed_eof);
    jint("reset_by_server", closed_err);
    jint("closed_during_hold", closed_in_hold);
    jerrors("close_errors", &closeerr);
    jint("connect_pending", pending);
    jerrors("connect_errors", &cerr);
    jlatency("connect", conn_h);
    if (t_hold) { jnum("time_to_ready_s", ns_sec(t_hold - t0), 3); jnum("held_s", ns_sec(t_stop - t_hold), 3); }
    else { jnull("time_to_ready_s"); jnull("held_s"); }
    juint("bytes_received", bytes_rx);
    jend();
    jcpu("loadgen_cpu", &cw);
    jserver("server", &srv_h0, &srv_h1, t0, t_stop);
    hint("hold: %ld established, %ld still open at the end, %ld closed by the server", established, open_now,
         closed_eof + closed_err);
    close(ep);
    return 0;
}

/* ===================================================================== churn */

typedef struct {
    int fd;
    uint8_t state;              /* ST_NONE idle, ST_CONNECTING, ST_ACTIVE (sending/receiving) */
    uint32_t sent, rcvd;
    uint64_t cycle, t_start, next_start;
    unsigned char *msg;
} cslot_t;

static int g_tw_reuse = -1;

static int run_churn(void)
{
    long C = O.connections;
    size_t len = (size_t)O.size + (g_framed ? 4 : 0);
    cslot_t *s = calloc((size_t)C, sizeof *s);
    unsigned char *arena = malloc((size_t)C * len);
    if (!s || !arena) { perror("malloc"); exit(3); }
    for (long i = 0; i < C; i++) { s[i].fd = -1; s[i].msg = arena + (size_t)i * len; }
    hist_t *lat = hist_new(), *conn_h = hist_new();
    errtab_t cerr, ioerr;
    memset(&cerr, 0, sizeof cerr);
    memset(&ioerr, 0, sizeof ioerr);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) { perror("epoll_create1"); exit(3); }
    struct epoll_event evs[MAX_EVENTS];
    int rst = O.close_mode == CLOSE_RST;
    cpuwin_t cw;
    memset(&cw, 0, sizeof cw);

    uint64_t t0 = now_ns(), ws = t0 + sec_ns(O.warmup), we = ws + sec_ns(O.duration);
    uint64_t started = 0, completed = 0, win = 0, failed = 0, verified = 0;
    uint64_t next_scan = t0 + SCAN_INTERVAL_NS, drain_end = 0, window_end = 0;
    long in_flight = 0;
    int running = 1;

    for (;;) {
        uint64_t now = now_ns();
        if (g_failed) break;
        if (running && (now >= we || g_stop || (O.max_cycles > 0 && started >= (uint64_t)O.max_cycles))) {
            running = 0;
            window_end = now < we ? now : we;
            cpuwin_end(&cw);
            drain_end = now + sec_ns(O.drain);
        }
        if (!running && (in_flight == 0 || now >= drain_end || g_stop)) break;
        if (!cw.started && now >= ws) cpuwin_start(&cw);

        int64_t timeout = running ? (int64_t)(we - now) : (int64_t)(drain_end - now);
        if (running) {
            for (long i = 0; i < C; i++) {
                cslot_t *k = &s[i];
                if (k->state != ST_NONE) continue;
                if (O.max_cycles > 0 && started >= (uint64_t)O.max_cycles) break;
                if (k->next_start > now) {
                    if ((int64_t)(k->next_start - now) < timeout) timeout = (int64_t)(k->next_start - now);
                    continue;
                }
                k->cycle = started++;
                k->t_start = now_ns();
                int err;
                k->fd = open_socket(&g_addr, g_addrlen, 0, &err);
                if (k->fd < 0) {
                    err_add(&cerr, err); failed++;
                    k->next_start = now + 1000000;   /* back off 1 ms after an error */
                    if (timeout > 1000000) timeout = 1000000;
                    continue;
                }
                k->state = ST_CONNECTING;
                k->sent = k->rcvd = 0;
                in_flight++;
                ep_ctl(ep, EPOLL_CTL_ADD, k->fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, (uint64_t)i);
            }
        }
        if (in_flight > 0 && now >= next_scan) {
            for (long i = 0; i < C; i++) {
                cslot_t *k = &s[i];
                if (k->state != ST_NONE && since(now, k->t_start) > sec_ns(O.connect_timeout)) {
                    if (k->state == ST_CONNECTING) err_add(&cerr, ERR_LOCAL_TIMEOUT);
                    else err_add(&ioerr, ERR_LOCAL_TIMEOUT);
                    close(k->fd); k->fd = -1; k->state = ST_NONE; in_flight--; failed++;
                }
            }
            next_scan = now + SCAN_INTERVAL_NS;
        }
        if (in_flight > 0 && timeout > (int64_t)SCAN_INTERVAL_NS) timeout = (int64_t)SCAN_INTERVAL_NS;

        int n = ep_wait(ep, evs, MAX_EVENTS, timeout);
        for (int i = 0; i < n && !g_failed; i++) {
            long idx = (long)evs[i].data.u64;
            cslot_t *k = &s[idx];
            uint32_t ev = evs[i].events;
            if (k->state == ST_NONE) continue;
            if (k->state == ST_CONNECTING) {
                if (ev & (EPOLLERR | EPOLLHUP)) {
                    int err = so_error(k->fd);
                    err_add(&cerr, err ? err : ECONNRESET);
                    close(k->fd); k->fd = -1; k->state = ST_NONE; in_flight--; failed++;
                    continue;
                }
                if (!(ev & EPOLLOUT)) continue;
                hist_add(conn_h, now_ns() - k->t_start);
                k->state = ST_ACTIVE;
                build_request(k->msg, (uint64_t)idx, k->cycle);
            }
            /* send what is left of the request */
            int dead = 0;
            while (k->sent < len) {
                ssize_t w = send(k->fd, k->msg + k->sent, len - k->sent, MSG_NOSIGNAL);
                if (w > 0) { k->sent += (uint32_t)w; continue; }
                if (w < 0 && errno == EINTR) continue;
                if (w < 0 && errno == EAGAIN) break;
                err_add(&ioerr, w < 0 ? errno : ERR_OTHER);
                dead = 1;
                break;
            }
            /* read the echo (edge-triggered: until EAGAIN or complete) */
            while (!dead && k->rcvd < len) {
                size_t rem = len - k->rcvd;
                size_t want = rem + 1 < SCRATCH_SIZE ? rem + 1 : SCRATCH_SIZE;
                ssize_t r = recv(k->fd, g_scratch, want, 0);
                if (r < 0) {
                    if (errno == EAGAIN) break;
                    if (errno == EINTR) continue;
                    err_add(&ioerr, errno);
                    dead = 1;
                    break;
                }
                if (r == 0) { err_add(&ioerr, ERR_EARLY_EOF); dead = 1; break; }
                if ((size_t)r > rem) {
                    fail("churn: cycle %llu received %zd bytes with only %zu outstanding",
                         (unsigned long long)k->cycle, r, rem);
                    dead = 1;
                    break;
                }
                if (memcmp(g_scratch, k->msg + k->rcvd, (size_t)r) != 0) {
                    describe_mismatch("churn", "slot", idx, "cycle", k->cycle, k->msg + k->rcvd, g_scratch, (size_t)r, k->rcvd, len);
                    dead = 1;
                    break;
                }
                k->rcvd += (uint32_t)r;
                verified += (uint64_t)r;
            }
            if (dead) {
                close(k->fd); k->fd = -1; k->state = ST_NONE; in_flight--; failed++;
                continue;
            }
            if (k->rcvd < len) continue;
            /* one round trip done: close from the client side */
            if (rst) close_rst(k->fd);
            else close(k->fd);
            k->fd = -1;
            k->state = ST_NONE;
            k->next_start = 0;
            in_flight--;
            completed++;
            uint64_t t = now_ns();
            if (t >= ws && t < we) { win++; hist_add(lat, t - k->t_start); }
        }
    }
    cpuwin_end(&cw);
    uint64_t t_stop = now_ns();
    for (long i = 0; i < C; i++) if (s[i].fd >= 0) close(s[i].fd);
    if (!window_end) window_end = min_u64(t_stop, we);
    double window_s = window_end > ws ? ns_sec(window_end - ws) : 0;
    if (!g_failed && completed == 0) run_failed("no cycle completed");

    jobj("params");
    jparams_common();
    jint("connections", C);
    jint("size", O.size);
    jnum("duration_s", O.duration, 3);
    jnum("warmup_s", O.warmup, 3);
    jint("max_cycles", O.max_cycles);
    jstr("close", CLOSE_NAMES[O.close_mode]);
    jint("tcp_tw_reuse", g_tw_reuse);
    jend();
    jobj("results");
    juint("cycles", win);
    jnum("window_s", window_s, 3);
    jnum("cycles_per_s", window_s > 0 ? (double)win / window_s : NAN, 1);
    jlatency("latency", lat);
    jlatency("connect", conn_h);
    juint("started", started);
    juint("completed", completed);
    juint("failed", failed);
    jerrors("connect_errors", &cerr);
    jerrors("io_errors", &ioerr);
    juint("verified_bytes", verified);
    jend();
    jcpu("loadgen_cpu", &cw);
    jserver_window("server", &cw);
    hint("churn: %llu cycles in %.2f s = %.0f/s, %llu failed", (unsigned long long)win, window_s,
         window_s > 0 ? (double)win / window_s : 0.0, (unsigned long long)failed);
    close(ep);
    return 0;
}

/* ==================================================================== fanout */
/* Message (O.size bytes): 6 chars of sequence number and 10 chars of
 * CLOCK_MONOTONIC nanoseconds, both base-64 in a printable alphabet without
 * spaces, '/' or control characters (line servers such as connserver's chat
 * pass it through, even with a "<nick> " prefix), then a filler that depends
 * on the sequence number, then '\n'. A subscriber takes the last size-1 bytes
 * of each line as the message, so a relay may prefix lines.
 *
 * --websocket: every connection (subscribers, stalled ones, the publisher)
 * upgrades first; the publisher sends each message (all size bytes, '\n'
 * included) as one masked text frame, and a subscriber takes each text or
 * binary message it receives as one line (its trailing '\n' optional: a chat
 * strips it), so the same bytes are checked as without. */

static const char ALPHA[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_";
static signed char DEC[256];
static char *g_fill;            /* ALPHA repeated, 64 + size long */

static void fanout_init_codec(size_t size)
{
    memset(DEC, -1, sizeof DEC);
    for (int i = 0; i < 64; i++) DEC[(unsigned char)ALPHA[i]] = (signed char)i;
    g_fill = malloc(size + 64);
    if (!g_fill) { perror("malloc"); exit(3); }
    for (size_t i = 0; i < size + 64; i++) g_fill[i] = ALPHA[i & 63];
}

static void put64(char *p, int nchars, uint64_t v)
{
    for (int i = nchars - 1; i >= 0; i--) { p[i] = ALPHA[v & 63]; v >>= 6; }
}

static int get64(const unsigned char *p, int nchars, uint64_t *v)
{
    uint64_t x = 0;
    for (int i = 0; i < nchars; i++) {
        int d = DEC[p[i]];
        if (d < 0) return -1;
        x = (x << 6) | (uint64_t)d;
    }
    *v = x;
    return 0;
}

static void write_message(char *m, uint64_t seq, uint64_t ts)
{
    size_t s = (size_t)O.size;
    put64(m, 6, seq);
    put64(m + 6, 10, ts);
    memcpy(m + 16, g_fill + (seq & 63), s - 17);
    m[s - 1] = '\n';
}

/* --websocket: the same message (all size bytes) as one masked text frame, the mask moving with seq. */
static void write_ws_message(unsigned char *f, uint64_t seq, uint64_t ts)
{
    size_t s = (size_t)O.size, h = ws_header_len(s);
    f[0] = 0x81;   /* FIN, text: the message is printable ASCII */
    if (h == 2) f[1] = (unsigned char)(0x80 | s);
    else { f[1] = 0x80 | 126; f[2] = (unsigned char)(s >> 8); f[3] = (unsigned char)s; }
    uint32_t key = (uint32_t)(seq * 2654435761u) ^ 0x5bd1e995u;
    unsigned char mk[4] = {(unsigned char)key, (unsigned char)(key >> 8), (unsigned char)(key >> 16),
                           (unsigned char)(key >> 24)};
    memcpy(f + h, mk, 4);
    unsigned char *m = f + h + 4;
    write_message((char *)m, seq, ts);
    for (size_t i = 0; i < s; i++) m[i] ^= mk[i & 3];
}

typedef struct {
    int fd;
    uint8_t state, established, stalled, discard, registered, upgraded;
    uint32_t carry_len;
    char *carry;
    uint64_t t_conn, count, next, ooo, gaps, missing, other, overlong, bytes;
    uint64_t skip;              /* --websocket: payload bytes of an overlong frame still to pass over */
    uint64_t control;           /* --websocket: ping and pong frames received (not answered) */
    int ws_close;               /* --websocket: the close code of a close frame received (1005: none given) */
    /* stalled subscribers: what happened, seen without reading */
    int how;                    /* 0 none, 1 fin, 2 rst */
    uint64_t t_event;
    int rcvbuf;
} sub_t;

enum { TAG_SUB = 1, TAG_PUB = 2 };
#define TAG(t, i) (((uint64_t)(t) << 32) | (uint64_t)(i))

typedef struct {
    sub_t *subs;
    long M, K, total;
    size_t maxline;
    uint64_t built;             /* messages generated (sequence numbers used) */
    uint64_t t_pub, t_last_delivery;
    hist_t *lat;
    uint64_t delivered, corrupt;
    int publishing;
    long upgraded;              /* --websocket: subscribers (stalled ones too) that have their 101 */
} fan_t;

/* --websocket: a message the handler sends (the hello) as one masked text frame. */
static void ws_send_text(int fd, const char *text, size_t len, uint32_t key)
{
    unsigned char f[700];
    size_t h = ws_header_len(len);
    if (len + h + 4 > sizeof f) return;
    f[0] = 0x81;   /* FIN, text */
    if (h == 2) f[1] = (unsigned char)(0x80 | len);
    else { f[1] = 0x80 | 126; f[2] = (unsigned char)(len >> 8); f[3] = (unsigned char)len; }
    unsigned char mk[4] = {(unsigned char)key, (unsigned char)(key >> 8), (unsigned char)(key >> 16),
                           (unsigned char)(key >> 24)};
    memcpy(f + h, mk, 4);
    for (size_t i = 0; i < len; i++) f[h + 4 + i] = (unsigned char)text[i] ^ mk[i & 3];
    send_small(fd, (const char *)f, h + 4 + len);
}

/* --websocket: the length of the upgrade response at the start of p (through the blank line),
 * once it is complete and right (101, the expected accept key); 0 while it is incomplete, or
 * after a verification failure. What follows it is the server's first frames. */
static size_t ws_response(const char *p, size_t n, const char *who, long idx)
{
    const char *eoh = memmem(p, n, "\r\n\r\n", 4);
    if (!eoh) {
        if (n >= WS_HS_CAP - 1) fail("fanout: %s %ld: upgrade response over %u bytes", who, idx, WS_HS_CAP);
        return 0;
    }
    size_t hl = (size_t)(eoh + 4 - p);
    char hs[WS_HS_CAP];
    if (hl >= sizeof hs) { fail("fanout: %s %ld: upgrade response over %u bytes", who, idx, WS_HS_CAP); return 0; }
    memcpy(hs, p, hl);
    hs[hl] = 0;
    const char *wrong = ws_check_response(hs, hl);
    if (wrong) {
        char *eol = strstr(hs, "\r\n");
        if (eol) *eol = 0;
        fail("fanout: %s %ld: upgrade refused (%s): %.120s", who, idx, wrong, hs);
        return 0;
    }
    return hl;
}

static void fan_line(fan_t *F, sub_t *s, const unsigned char *line, size_t L, uint64_t t)
{
    size_t ms = (size_t)O.size - 1;
    if (L < ms) { s->other++; return; }
    const unsigned char *m = line + (L - ms);
    uint64_t seq, ts;
    if (get64(m, 6, &seq) || get64(m + 6, 10, &ts)) { s->other++; return; }
    int filler_ok = memcmp(m + 16, g_fill + (seq & 63), ms - 16) == 0;
    if (!filler_ok || seq >= F->built || ts > t) {
        if (!filler_ok && seq >= F->built) { s->other++; return; }
        F->corrupt++;
        fail("fanout: subscriber received a corrupt message (seq %llu, %s)", (unsigned long long)seq,
             !filler_ok ? "payload differs" : seq >= F->built ? "never published" : "timestamp in the future");
        return;
    }
    s->count++;
    if (seq == s->next) s->next++;
    else if (seq > s->next) { s->gaps++; s->missing += seq - s->next; s->next = seq + 1; }
    else s->ooo++;
    if (!s->stalled) {
        hist_add(F->lat, t - ts);
        F->delivered++;
        F->t_last_delivery = t;
    }
}

/* --websocket: the upgrade response, then unmasked server frames; every text or binary message
 * is one line. A partial response or frame stays in the carry; a frame longer than the longest
 * line taken (--size + 4096) is passed over and counted as overlong. A server frame that is
 * masked, fragmented or compressed (no extension was offered) is a verification failure. */
static void fan_frames(fan_t *F, sub_t *s, char *p, char *end, uint64_t t)
{
    long idx = (long)(s - F->subs);
    if (!s->upgraded) {
        size_t hl = ws_response(p, (size_t)(end - p), s->stalled ? "stalled subscriber" : "subscriber", idx);
        if (g_failed) return;
        if (!hl) {
            memcpy(s->carry, p, (size_t)(end - p));
            s->carry_len = (uint32_t)(end - p);
            return;
        }
        p += hl;
        s->upgraded = 1;
        F->upgraded++;
        if (g_hello_t[0]) {
            char hello[600];
            size_t n = format_hello(hello, sizeof hello, idx);
            ws_send_text(s->fd, hello, n, (uint32_t)idx * 2654435761u ^ 0x5bd1e995u);
        }
    }
    while (p < end) {
        if (s->skip) {
            size_t n = (size_t)(end - p) < s->skip ? (size_t)(end - p) : (size_t)s->skip;
            p += n;
            s->skip -= n;
            continue;
        }
        const unsigned char *u = (const unsigned char *)p;
        size_t avail = (size_t)(end - p), h = 2;
        if (avail < 2) break;
        uint64_t len = u[1] & 0x7f;
        if (len == 126) {
            if (avail < 4) break;
            len = (uint64_t)u[2] << 8 | u[3];
            h = 4;
        } else if (len == 127) {
            if (avail < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | u[2 + i];
            h = 10;
        }
        int op = u[0] & 0x0f;
        if (u[1] & 0x80 || u[0] & 0x70 || !(u[0] & 0x80) || op == 0) {
            fail("fanout: subscriber %ld: a server frame %s (first bytes 0x%02x 0x%02x)", idx,
                 u[1] & 0x80 ? "masked" : u[0] & 0x70 ? "with RSV bits set" : "fragmented (not supported)", u[0], u[1]);
            return;
        }
        if (op != 1 && op != 2 && op != 8 && op != 9 && op != 10) {
            fail("fanout: subscriber %ld: a server frame with opcode %d", idx, op);
            return;
        }
        if (len > F->maxline) { s->overlong++; s->skip = len; p += h; continue; }
        if (avail - h < len) break;
        const unsigned char *m = u + h;
        if (op == 1 || op == 2) fan_line(F, s, m, len && m[len - 1] == '\n' ? len - 1 : len, t);
        else if (op == 8) s->ws_close = len >= 2 ? (int)(m[0] << 8 | m[1]) : 1005;
        else s->control++;
        p += h + len;
    }
    size_t rest = (size_t)(end - p);
    if (rest) memcpy(s->carry, p, rest);
    s->carry_len = (uint32_t)rest;
}

/* Read once from a subscriber and handle every complete line (or frame). Returns -1 when closed. */
static int fan_read(fan_t *F, sub_t *s, int *err_out)
{
    char *buf = (char *)g_scratch;
    uint32_t carry = s->carry_len;
    if (carry) memcpy(buf, s->carry, carry);
    ssize_t r = recv(s->fd, buf + carry, SCRATCH_SIZE - carry, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) return 0;
        *err_out = errno;
        return -1;
    }
    if (r == 0) { *err_out = 0; return -1; }
    s->bytes += (uint64_t)r;
    uint64_t t = now_ns();
    char *p = buf, *end = buf + carry + (size_t)r;
    if (g_ws) { fan_frames(F, s, p, end, t); return 0; }
    if (s->discard) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) { s->carry_len = 0; return 0; }
        p = nl + 1;
        s->discard = 0;
    }
    for (;;) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) break;
        fan_line(F, s, (const unsigned char *)p, (size_t)(nl - p), t);
        p = nl + 1;
    }
    size_t rest = (size_t)(end - p);
    if (rest > F->maxline) { s->overlong++; s->discard = 1; s->carry_len = 0; }
    else { if (rest) memcpy(s->carry, p, rest); s->carry_len = (uint32_t)rest; }
    return 0;
}

static const char *tcp_state_name(int st)
{
    static const char *const names[] = {"?", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
                                        "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING"};
    return st >= 0 && st <= 11 ? names[st] : "?";
}

static int run_fanout(void)
{
    fan_t F;
    memset(&F, 0, sizeof F);
    F.M = O.subscribers;
    F.K = O.stalled;
    F.total = F.M + F.K;
    F.maxline = (size_t)O.size + 4096;
    size_t carry_cap = F.maxline + 16;   /* a line, or a frame of one and its header */
    F.lat = hist_new();
    F.subs = calloc((size_t)(F.total ? F.total : 1), sizeof *F.subs);
    char *carries = malloc((size_t)(F.total ? F.total : 1) * carry_cap);
    if (!F.subs || !carries) { perror("malloc"); exit(3); }
    for (long i = 0; i < F.total; i++) {
        F.subs[i].fd = -1;
        F.subs[i].carry = carries + (size_t)i * carry_cap;
        F.subs[i].stalled = i >= F.M;
    }
    fanout_init_codec((size_t)O.size);
    hist_t *conn_h = hist_new();
    errtab_t cerr, suberr;
    memset(&cerr, 0, sizeof cerr);
    memset(&suberr, 0, sizeof suberr);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) { perror("epoll_create1"); exit(3); }
    struct epoll_event evs[MAX_EVENTS];
    cpuwin_t cw;
    memset(&cw, 0, sizeof cw);
    cpuwin_start(&cw);

    /* publisher (--websocket: hs holds its upgrade response while it arrives) */
    struct {
        int fd, state, wout, closed, err, upgraded;
        uint64_t t_conn, bytes_rx, bytes_tx;
        char *buf;
        size_t cap, off, len, hslen;
        char hs[WS_HS_CAP];
    } P;
    memset(&P, 0, sizeof P);
    P.fd = -1;
    size_t wire = (size_t)O.size + (g_ws ? ws_header_len((size_t)O.size) + 4 : 0);   /* one message as sent */
    size_t batch_max = (size_t)(65536 / O.size);
    if (batch_max < 1) batch_max = 1;
    P.cap = batch_max * wire;
    P.buf = malloc(P.cap);
    if (!P.buf) { perror("malloc"); exit(3); }

    uint64_t t0 = now_ns(), t_last_open = t0, t_ready = 0, t_pub_end = 0, drain_end = 0, stall_end = 0;
    uint64_t next_check = 0, stall_last_rx = 0;
    long opened = 0, connecting = 0, sub_established = 0, stall_established = 0, sub_closed = 0;
    int phase = 0;              /* 0 connect, 1 warmup, 2 publish, 3 drain, 4 stalled check, 5 done */
    int drain_timed_out = 0, pub_opened = 0;
    char hello[600];

    while (phase < 5) {
        uint64_t now = now_ns();
        if (g_failed) break;
        if (g_stop && phase < 3) { phase = 3; t_pub_end = now; drain_end = now; }
        int64_t timeout = (int64_t)SCAN_INTERVAL_NS;

        if (phase == 0) {
            int all = opened == F.total && pub_opened && connecting == 0;
            /* --websocket: and every connection has its 101 (a subscriber subscribes once upgraded) */
            if (g_ws) all = all && P.upgraded && F.upgraded == sub_established + stall_established;
            int late = opened == F.total && pub_opened && since(now, t_last_open) >= sec_ns(O.connect_timeout);
            if (all || late) {
                if (P.state != ST_ACTIVE) { run_failed("publisher could not connect"); break; }
                if (g_ws && !P.upgraded) { run_failed("publisher: no upgrade response"); break; }
                t_ready = now;
                phase = 1;
                hint("fanout: %ld/%ld subscribers and %ld/%ld stalled connected%s; publishing in %.2f s",
                     sub_established, F.M, stall_established, F.K, g_ws ? " and upgraded" : "", O.warmup);
            }
        }
        if (phase == 1 && now >= t_ready + sec_ns(O.warmup)) {
            phase = 2;
            F.t_pub = now;
            F.publishing = 1;
            if (!P.wout) { ep_ctl(ep, EPOLL_CTL_MOD, P.fd, EPOLLIN | EPOLLOUT, TAG(TAG_PUB, 0)); P.wout = 1; }
        }
        if (phase == 2) {
            int count_done = O.messages > 0 && F.built >= (uint64_t)O.messages && P.off == P.len;
            if (now >= F.t_pub + sec_ns(O.duration) || count_done || P.closed) {
                phase = 3;
                F.publishing = 0;
                t_pub_end = now;
                drain_end = now + sec_ns(O.drain);
            }
        }
        if (phase == 3) {
            int done = now >= drain_end || g_stop;
            if (!done && now >= next_check) {
                done = 1;
                for (long i = 0; i < F.M && done; i++)
                    if (F.subs[i].state == ST_ACTIVE && F.subs[i].next < F.built) done = 0;
                next_check = now + 10000000;
            }
            if (done) {
                drain_timed_out = now >= drain_end;
                for (long i = 0; i < F.M; i++)
                    if (F.subs[i].state == ST_ACTIVE && F.subs[i].next < F.built) { drain_timed_out = 1; break; }
                cpuwin_end(&cw);
                phase = 4;
                double budget = O.drain > 1.0 ? O.drain : 1.0;
                stall_end = now + sec_ns(budget);
                stall_last_rx = now;
                /* look at the stalled ones without reading, then start reading them */
                for (long i = F.M; i < F.total; i++) {
                    sub_t *s = &F.subs[i];
                    if (s->state != ST_ACTIVE) continue;
                    struct tcp_info ti;
                    socklen_t tl = sizeof ti;
                    memset(&ti, 0, sizeof ti);
                    if (getsockopt(s->fd, IPPROTO_TCP, TCP_INFO, &ti, &tl) == 0 && !s->how) {
                        if (ti.tcpi_state == 8) { s->how = 1; s->t_event = now; }        /* CLOSE_WAIT: FIN arrived */
                        else if (ti.tcpi_state == 7) { s->how = 2; s->t_event = now; }   /* CLOSE */
                    }
                    s->ooo = (uint64_t)ti.tcpi_state;  /* reused below as the state at the end */
                    ep_ctl(ep, s->registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s->fd, EPOLLIN, TAG(TAG_SUB, i));
                    s->registered = 1;
                }
            }
        }
        if (phase == 4) {
            int open = 0;
            for (long i = F.M; i < F.total; i++) if (F.subs[i].state == ST_ACTIVE) open++;
            /* done when every stalled one is closed, or nothing came for 300 ms, or at the budget */
            if (!open || now >= stall_end || since(now, stall_last_rx) > 300000000ull || g_stop) { phase = 5; break; }
        }

        /* open: subscribers, then stalled subscribers, then the publisher */
        if (phase == 0 && (opened < F.total || !pub_opened)) {
            long target = connect_target(now - t0, F.total + 1);
            for (int b = 0; opened + pub_opened < target && b < OPEN_BATCH; b++) {
                int err;
                if (opened < F.total) {
                    sub_t *s = &F.subs[opened];
                    s->t_conn = now_ns();
                    s->fd = open_socket(&g_addr, g_addrlen, s->stalled ? 1 : 0, &err);
                    if (s->fd < 0) { err_add(&cerr, err); s->state = ST_FAILED; }
                    else { s->state = ST_CONNECTING; connecting++; ep_ctl(ep, EPOLL_CTL_ADD, s->fd, EPOLLOUT, TAG(TAG_SUB, opened)); }
                    opened++;
                    t_last_open = s->t_conn;
                } else {
                    P.t_conn = now_ns();
                    P.fd = open_socket(&g_pub_addr, g_addrlen, 0, &err);
                    pub_opened = 1;
                    t_last_open = P.t_conn;
                    if (P.fd < 0) { err_add(&cerr, err); P.state = ST_FAILED; P.err = err; }
                    else { P.state = ST_CONNECTING; connecting++; ep_ctl(ep, EPOLL_CTL_ADD, P.fd, EPOLLOUT, TAG(TAG_PUB, 0)); }
                }
            }
            if (opened + pub_opened < target) timeout = 0;
            else if (opened + pub_opened < F.total + 1) {
                uint64_t next = t0 + (uint64_t)((double)(opened + pub_opened) / O.connect_rate * 1e9);
                int64_t d = next > now ? (int64_t)(next - now) : 0;
                if (d < timeout) timeout = d;
            }
        }
        if (phase == 0 && connecting > 0) {
            for (long i = 0; i < opened; i++) {
                sub_t *s = &F.subs[i];
                if (s->state == ST_CONNECTING && since(now, s->t_conn) > sec_ns(O.connect_timeout)) {
                    close(s->fd); s->fd = -1; s->state = ST_FAILED; connecting--;
                    err_add(&cerr, ERR_LOCAL_TIMEOUT);
                }
            }
            if (P.state == ST_CONNECTING && since(now, P.t_conn) > sec_ns(O.connect_timeout)) {
                close(P.fd); P.fd = -1; P.state = ST_FAILED; connecting--; P.err = ERR_LOCAL_TIMEOUT;
                err_add(&cerr, ERR_LOCAL_TIMEOUT);
            }
        }

        /* publish what is due */
        if (phase == 2 && P.state == ST_ACTIVE) {
            for (;;) {
                if (P.off < P.len) {
                    ssize_t w = send(P.fd, P.buf + P.off, P.len - P.off, MSG_NOSIGNAL);
                    if (w > 0) { P.off += (size_t)w; P.bytes_tx += (uint64_t)w; continue; }
                    if (w < 0 && errno == EINTR) continue;
                    if (w < 0 && errno == EAGAIN) {
                        if (!P.wout) { ep_ctl(ep, EPOLL_CTL_MOD, P.fd, EPOLLIN | EPOLLOUT, TAG(TAG_PUB, 0)); P.wout = 1; }
                        timeout = (int64_t)SCAN_INTERVAL_NS;
                        break;
                    }
                    P.closed = 1; P.err = w < 0 ? errno : ERR_OTHER;
                    break;
                }
                uint64_t t = now_ns();
                if (t >= F.t_pub + sec_ns(O.duration)) break;
                uint64_t due = batch_max;
                if (O.messages > 0 && (uint64_t)O.messages - F.built < due) due = (uint64_t)O.messages - F.built;
                if (O.rate > 0) {
                    uint64_t target = (uint64_t)(ns_sec(t - F.t_pub) * O.rate) + 1;
                    uint64_t d = target > F.built ? target - F.built : 0;
                    if (d < due) due = d;
                    if (!due) {
                        uint64_t next = F.t_pub + (uint64_t)((double)F.built / O.rate * 1e9);
                        int64_t wait = next > t ? (int64_t)(next - t) : 0;
                        if (wait < timeout) timeout = wait;
                        if (P.wout) { ep_ctl(ep, EPOLL_CTL_MOD, P.fd, EPOLLIN, TAG(TAG_PUB, 0)); P.wout = 0; }
                        break;
                    }
                }
                if (!due) break;
                for (uint64_t j = 0; j < due; j++) {
                    if (g_ws) write_ws_message((unsigned char *)P.buf + j * wire, F.built + j, t);
                    else write_message(P.buf + j * wire, F.built + j, t);
                }
                F.built += due;
                P.off = 0;
                P.len = (size_t)due * wire;
                if (O.rate <= 0) {   /* as fast as possible: write now, then again when writable */
                    ssize_t w = send(P.fd, P.buf, P.len, MSG_NOSIGNAL);
                    if (w > 0) { P.off = (size_t)w; P.bytes_tx += (uint64_t)w; }
                    else if (w < 0 && errno != EAGAIN && errno != EINTR) { P.closed = 1; P.err = errno; }
                    if (!P.wout && !P.closed) { ep_ctl(ep, EPOLL_CTL_MOD, P.fd, EPOLLIN | EPOLLOUT, TAG(TAG_PUB, 0)); P.wout = 1; }
                    timeout = P.off < P.len ? (int64_t)SCAN_INTERVAL_NS : 0;
                    break;
                }
            }
            uint64_t pend = F.t_pub + sec_ns(O.duration);
            int64_t left = pend > now ? (int64_t)(pend - now) : 0;
            if (left < timeout) timeout = left;
        }
        if (phase == 1) {
            uint64_t go = t_ready + sec_ns(O.warmup);
            timeout = go > now ? (int64_t)(go - now) : 0;
        }
        if (phase == 3 && timeout > 10000000) timeout = 10000000;
        if (phase == 4) {
            int64_t left = stall_end > now ? (int64_t)(stall_end - now) : 0;
            if (left < timeout) timeout = left;
        }

        int n = ep_wait(ep, evs, MAX_EVENTS, timeout);
        for (int i = 0; i < n && !g_failed; i++) {
            uint64_t tag = evs[i].data.u64 >> 32;
            long idx = (long)(evs[i].data.u64 & 0xffffffffu);
            uint32_t ev = evs[i].events;
            if (tag == TAG_PUB) {
                if (P.state == ST_CONNECTING) {
                    int err = so_error(P.fd);
                    connecting--;
                    if (err) { close(P.fd); P.fd = -1; P.state = ST_FAILED; P.err = err; err_add(&cerr, err); continue; }
                    P.state = ST_ACTIVE;
                    hist_add(conn_h, now_ns() - P.t_conn);
                    if (g_ws) send_small(P.fd, WS_UPGRADE, sizeof WS_UPGRADE - 1);
                    else if (g_pub_hello_len) send_small(P.fd, g_pub_hello, g_pub_hello_len);
                    ep_ctl(ep, EPOLL_CTL_MOD, P.fd, EPOLLIN, TAG(TAG_PUB, 0));
                    P.wout = 0;
                    continue;
                }
                if (P.state != ST_ACTIVE) continue;
                if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) {   /* whatever the server says to the publisher */
                    ssize_t r = recv(P.fd, g_scratch, SCRATCH_SIZE, 0);
                    if (r > 0) {
                        P.bytes_rx += (uint64_t)r;
                        if (g_ws && !P.upgraded) {   /* its 101; whatever follows is only counted */
                            size_t take = (size_t)r < sizeof P.hs - P.hslen ? (size_t)r : sizeof P.hs - P.hslen;
                            memcpy(P.hs + P.hslen, g_scratch, take);
                            P.hslen += take;
                            if (ws_response(P.hs, P.hslen, "publisher", 0)) {
                                P.upgraded = 1;
                                if (g_pub_hello_len) ws_send_text(P.fd, g_pub_hello, g_pub_hello_len, 0x5bd1e995u);
                            }
                        }
                    } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                        P.err = r == 0 ? 0 : errno;
                        P.closed = 1;
                        ep_ctl(ep, EPOLL_CTL_DEL, P.fd, 0, 0);
                        P.state = ST_CLOSED;
                    }
                }
                continue;   /* writable: handled by the publish step at the top of the loop */
            }
            sub_t *s = &F.subs[idx];
            if (s->state == ST_CONNECTING) {
                int err = so_error(s->fd);
                connecting--;
                if (err) { close(s->fd); s->fd = -1; s->state = ST_FAILED; err_add(&cerr, err); continue; }
                s->state = ST_ACTIVE;
                s->established = 1;
                hist_add(conn_h, now_ns() - s->t_conn);
                if (g_ws) send_small(s->fd, WS_UPGRADE, sizeof WS_UPGRADE - 1);   /* the hello follows its 101 */
                else if (g_hello_t[0]) { size_t hl = format_hello(hello, sizeof hello, idx); send_small(s->fd, hello, hl); }
                if (s->stalled) {
                    stall_established++;
                    int v = 0;
                    socklen_t vl = sizeof v;
                    getsockopt(s->fd, SOL_SOCKET, SO_RCVBUF, &v, &vl);
                    s->rcvbuf = v;
                    /* never read: watch only for the server closing (FIN) or resetting;
                       --websocket: once its 101 is in (the hello sent after it) */
                    ep_ctl(ep, EPOLL_CTL_MOD, s->fd, g_ws ? EPOLLIN : EPOLLRDHUP | EPOLLET, TAG(TAG_SUB, idx));
                    s->registered = 1;
                } else {
                    sub_established++;
                    ep_ctl(ep, EPOLL_CTL_MOD, s->fd, EPOLLIN, TAG(TAG_SUB, idx));
                }
                continue;
            }
            if (s->state != ST_ACTIVE) continue;
            if (s->stalled && phase < 4 && (s->upgraded || !g_ws)) {
                if (!s->how) {
                    s->how = (ev & (EPOLLERR | EPOLLHUP)) ? 2 : 1;
                    s->t_event = now_ns();
                }
                ep_ctl(ep, EPOLL_CTL_DEL, s->fd, 0, 0);
                s->registered = 0;
                continue;
            }
            int err = 0;
            if (s->stalled) stall_last_rx = now_ns();
            if (fan_read(&F, s, &err) < 0) {
                close(s->fd); s->fd = -1; s->state = ST_CLOSED;
                if (s->stalled) {   /* 3: EOF after reading what was queued */
                    if (!s->how) { s->how = err ? 2 : phase < 4 ? 1 : 3; s->t_event = now_ns(); }
                } else {
                    sub_closed++;
                    if (err) err_add(&suberr, err);
                }
            } else if (s->stalled && phase < 4 && s->upgraded) {
                /* --websocket: upgraded; from now on only watch for the server closing it */
                ep_ctl(ep, EPOLL_CTL_MOD, s->fd, EPOLLRDHUP | EPOLLET, TAG(TAG_SUB, idx));
            }
        }
    }
    cpuwin_end(&cw);
    if (P.fd >= 0) close(P.fd);
    for (long i = 0; i < F.total; i++) if (F.subs[i].fd >= 0) close(F.subs[i].fd);
    if (!g_failed && !g_run_failed && sub_established == 0 && F.M > 0) run_failed("no subscriber could connect");

    uint64_t mn = UINT64_MAX, mx = 0, gaps = 0, missing = 0, ooo = 0, other = 0, overlong = 0, control = 0;
    long counted = 0, upgraded = 0, closes = 0, stall_upgraded = 0;
    for (long i = 0; i < F.total; i++) {
        if (F.subs[i].stalled) stall_upgraded += F.subs[i].upgraded;
        else { upgraded += F.subs[i].upgraded; closes += F.subs[i].ws_close != 0; control += F.subs[i].control; }
    }
    for (long i = 0; i < F.M; i++) {
        sub_t *s = &F.subs[i];
        if (!s->established) continue;
        counted++;
        if (s->count < mn) mn = s->count;
        if (s->count > mx) mx = s->count;
        gaps += s->gaps; missing += s->missing; ooo += s->ooo; other += s->other; overlong += s->overlong;
    }
    double pub_s = t_pub_end > F.t_pub && F.t_pub ? ns_sec(t_pub_end - F.t_pub) : 0;
    double deliv_s = F.t_last_delivery > F.t_pub && F.t_pub ? ns_sec(F.t_last_delivery - F.t_pub) : 0;
    uint64_t expected = F.built * (uint64_t)counted;
    uint64_t tail_missing = 0;
    for (long i = 0; i < F.M; i++)
        if (F.subs[i].established && F.subs[i].next < F.built) tail_missing += F.built - F.subs[i].next;

    jobj("params");
    jparams_common();
    jint("publisher_port", O.publisher_port);
    jint("subscribers", F.M);
    jint("stalled", F.K);
    jint("size", O.size);
    jnum("rate", O.rate, 1);
    jnum("duration_s", O.duration, 3);
    jnum("warmup_s", O.warmup, 3);
    jnum("drain_s", O.drain, 3);
    jint("messages", O.messages);
    jstr("hello", O.hello);
    jstr("publisher_hello", O.publisher_hello);
    jend();
    jobj("results");
    juint("published", F.built);
    jnum("publish_s", pub_s, 3);
    jnum("published_per_s", pub_s > 0 ? (double)F.built / pub_s : NAN, 1);
    juint("delivered", F.delivered);
    juint("expected", expected);
    jnum("delivered_per_s", deliv_s > 0 ? (double)F.delivered / deliv_s : NAN, 1);
    jlatency("latency", F.lat);
    jobj("subscribers");
    jint("established", sub_established);
    if (g_ws) { jint("upgraded", upgraded); jint("ws_close_frames", closes); juint("control_frames", control); }
    jint("closed_by_server", sub_closed);
    jerrors("close_errors", &suberr);
    if (counted) { juint("min_count", mn); juint("max_count", mx); }
    else { jnull("min_count"); jnull("max_count"); }
    jend();
    juint("lost", expected > F.delivered ? expected - F.delivered : 0);
    juint("gaps", gaps);
    juint("skipped", missing);
    juint("undelivered_tail", tail_missing);
    juint("out_of_order", ooo);
    juint("corrupt", F.corrupt);
    juint("other_lines", other);
    juint("overlong_lines", overlong);
    jbool("drain_timed_out", drain_timed_out);
    jerrors("connect_errors", &cerr);
    jobj("publisher");
    jbool("connected", P.state == ST_ACTIVE || P.state == ST_CLOSED);
    if (g_ws) jbool("upgraded", P.upgraded);
    jbool("closed_by_server", P.closed);
    if (P.closed || P.state == ST_FAILED) jstr("error", P.err ? errname(P.err) : "eof");
    juint("bytes_sent", P.bytes_tx);
    juint("bytes_received", P.bytes_rx);
    jend();
    long stall_disc = 0;
    for (long i = F.M; i < F.total; i++) if (F.subs[i].how) stall_disc++;
    jobj("stalled");
    jint("count", F.K);
    jint("established", stall_established);
    if (g_ws) jint("upgraded", stall_upgraded);
    jint("disconnected", stall_disc);
    jarr("each");
    for (long i = F.M; i < F.total && i < F.M + 32; i++) {
        sub_t *s = &F.subs[i];
        static const char *const hows[] = {"none", "fin", "reset", "eof_after_drain"};
        jobj(NULL);
        jbool("established", s->established);
        jint("rcvbuf", s->rcvbuf);
        jbool("disconnected", s->how != 0);
        jstr("how", hows[s->how]);
        if (s->how && s->how != 3 && F.t_pub && s->t_event >= F.t_pub) jnum("after_s", ns_sec(s->t_event - F.t_pub), 3);
        else jnull("after_s");
        jstr("tcp_state_at_end", s->established ? tcp_state_name((int)s->ooo) : "?");
        juint("bytes_drained", s->bytes);
        juint("messages_drained", s->count);
        if (g_ws && s->ws_close) jint("ws_close", s->ws_close);
        else if (g_ws) jnull("ws_close");
        jend();
    }
    jend_arr();
    jend();
    jend();
    jcpu("loadgen_cpu", &cw);
    jserver_window("server", &cw);
    hint("fanout: published %llu, delivered %llu of %llu, stalled disconnected %ld/%ld",
         (unsigned long long)F.built, (unsigned long long)F.delivered, (unsigned long long)expected, stall_disc,
         F.K);
    close(ep);
    return 0;
}

/* ===================================================================== paced */
/* N connections, each sending one S-byte message every 1/R seconds, with the
 * N schedules spread evenly over the period (connection i is due at
 * start + i/(N*R) + k/R), not in lockstep. Open loop: a message is sent when
 * due whether or not the previous reply is back (echo keeps the order), and
 * its latency runs from when it was *due*, so a server that falls behind shows
 * it in full instead of being offered less work (no coordinated omission).
 * Before the schedule starts, every connection does one round trip, so the
 * window sees a server that has accepted and served everyone. */

#define PACED_RING 16           /* messages one connection may have due and unanswered */
#define PACED_BATCH 4096        /* due messages sent per loop turn, so replies keep flowing */
#define LATE_NS 1000000000ull   /* a reply later than this counts as late */

typedef struct {
    int fd;
    uint8_t state, wout, established;
    uint32_t tx_off, rx_off;    /* bytes of message tx sent, of message rx received */
    uint64_t due, tx, rx;       /* messages due (scheduled), fully sent, fully answered */
    uint64_t t_conn;
    uint64_t sched[PACED_RING]; /* due time of message seq, at [seq % PACED_RING] */
    uint64_t sent[PACED_RING];  /* when its last byte went to the kernel */
    unsigned char *msg;         /* message tx, being sent */
} pconn_t;

typedef struct {
    int ep;
    size_t len;
    uint64_t ws, we;            /* the window: messages due in [ws, we) are counted */
    long active, ready, waiting;
    uint64_t outstanding;       /* sum of due - rx over open connections */
    uint64_t due_w, answered_w, late_w, unanswered_w, skipped_w, unconnected_w, verified;
    hist_t *lat, *lat_sent, *lag, *first;
    errtab_t ioerr;
    uint64_t closed_eof, closed_err;
    unsigned char *expect;
    /* --slice: the window cut into equal slices, each with its own latency and server CPU */
    long nslices;
    uint64_t slice_ns;
    hist_t **slice_lat;
    uint64_t *slice_late;
} paced_t;

#define MAX_SLICES 120

static int paced_in_window(const paced_t *P, uint64_t t) { return t >= P->ws && t < P->we; }

/* A closed connection's unanswered messages that were due in the window count as unanswered. */
static void paced_close(paced_t *P, pconn_t *k, int how_err)
{
    for (uint64_t q = k->rx; q < k->due; q++)
        if (paced_in_window(P, k->sched[q % PACED_RING])) P->unanswered_w++;
    P->outstanding -= k->due - k->rx;
    if (k->rx == 0 && k->state == ST_ACTIVE) P->waiting--;
    if (k->fd >= 0) close(k->fd);
    k->fd = -1;
    if (k->state == ST_ACTIVE) P->active--;
    k->state = ST_CLOSED;
    if (how_err == 0) P->closed_eof++;
    else { P->closed_err++; err_add(&P->ioerr, how_err); }
}

static void paced_send(paced_t *P, pconn_t *k, long idx)
{
    while (k->tx < k->due) {
        if (k->tx_off == 0) {
            build_request(k->msg, (uint64_t)idx, k->tx);
            if (k->tx > 0) hist_add(P->lag, since(now_ns(), k->sched[k->tx % PACED_RING]));
        }
        ssize_t n = send(k->fd, k->msg + k->tx_off, P->len - k->tx_off, MSG_NOSIGNAL);
        if (n > 0) {
            k->tx_off += (uint32_t)n;
            if (k->tx_off == P->len) { k->sent[k->tx % PACED_RING] = now_ns(); k->tx++; k->tx_off = 0; }
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) {
            if (!k->wout) { ep_ctl(P->ep, EPOLL_CTL_MOD, k->fd, EPOLLIN | EPOLLOUT, (uint64_t)idx); k->wout = 1; }
            return;
        }
        paced_close(P, k, n < 0 ? errno : ERR_OTHER);
        return;
    }
    if (k->wout) { ep_ctl(P->ep, EPOLL_CTL_MOD, k->fd, EPOLLIN, (uint64_t)idx); k->wout = 0; }
}

static void paced_read(paced_t *P, pconn_t *k, long idx)
{
    ssize_t r = recv(k->fd, g_scratch, SCRATCH_SIZE, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        paced_close(P, k, errno);
        return;
    }
    if (r == 0) { paced_close(P, k, 0); return; }
    size_t p = 0;
    while (p < (size_t)r) {
        /* only what was sent may come back: whole messages before tx, tx_off bytes of tx */
        size_t allowed = k->rx < k->tx ? P->len - k->rx_off : (k->rx == k->tx ? k->tx_off - k->rx_off : 0);
        size_t chunk = (size_t)r - p < P->len - k->rx_off ? (size_t)r - p : P->len - k->rx_off;
        if (chunk > allowed) {
            fail("paced: connection %ld received %zu bytes with only %zu outstanding (message %llu)", idx,
                 (size_t)r - p, allowed, (unsigned long long)k->rx);
            return;
        }
        build_request(P->expect, (uint64_t)idx, k->rx);
        if (memcmp(g_scratch + p, P->expect + k->rx_off, chunk) != 0) {
            describe_mismatch("paced", "connection", idx, "message", k->rx, P->expect + k->rx_off, g_scratch + p,
                              chunk, k->rx_off, P->len);
            return;
        }
        p += chunk;
        k->rx_off += (uint32_t)chunk;
        P->verified += chunk;
        if (k->rx_off < P->len) continue;
        uint64_t t = now_ns(), due = k->sched[k->rx % PACED_RING];
        if (k->rx == 0) {
            hist_add(P->first, t - k->t_conn);
            P->ready++;
            P->waiting--;
        } else if (paced_in_window(P, due)) {
            uint64_t lat = since(t, due);
            hist_add(P->lat, lat);
            hist_add(P->lat_sent, since(t, k->sent[k->rx % PACED_RING]));
            P->answered_w++;
            if (lat > LATE_NS) P->late_w++;
            if (P->nslices) {
                long si = (long)((due - P->ws) / P->slice_ns);
                if (si >= P->nslices) si = P->nslices - 1;
                hist_add(P->slice_lat[si], lat);
                if (lat > LATE_NS) P->slice_late[si]++;
            }
        }
        k->rx++;
        k->rx_off = 0;
        P->outstanding--;
    }
}

static int run_paced(void)
{
    long N = O.connections;
    paced_t P;
    memset(&P, 0, sizeof P);
    P.len = (size_t)O.size + (g_framed ? 4 : 0);
    pconn_t *c = calloc((size_t)N, sizeof *c);
    unsigned char *arena = malloc((size_t)N * P.len);
    P.expect = malloc(P.len);
    if (!c || !arena || !P.expect) { perror("malloc"); exit(3); }
    P.lat = hist_new();
    P.lat_sent = hist_new();
    P.lag = hist_new();
    P.first = hist_new();
    hist_t *conn_h = hist_new();
    errtab_t cerr;
    memset(&cerr, 0, sizeof cerr);
    P.ep = epoll_create1(EPOLL_CLOEXEC);
    if (P.ep < 0) { perror("epoll_create1"); exit(3); }
    for (long i = 0; i < N; i++) { c[i].fd = -1; c[i].msg = arena + (size_t)i * P.len; }

    /* the default 50 us timer slack would add itself to every send's lateness */
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
    struct epoll_event evs[MAX_EVENTS];
    cpuwin_t cw;
    memset(&cw, 0, sizeof cw);
    uint64_t t0 = now_ns(), t_start = 0, next_scan = t0 + SCAN_INTERVAL_NS, drain_end = 0;
    if (O.server_pid > 0) g_srv.next_tick = t0 + SRV_TICK_NS;
    P.ws = P.we = UINT64_MAX;
    if (O.slice > 0) {
        P.nslices = (long)ceil(O.duration / O.slice - 1e-9);
        if (P.nslices > MAX_SLICES) P.nslices = MAX_SLICES;
        if (P.nslices < 1) P.nslices = 1;
        P.slice_ns = (uint64_t)ceil(O.duration * 1e9 / (double)P.nslices);
        P.slice_lat = calloc((size_t)P.nslices, sizeof *P.slice_lat);
        P.slice_late = calloc((size_t)P.nslices, sizeof *P.slice_late);
        if (!P.slice_lat || !P.slice_late) { perror("calloc"); exit(3); }
        for (long i = 0; i < P.nslices; i++) P.slice_lat[i] = hist_new();
    }
    srvsnap_t slice_srv[MAX_SLICES + 1];
    uint64_t slice_t[MAX_SLICES + 1];
    long next_cut = 0;                            /* the next slice boundary to snapshot the server at */
    double gap_ns = 1e9 / (O.rate * (double)N);   /* between consecutive due messages, all connections */
    uint64_t m = 0;                               /* the next message due, counted over all connections */
    long opened = 0, connecting = 0, established = 0;
    int scheduling = 0, draining = 0, drain_timed_out = 0, start_timed_out = 0;

    for (;;) {
        uint64_t now = now_ns();
        if (g_failed) break;
        if (g_stop && !draining) { draining = 1; drain_end = now; }
        if (!t_start) {
            int all_in = opened == N && connecting == 0 && P.waiting == 0;
            if (all_in || now - t0 >= sec_ns(O.barrier_timeout)) {
                t_start = now;
                start_timed_out = !all_in;
                P.ws = t_start + sec_ns(O.warmup);
                P.we = P.ws + sec_ns(O.duration);
                scheduling = 1;
                hint("paced: %ld of %ld connections served once in %.2f s; %.0f messages/s for %.1f s + %.1f s warm-up",
                     P.ready, N, ns_sec(now - t0), O.rate * (double)N, O.duration, O.warmup);
            }
        }
        if (scheduling && !cw.started && now >= P.ws) cpuwin_start(&cw);
        while (scheduling && next_cut <= P.nslices && P.nslices && now >= P.ws + (uint64_t)next_cut * P.slice_ns) {
            slice_srv[next_cut] = srv_snap();
            slice_t[next_cut++] = now;
        }
        srv_tick(now);
        uint64_t next_due = UINT64_MAX;
        if (scheduling) {
            int b = 0;
            for (;;) {
                uint64_t due = t_start + (uint64_t)((double)m * gap_ns);
                if (due >= P.we) { scheduling = 0; break; }
                if (due > now) { next_due = due; break; }
                if (b++ >= PACED_BATCH) { next_due = now; break; }
                long idx = (long)(m % (uint64_t)N);
                pconn_t *k = &c[idx];
                int counted = paced_in_window(&P, due);
                m++;
                if (k->state != ST_ACTIVE) { if (counted) P.unconnected_w++; continue; }
                if (k->due - k->rx >= PACED_RING) { if (counted) P.skipped_w++; continue; }
                k->sched[k->due % PACED_RING] = due;
                k->due++;
                P.outstanding++;
                if (counted) P.due_w++;
                if (!k->wout) paced_send(&P, k, idx);
            }
            if (!scheduling) {
                cpuwin_end(&cw);
                draining = 1;
                drain_end = now + sec_ns(O.drain);
                while (P.nslices && next_cut <= P.nslices) { slice_srv[next_cut] = cw.srv1; slice_t[next_cut++] = cw.t1; }
            }
        }
        if (draining && (P.outstanding == 0 || now >= drain_end)) { drain_timed_out = P.outstanding > 0; break; }

        int64_t timeout = (int64_t)SCAN_INTERVAL_NS;
        if (next_due != UINT64_MAX) timeout = next_due > now ? (int64_t)(next_due - now) : 0;
        if (scheduling && !cw.started && P.ws > now && (int64_t)(P.ws - now) < timeout) timeout = (int64_t)(P.ws - now);
        if (scheduling && P.nslices && next_cut <= P.nslices) {
            uint64_t cut = P.ws + (uint64_t)next_cut * P.slice_ns;
            int64_t d = cut > now ? (int64_t)(cut - now) : 0;
            if (d < timeout) timeout = d;
        }
        if (draining) timeout = drain_end > now ? (int64_t)min_u64(drain_end - now, SCAN_INTERVAL_NS) : 0;
        if (!t_start && opened < N) {
            long target = connect_target(now - t0, N);
            for (int b = 0; opened < target && b < OPEN_BATCH; b++) {
                pconn_t *k = &c[opened];
                k->t_conn = now_ns();
                int err;
                k->fd = open_socket(&g_addr, g_addrlen, 0, &err);
                if (k->fd < 0) { err_add(&cerr, err); k->state = ST_FAILED; }
                else { k->state = ST_CONNECTING; connecting++; ep_ctl(P.ep, EPOLL_CTL_ADD, k->fd, EPOLLOUT, (uint64_t)opened); }
                opened++;
            }
            if (opened < target) timeout = 0;
            else if (opened < N) {
                uint64_t next = t0 + (uint64_t)((double)opened / O.connect_rate * 1e9);
                int64_t d = next > now ? (int64_t)(next - now) : 0;
                if (d < timeout) timeout = d;
            }
        }
        if (connecting > 0 && now >= next_scan) {
            for (long i = 0; i < opened; i++) {
                pconn_t *k = &c[i];
                if (k->state == ST_CONNECTING && since(now, k->t_conn) > sec_ns(O.connect_timeout)) {
                    close(k->fd); k->fd = -1; k->state = ST_FAILED; connecting--;
                    err_add(&cerr, ERR_LOCAL_TIMEOUT);
                }
            }
            next_scan = now + SCAN_INTERVAL_NS;
        }

        int n = ep_wait(P.ep, evs, MAX_EVENTS, timeout);
        for (int i = 0; i < n && !g_failed; i++) {
            long idx = (long)evs[i].data.u64;
            pconn_t *k = &c[idx];
            uint32_t ev = evs[i].events;
            if (k->state == ST_CONNECTING) {
                int err = so_error(k->fd);
                connecting--;
                if (err) { close(k->fd); k->fd = -1; k->state = ST_FAILED; err_add(&cerr, err); continue; }
                uint64_t t = now_ns();
                hist_add(conn_h, t - k->t_conn);
                k->state = ST_ACTIVE;
                k->established = 1;
                established++;
                P.active++;
                P.waiting++;
                ep_ctl(P.ep, EPOLL_CTL_MOD, k->fd, EPOLLIN, (uint64_t)idx);
                k->sched[0] = t;   /* message 0: the round trip that shows the server serves it */
                k->due = 1;
                P.outstanding++;
                paced_send(&P, k, idx);
                continue;
            }
            if (k->state != ST_ACTIVE) continue;
            if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) paced_read(&P, k, idx);
            if (k->state == ST_ACTIVE && (ev & EPOLLOUT) && k->tx < k->due) paced_send(&P, k, idx);
        }
    }
    cpuwin_end(&cw);
    long still_open = 0, pending = 0;
    for (long i = 0; i < N; i++) {
        pconn_t *k = &c[i];
        if (k->state == ST_ACTIVE) {
            still_open++;
            for (uint64_t q = k->rx; q < k->due; q++)
                if (paced_in_window(&P, k->sched[q % PACED_RING])) P.unanswered_w++;
        }
        if (k->state == ST_CONNECTING) pending++;
        if (k->fd >= 0) close(k->fd);
    }
    if (!g_failed && established == 0) run_failed("no connection could be established");
    double window_s = O.duration;

    jobj("params");
    jparams_common();
    jint("connections", N);
    jint("size", O.size);
    jnum("rate_per_connection", O.rate, 3);
    jnum("duration_s", O.duration, 3);
    jnum("warmup_s", O.warmup, 3);
    jnum("drain_s", O.drain, 3);
    jnum("connect_rate", O.connect_rate, 1);
    jend();
    jobj("results");
    juint("due", P.due_w);
    jnum("window_s", window_s, 3);
    jnum("offered_per_s", O.rate * (double)N, 1);
    jnum("answered_per_s", window_s > 0 ? (double)P.answered_w / window_s : NAN, 1);
    juint("answered", P.answered_w);
    jlatency("latency", P.lat);
    jlatency("latency_from_send", P.lat_sent);
    juint("late_1s", P.late_w);
    juint("unanswered", P.unanswered_w);
    juint("skipped", P.skipped_w);
    juint("unconnected", P.unconnected_w);
    jlatency("send_lag", P.lag);
    jlatency("first_request", P.first);
    jlatency("connect", conn_h);
    if (t_start) jnum("time_to_ready_s", ns_sec(t_start - t0), 3);
    else jnull("time_to_ready_s");
    jbool("ready_timed_out", start_timed_out);
    jobj("connections");
    jint("opened", opened);
    jint("established", established);
    jint("ready", P.ready);
    jint("still_open", still_open);
    jint("connect_pending", pending);
    jerrors("connect_errors", &cerr);
    juint("closed_by_server", P.closed_eof);
    juint("closed_with_error", P.closed_err);
    jerrors("io_errors", &P.ioerr);
    jend();
    juint("verified_bytes", P.verified);
    jbool("drain_timed_out", drain_timed_out);
    if (P.nslices) {
        jarr("slices");
        for (long i = 0; i < P.nslices; i++) {
            const hist_t *h = P.slice_lat[i];
            jobj(NULL);
            jnum("slice_s", (double)P.slice_ns / 1e9, 3);
            juint("answered", h->n);
            juint("late_1s", P.slice_late[i]);
            jnum("p50_us", h->n ? hist_pct(h, 0.50) / 1e3 : NAN, 1);
            jnum("p99_us", h->n ? hist_pct(h, 0.99) / 1e3 : NAN, 1);
            jnum("p999_us", h->n ? hist_pct(h, 0.999) / 1e3 : NAN, 1);
            int have = i + 1 < next_cut && slice_srv[i].ok && slice_srv[i + 1].ok && slice_t[i + 1] > slice_t[i];
            jnum("server_util", have ? (slice_srv[i + 1].cpu_s - slice_srv[i].cpu_s) / ns_sec(slice_t[i + 1] - slice_t[i])
                                     : NAN, 3);
            jend();
        }
        jend_arr();
    }
    jend();
    jcpu("loadgen_cpu", &cw);
    jserver_window("server", &cw);
    hint("paced: %llu of %llu due messages answered, %llu late (> 1 s), %llu unanswered, %llu skipped",
         (unsigned long long)P.answered_w, (unsigned long long)P.due_w, (unsigned long long)P.late_w,
         (unsigned long long)P.unanswered_w, (unsigned long long)P.skipped_w);
    close(P.ep);
    return 0;
}

/* ====================================================================== main */

static void usage(FILE *f)
{
    fputs("usage: loadgen --mode MODE --host 127.0.0.1 --port N [options]\n"
          "modes: echo, framed, hold, churn, fanout, paced (see benchmarks/README.md)\n"
          "  --connections N      echo/framed: connections (10); hold/paced: connections (100);\n"
          "                       churn: cycles in flight (32)\n"
          "  --size S             payload bytes (64); fanout: whole message incl. '\\n', >= 17\n"
          "  --duration SECONDS   measured time (5); hold: time held; fanout: publishing time\n"
          "  --warmup SECONDS     before the window (echo/framed/churn 1; fanout: settle before publishing 0.5)\n"
          "  --connect-rate N     connections opened per second (0 = as fast as possible)\n"
          "  --connect-timeout S  give up on a connect (and in churn on a whole cycle) after S (10)\n"
          "  --drain SECONDS      after the window: wait for outstanding replies / deliveries (1; fanout 2;\n"
          "                       paced 5)\n"
          "  --max-requests N     echo/framed: stop after N requests (0 = no limit)\n"
          "  --max-cycles N       churn: stop after N cycles (1000000)\n"
          "  --close auto|fin|rst churn: how the client closes (auto: fin when tcp_tw_reuse allows)\n"
          "  --subscribers M      fanout: reading subscribers (10)\n"
          "  --stalled K          fanout: extra subscribers with a minimal SO_RCVBUF that never read (0)\n"
          "  --publisher-port N   fanout: port of the publisher connection (= --port)\n"
          "  --rate R             fanout: messages per second (0 = as fast as possible);\n"
          "                       paced: messages per second per connection (required)\n"
          "  --messages N         fanout: stop publishing after N messages (0 = no limit)\n"
          "  --hello STR          hold/fanout: sent by each connection once connected (\\n escapes, %d = index)\n"
          "  --publisher-hello STR  fanout: sent by the publisher once connected\n"
          "  --wait-reply         hold: start holding only once every connection received a byte\n"
          "                       (use with --hello against an echo server; bounded by --connect-timeout)\n"
          "  --per-connection     echo/framed: include every connection's count in the JSON\n"
          "  --probe-interval S   echo/framed: every S seconds of the window, a fresh connection does one\n"
          "                       request and closes; reports its connect-to-echo latency (0 = off)\n"
          "  --source-addrs K     spread connections over 127.0.0.1..127.0.0.K (IPv4; churn default 16)\n"
          "  --framed             echo/hold/churn/paced: send every message (hold: the greeting, \"h\"\n"
          "                       by default) as a frame, 4-byte big-endian length + payload; any echo\n"
          "                       server echoes it unchanged, a framed echo server parses it\n"
          "  --websocket          echo/hold/fanout: upgrade each connection to a WebSocket (HTTP/1.1,\n"
          "                       fixed key) first; echo: every request is one masked binary frame, every\n"
          "                       reply must be the same payload in one unmasked binary frame; hold: served\n"
          "                       once the 101 response has arrived; fanout: every connection upgrades\n"
          "                       (stalled ones read their 101, then nothing), the publisher sends each\n"
          "                       message as one masked text frame, each text or binary message received\n"
          "                       is one line; --hello and --publisher-hello go as text frames after the 101\n"
          "  --barrier            echo/framed: no connection sends its second request until every\n"
          "                       connection has had its first reply; the warm-up and the window start\n"
          "                       then (reports the burst: time until all were served)\n"
          "  --barrier-timeout S  echo/framed with --barrier, paced: give up waiting for every first\n"
          "                       reply after S seconds from the start and go on (60)\n"
          "  --slice S            paced: also report latency and server CPU per S-second slice of the window\n"
          "  --server-pid PID     read the server's CPU time, RSS and threads from /proc/PID over the\n"
          "                       window (reported as \"server\")\n",
          f);
}

static void emit_and_exit_usage(const char *msg)
{
    hint("%s", msg);
    usage(stderr);
    Jfirst[0] = 1;
    jobj(NULL);
    jstr("tool", "loadgen");
    jint("version", LOADGEN_VERSION);
    jstr("mode", O.mode >= 0 ? MODE_NAMES[O.mode] : NULL);
    jbool("ok", 0);
    jstr("error", msg);
    jend();
    fputs(J, stdout);
    fputc('\n', stdout);
    exit(2);
}

static int parse_long(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static int parse_double(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static int read_sysctl_int(const char *path)
{
    FILE *f = fopen(path, "r");
    int v = -1;
    if (f) { if (fscanf(f, "%d", &v) != 1) v = -1; fclose(f); }
    return v;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"mode", required_argument, 0, 'm'},
        {"host", required_argument, 0, 'H'},
        {"port", required_argument, 0, 'p'},
        {"connections", required_argument, 0, 'c'},
        {"size", required_argument, 0, 's'},
        {"duration", required_argument, 0, 'd'},
        {"warmup", required_argument, 0, 'w'},
        {"connect-rate", required_argument, 0, 'R'},
        {"connect-timeout", required_argument, 0, 'T'},
        {"drain", required_argument, 0, 'D'},
        {"max-requests", required_argument, 0, 'q'},
        {"max-cycles", required_argument, 0, 'y'},
        {"close", required_argument, 0, 'C'},
        {"subscribers", required_argument, 0, 'S'},
        {"stalled", required_argument, 0, 'k'},
        {"publisher-port", required_argument, 0, 'P'},
        {"rate", required_argument, 0, 'r'},
        {"messages", required_argument, 0, 'n'},
        {"hello", required_argument, 0, 'e'},
        {"publisher-hello", required_argument, 0, 'E'},
        {"per-connection", no_argument, 0, 'x'},
        {"source-addrs", required_argument, 0, 'a'},
        {"probe-interval", required_argument, 0, 'i'},
        {"wait-reply", no_argument, 0, 'W'},
        {"barrier", no_argument, 0, 'b'},
        {"framed", no_argument, 0, 'f'},
        {"websocket", no_argument, 0, 'K'},
        {"barrier-timeout", required_argument, 0, 'B'},
        {"server-pid", required_argument, 0, 'z'},
        {"slice", required_argument, 0, 'L'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    char msg[512];
    O.mode = -1;
    O.host = "127.0.0.1";
    O.port = -1;
    O.connections = -1;
    O.size = 64;
    O.duration = 5;
    O.warmup = -1;
    O.connect_timeout = 10;
    O.drain = -1;
    O.max_cycles = 1000000;
    O.subscribers = 10;
    O.publisher_port = -1;
    O.close_mode = CLOSE_AUTO;
    O.barrier_timeout = 60;
    int opt;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        int bad = 0;
        switch (opt) {
        case 'm':
            O.mode = -1;
            for (int i = 0; i < M_COUNT; i++) if (!strcmp(optarg, MODE_NAMES[i])) O.mode = i;
            bad = O.mode < 0;
            break;
        case 'H': O.host = optarg; break;
        case 'p': bad = parse_long(optarg, 1, 65535, &O.port); break;
        case 'c': bad = parse_long(optarg, 1, MAX_CONNECTIONS, &O.connections); break;
        case 's': bad = parse_long(optarg, 1, MAX_SIZE, &O.size); break;
        case 'd': bad = parse_double(optarg, 0, 86400, &O.duration); break;
        case 'w': bad = parse_double(optarg, 0, 3600, &O.warmup); break;
        case 'R': bad = parse_double(optarg, 0, 1e9, &O.connect_rate); break;
        case 'T': bad = parse_double(optarg, 0.001, 3600, &O.connect_timeout); break;
        case 'D': bad = parse_double(optarg, 0, 3600, &O.drain); break;
        case 'q': bad = parse_long(optarg, 0, LONG_MAX, &O.max_requests); break;
        case 'y': bad = parse_long(optarg, 0, LONG_MAX, &O.max_cycles); break;
        case 'C':
            O.close_mode = -1;
            for (int i = 0; i < 3; i++) if (!strcmp(optarg, CLOSE_NAMES[i])) O.close_mode = i;
            bad = O.close_mode < 0;
            break;
        case 'S': bad = parse_long(optarg, 0, MAX_CONNECTIONS, &O.subscribers); break;
        case 'k': bad = parse_long(optarg, 0, 10000, &O.stalled); break;
        case 'P': bad = parse_long(optarg, 1, 65535, &O.publisher_port); break;
        case 'r': bad = parse_double(optarg, 0, 1e9, &O.rate); break;
        case 'n': bad = parse_long(optarg, 0, LONG_MAX, &O.messages); break;
        case 'e': O.hello = optarg; break;
        case 'E': O.publisher_hello = optarg; break;
        case 'x': O.per_conn = 1; break;
        case 'a': bad = parse_long(optarg, 1, 254, &O.source_addrs); break;
        case 'i': bad = parse_double(optarg, 0, 3600, &O.probe_interval); break;
        case 'W': O.wait_reply = 1; break;
        case 'b': O.barrier = 1; break;
        case 'f': O.framed = 1; break;
        case 'K': O.websocket = 1; break;
        case 'B': bad = parse_double(optarg, 0.001, 3600, &O.barrier_timeout); break;
        case 'z': bad = parse_long(optarg, 1, INT_MAX, &O.server_pid); break;
        case 'L': bad = parse_double(optarg, 0, 86400, &O.slice); break;
        case 'h': usage(stdout); return 0;
        default:
            snprintf(msg, sizeof msg, "unknown or incomplete option %s", argv[optind - 1]);
            emit_and_exit_usage(msg);
        }
        if (bad) {
            snprintf(msg, sizeof msg, "invalid value for --%s: %s", longopts[0].name, optarg);
            for (const struct option *lo = longopts; lo->name; lo++)
                if (lo->val == opt) snprintf(msg, sizeof msg, "invalid value for --%s: %s", lo->name, optarg);
            emit_and_exit_usage(msg);
        }
    }
    if (optind < argc) { snprintf(msg, sizeof msg, "unexpected argument %s", argv[optind]); emit_and_exit_usage(msg); }
    if (O.mode < 0) emit_and_exit_usage("--mode is required (echo, framed, hold, churn, fanout, paced)");
    if (O.port < 0) emit_and_exit_usage("--port is required");
    if (O.connections < 0) O.connections = O.mode == M_HOLD || O.mode == M_PACED ? 100 : O.mode == M_CHURN ? 32 : 10;
    if (O.warmup < 0) O.warmup = O.mode == M_FANOUT ? 0.5 : O.mode == M_HOLD ? 0 : 1;
    if (O.drain < 0) O.drain = O.mode == M_FANOUT ? 2 : O.mode == M_PACED ? 5 : 1;
    if (O.mode == M_PACED && O.rate <= 0) emit_and_exit_usage("paced needs --rate > 0 (messages per second per connection)");
    if (O.mode == M_PACED && O.size > 65536) emit_and_exit_usage("paced needs --size <= 65536");
    if (O.mode == M_PACED && O.rate * (double)O.connections > 1e7)
        emit_and_exit_usage("paced: --rate x --connections is above 10 million messages per second");
    if (O.barrier && O.mode != M_ECHO && O.mode != M_FRAMED) emit_and_exit_usage("--barrier is for echo and framed");
    if (O.framed && O.mode == M_FANOUT) emit_and_exit_usage("--framed is for echo, hold, churn and paced");
    g_framed = O.mode == M_FRAMED || O.framed;
    if (O.websocket && O.mode != M_ECHO && O.mode != M_HOLD && O.mode != M_FANOUT)
        emit_and_exit_usage("--websocket is for echo, hold and fanout");
    if (O.websocket && (O.framed || (O.hello && O.mode != M_FANOUT) || O.probe_interval > 0))
        emit_and_exit_usage("--websocket goes without --framed and --probe-interval (and --hello but in fanout)");
    if (O.websocket && O.size > 65535) emit_and_exit_usage("--websocket needs --size <= 65535");
    g_ws = O.websocket;
    if (O.publisher_port < 0) O.publisher_port = O.port;
    if (O.mode == M_FANOUT && O.size < 17) emit_and_exit_usage("fanout needs --size >= 17 (16-byte header and '\\n')");
    if (O.mode == M_FANOUT && O.size > 65536) emit_and_exit_usage("fanout needs --size <= 65536 (one line per message)");
    if ((O.mode == M_ECHO || O.mode == M_FRAMED || O.mode == M_PACED) && (double)O.connections * (double)O.size > 2e9)
        emit_and_exit_usage("--connections x --size is above 2 GB of request buffers");
    if (make_addr(O.host, O.port, &g_addr, &g_addrlen, msg, sizeof msg) < 0) emit_and_exit_usage(msg);
    {
        socklen_t l2;
        if (make_addr(O.host, O.publisher_port, &g_pub_addr, &l2, msg, sizeof msg) < 0) emit_and_exit_usage(msg);
    }
    if (O.hello && expand_escapes(O.hello, g_hello_t, sizeof g_hello_t - 64) < 0) emit_and_exit_usage("--hello is too long");
    if (O.publisher_hello) {
        int l = expand_escapes(O.publisher_hello, g_pub_hello, sizeof g_pub_hello);
        if (l < 0) emit_and_exit_usage("--publisher-hello is too long");
        g_pub_hello_len = (size_t)l;
    }
    if (O.source_addrs == 0) O.source_addrs = (O.mode == M_CHURN && g_addr.ss_family == AF_INET) ? 16 : 1;
    if (O.source_addrs > 1 && g_addr.ss_family != AF_INET) emit_and_exit_usage("--source-addrs needs an IPv4 host");
    g_nsrc = O.source_addrs;
    if (O.mode == M_CHURN) {
        g_tw_reuse = read_sysctl_int("/proc/sys/net/ipv4/tcp_tw_reuse");
        if (O.close_mode == CLOSE_AUTO) O.close_mode = (g_tw_reuse == 1 || g_tw_reuse == 2) ? CLOSE_FIN : CLOSE_RST;
    }

    /* enough file descriptors for every socket */
    long need = 64 + (O.mode == M_FANOUT ? O.subscribers + O.stalled + 1 : O.connections);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)need) {
        rl.rlim_cur = rl.rlim_max < (rlim_t)need ? rl.rlim_max : (rlim_t)need;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
        if (rl.rlim_cur < (rlim_t)need) {
            snprintf(msg, sizeof msg, "need %ld file descriptors, the hard limit is %llu (raise ulimit -n)", need,
                     (unsigned long long)rl.rlim_max);
            emit_and_exit_usage(msg);
        }
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    init_pattern((size_t)O.size);
    char cpus[256];
    cpu_list(cpus, sizeof cpus);
    uint64_t t_begin = now_ns();

    Jfirst[0] = 1;
    jobj(NULL);
    jstr("tool", "loadgen");
    jint("version", LOADGEN_VERSION);
    jstr("mode", MODE_NAMES[O.mode]);
    switch (O.mode) {
    case M_ECHO:
    case M_FRAMED: run_echo(); break;
    case M_HOLD: run_hold(); break;
    case M_CHURN: run_churn(); break;
    case M_FANOUT: run_fanout(); break;
    case M_PACED: run_paced(); break;
    }
    jnum("wall_s", ns_sec(now_ns() - t_begin), 3);
    jstr("cpus", cpus);
    jbool("interrupted", g_stop != 0);
    jbool("ok", !g_failed && !g_run_failed);
    jstr("error", g_failed || g_run_failed ? g_error : NULL);
    jend();
    fputs(J, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    if (g_failed) { hint("verification failure: %s", g_error); return 1; }
    if (g_run_failed) { hint("run failed: %s", g_error); return 3; }
    return 0;
}
