/*
 * loadgen: the benchmark's WebSocket load generator (one thread, epoll).
 *
 *   loadgen client HOST PORT N TOKENFILE EXPECT TIMEOUT_S
 *       Open N WebSocket connections to ws://HOST:PORT/ws, register each with
 *       the token on line i of TOKENFILE ({"event":"register",...}), then count
 *       text frames until EXPECT notification (or publication) frames have arrived or TIMEOUT_S
 *       passes. Frames containing "t":<ns> (CLOCK_MONOTONIC of the sender) give
 *       latency samples. Prints one JSON line of results on stdout, then keeps
 *       the connections open until its stdin closes. Writes "ready" on stderr
 *       once every connection is registered.
 *   loadgen rawserver PORT N FRAMES SIZE [random]
 *       The raw send() limit: accept N plain TCP connections, then send FRAMES
 *       pre-built WebSocket frames of SIZE payload bytes round-robin with send(),
 *       or each to a socket picked at random (as per-user sends to random users
 *       go), and print the rate. The client side (mode rawclient) counts them.
 *   loadgen rawclient HOST PORT N EXPECT TIMEOUT_S
 *
 * It reports its own CPU time so the harness can show it is not the bottleneck.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536
#define MAX_LAT 2000000

typedef struct {
    int fd;
    int state; /* 0 connecting, 1 handshake sent, 2 upgraded, 3 registered */
    char *buf;
    size_t len;
} conn_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* Many connections to one address and port make the kernel's search for a
   free ephemeral port in connect() slow (it reaches 95% of this core past
   15,000 connections): on loopback, spread them over source addresses
   127.0.0.1-127.0.0.16, each with its own port space, the port left to
   connect() (IP_BIND_ADDRESS_NO_PORT). */
static int connect_to(const char *host, int port) {
    static unsigned spread = 0;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (strncmp(host, "127.", 4) == 0) {
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = 0};
        src.sin_addr.s_addr = htonl(0x7f000001u + (spread++ % 16));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            close(fd);
            return -1;
        }
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

static void send_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            return;
        }
        p += w;
        n -= (size_t)w;
    }
}

/* A masked client text frame (RFC 6455 5.3); mask of zeros keeps it simple. */
static void send_text(int fd, const char *text) {
    size_t n = strlen(text);
    char hdr[14];
    size_t h = 0;
    hdr[h++] = (char)0x81;
    if (n < 126) {
        hdr[h++] = (char)(0x80 | n);
    } else {
        hdr[h++] = (char)(0x80 | 126);
        hdr[h++] = (char)(n >> 8);
        hdr[h++] = (char)(n & 0xff);
    }
    memset(hdr + h, 0, 4);
    h += 4;
    char *frame = malloc(h + n);
    memcpy(frame, hdr, h);
    memcpy(frame + h, text, n);
    send_all(fd, frame, h + n);
    free(frame);
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int64_t *lat;
static size_t nlat;

/* Parse complete frames in c->buf; returns notification frames seen. */
static long consume(conn_t *c, long *acks) {
    long notes = 0;
    size_t off = 0;
    while (c->len - off >= 2) {
        unsigned char *p = (unsigned char *)c->buf + off;
        uint64_t n = p[1] & 0x7f;
        size_t h = 2;
        if (n == 126) {
            if (c->len - off < 4) break;
            n = ((uint64_t)p[2] << 8) | p[3];
            h = 4;
        } else if (n == 127) {
            if (c->len - off < 10) break;
            n = 0;
            for (int i = 0; i < 8; i++) n = (n << 8) | p[2 + i];
            h = 10;
        }
        if (c->len - off < h + n) break;
        if ((p[0] & 0x0f) == 0x1) {
            char *payload = (char *)p + h;
            if (n > 20 && (memmem(payload, n < 40 ? n : 40, "\"notification\"", 14)
                           || memmem(payload, n < 40 ? n : 40, "\"publication\"", 13))) {
                notes++;
                char *t = memmem(payload, n, "\"t\":", 4);
                if (t && nlat < MAX_LAT) lat[nlat++] = now_ns() - strtoll(t + 4, NULL, 10);
            } else if (memmem(payload, n < 30 ? n : 30, "\"ack\"", 5)) {
                (*acks)++;
                if (c->state == 2) c->state = 3;
            }
        } else if ((p[0] & 0x0f) == 0x9) { /* ping: answer with a pong */
            char pong[6] = {(char)0x8a, (char)0x80, 0, 0, 0, 0};
            send_all(c->fd, pong, 6);
        }
        off += h + n;
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
    return notes;
}

static int run_client(const char *host, int port, int n, const char *tokenfile, long expect, double timeout, int ws) {
    lat = malloc(sizeof(int64_t) * MAX_LAT);
    char **tokens = calloc(n, sizeof(char *));
    if (ws) {
        FILE *f = fopen(tokenfile, "r");
        if (!f) { perror("tokens"); return 2; }
        char line[4096];
        for (int i = 0; i < n && fgets(line, sizeof line, f); i++) {
            line[strcspn(line, "\n")] = 0;
            tokens[i] = strdup(line);
        }
        fclose(f);
    }
    int ep = epoll_create1(0);
    conn_t *cs = calloc(n, sizeof(conn_t));
    double t_open = now_s();
    /* Keep at most WINDOW handshakes in flight, as a fleet of real clients
       would arrive: opening all at once overflows the listen backlog, and the
       SYN retransmits (a second or more each) would measure the kernel. */
    const int WINDOW = 512;
    int opened = 0;
#define OPEN_MORE()                                                                  \
    while (opened < n && (!ws || opened - (int)registered < WINDOW)) {               \
        int i = opened++;                                                            \
        cs[i].fd = connect_to(host, port);                                           \
        if (cs[i].fd < 0) { perror("connect"); return 2; }                           \
        cs[i].buf = malloc(BUF);                                                     \
        cs[i].state = ws ? 0 : 2;                                                    \
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)i}; \
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);                                 \
    }
    long registered = 0, notes = 0, acks = 0;
    double t_ready = 0, t_first = 0, t_last = 0, deadline = now_s() + timeout;
    double cpu_ready = 0;
    struct epoll_event evs[1024];
    if (!ws) { OPEN_MORE(); } /* raw mode: the server accepts them all first */
    while (now_s() < deadline) {
        if (ws) { OPEN_MORE(); }
        int k = epoll_wait(ep, evs, 1024, 100);
        for (int e = 0; e < k; e++) {
            conn_t *c = &cs[evs[e].data.u32];
            if (evs[e].events & EPOLLOUT) {
                if (c->state == 0) {
                    char req[512];
                    snprintf(req, sizeof req,
                             "GET /ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                             host, port);
                    send_all(c->fd, req, strlen(req));
                    c->state = 1;
                }
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = evs[e].data.u32};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            }
            if (evs[e].events & EPOLLIN) {
                for (;;) {
                    ssize_t r = recv(c->fd, c->buf + c->len, BUF - c->len, 0);
                    if (r <= 0) break;
                    c->len += (size_t)r;
                    if (c->state == 1) {
                        char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
                        if (!end) continue;
                        size_t hl = (size_t)(end + 4 - c->buf);
                        memmove(c->buf, c->buf + hl, c->len - hl);
                        c->len -= hl;
                        c->state = 2;
                        char reg[4200];
                        snprintf(reg, sizeof reg, "{\"event\":\"register\",\"id\":1,\"data\":{\"token\":\"%s\"}}", tokens[evs[e].data.u32]);
                        send_text(c->fd, reg);
                    }
                    int before = c->state;
                    long got = consume(c, &acks);
                    if (before == 2 && c->state == 3 && ++registered == n) {
                        t_ready = now_s();
                        cpu_ready = cpu_s();
                        fprintf(stderr, "ready\n");
                        fflush(stderr);
                    }
                    if (got) {
                        if (!t_first) t_first = now_s();
                        notes += got;
                        t_last = now_s();
                    }
                    if (c->len == BUF) c->len = 0; /* an oversized frame: drop */
                }
            }
        }
        if (!ws && registered == 0) {
            registered = n;
            t_ready = now_s();
            cpu_ready = cpu_s();
            fprintf(stderr, "ready\n");
            fflush(stderr);
        }
        if (expect && notes >= expect) break;
    }
    double cpu_total = cpu_s();
    qsort(lat, nlat, sizeof(int64_t), cmp_i64);
    double span = t_last > t_first ? t_last - t_first : 0;
#define PCT(q) (nlat ? lat[(size_t)((q) * (nlat - 1))] / 1e6 : -1.0)
    printf("{\"connections\": %d, \"registered\": %ld, \"open_seconds\": %.4f, \"received\": %ld, "
           "\"seconds\": %.4f, \"rate\": %.1f, \"client_cpu_seconds\": %.4f, \"client_cpu_share\": %.3f, "
           "\"latency_ms\": {\"samples\": %zu, \"p50\": %.3f, \"p99\": %.3f, \"p999\": %.3f, \"max\": %.3f}}\n",
           n, registered, t_ready ? t_ready - t_open : -1.0, notes, span, span > 0 ? notes / span : 0.0,
           cpu_total - cpu_ready, span > 0 ? (cpu_total - cpu_ready) / span : 0.0, nlat, PCT(0.5), PCT(0.99),
           PCT(0.999), nlat ? lat[nlat - 1] / 1e6 : -1.0);
    fflush(stdout);
    /* Stay connected until the harness closes our stdin: exiting at once would
       hand the server N disconnects while it may still be finishing the run
       being measured (storing the last sends, for one). */
    char drain[64];
    while (read(0, drain, sizeof drain) > 0) {}
    return 0;
}

static int run_rawserver(int port, int n, long frames, int size, int random_order) {
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 4096) < 0) { perror("listen"); return 2; }
    fprintf(stderr, "listening\n");
    fflush(stderr);
    int *fds = malloc(sizeof(int) * n);
    for (int i = 0; i < n; i++) {
        fds[i] = accept(ls, NULL, NULL);
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(fds[i], F_SETFL, O_NONBLOCK);
    }
    /* one pre-built frame, like a broadcast encoded once */
    char *frame = malloc(size + 4);
    size_t h = 0;
    frame[h++] = (char)0x81;
    if (size < 126) frame[h++] = (char)size;
    else { frame[h++] = 126; frame[h++] = (char)(size >> 8); frame[h++] = (char)(size & 0xff); }
    const char *head = "{\"event\":\"notification\",\"data\":{\"message\":\"";
    memset(frame + h, 'x', size);
    memcpy(frame + h, head, strlen(head));
    size_t total = h + size;
    double t0 = now_s(), c0 = cpu_s();
    long sent = 0, dropped = 0;
    uint64_t rng = 0x9e3779b97f4a7c15ULL; /* xorshift64: the same picks every run */
    for (long r = 0; sent + dropped < frames; r++) {
        for (int i = 0; i < n && sent + dropped < frames; i++) {
            int fd = fds[i];
            if (random_order) {
                rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
                fd = fds[rng % (uint64_t)n];
            }
            ssize_t w = send(fd, frame, total, MSG_NOSIGNAL);
            if (w == (ssize_t)total) sent++;
            else { /* a full socket: the raw path would queue; count it as a retry */ usleep(0); i--; }
        }
    }
    double dt = now_s() - t0;
    printf("{\"sent\": %ld, \"seconds\": %.4f, \"rate\": %.1f, \"server_cpu_seconds\": %.4f}\n", sent, dt, sent / dt, cpu_s() - c0);
    sleep(1);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 8 && !strcmp(argv[1], "client"))
        return run_client(argv[2], atoi(argv[3]), atoi(argv[4]), argv[5], atol(argv[6]), atof(argv[7]), 1);
    if (argc >= 7 && !strcmp(argv[1], "rawclient"))
        return run_client(argv[2], atoi(argv[3]), atoi(argv[4]), NULL, atol(argv[5]), atof(argv[6]), 0);
    if (argc >= 6 && !strcmp(argv[1], "rawserver"))
        return run_rawserver(atoi(argv[2]), atoi(argv[3]), atol(argv[4]), atoi(argv[5]),
                             argc >= 7 && !strcmp(argv[6], "random"));
    fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
    return 2;
}
