/* iovirt virtio-net data path (see net.h for the contract).
 *
 * Packets (virtio 1.2, 5.1.6) travel with a struct virtio_net_hdr_v1 in front:
 *   u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size; le16 csum_start;
 *   le16 csum_offset; le16 num_buffers;                       (12 bytes)
 * The backend fd speaks the same format (a tap with IFF_VNET_HDR), so TX hands the guest's
 * bytes to writev() unchanged and RX only has to fill in num_buffers (5.1.6.4: the number
 * of buffers the packet used; 1 without VIRTIO_NET_F_MRG_RXBUF). Counters count frame
 * bytes, without the header.
 *
 * Transmit (5.1.6.2): a TX chain is header + frame in its readable part. The guest is not
 * trusted: a chain with writable descriptors, or whose readable part is shorter than the
 * header plus an Ethernet header or longer than the header plus IOV_NET_MAX_PACKET, is
 * returned with used length 0 and counted in tx_errors; the queue stays usable. When the
 * fd answers EAGAIN the chain stays popped (pair->tx_pending) and is written again once
 * poll() reports POLLOUT: nothing is dropped and nothing spins.
 *
 * Receive (5.1.6.3-4): one packet is read into a per-pair bounce buffer, filtered on its
 * destination MAC, then copied into guest buffers:
 *  - without MRG_RXBUF into one chain; a chain too small for the whole packet gets the
 *    packet dropped (counted) and is returned with length 0 (nothing written);
 *  - with MRG_RXBUF into as many chains as it takes. The engine cannot peek at the ring,
 *    so chains are popped and filled one by one and *held* (popped, filled, not yet used)
 *    until the packet is complete. If the ring runs dry in the middle, the packet and the
 *    held chains stay as they are, RX notifications are enabled, and the copy resumes
 *    with the next chain when the guest kicks. Holding (rather than rolling the ring state
 *    back) is what keeps event idx right: once every available chain is consumed,
 *    enable_notification() asks for a kick on the *next* buffer, which is exactly what we
 *    wait for. A packet that does not fit in a whole ring's worth of chains can never be
 *    delivered: once the held chains cover `size` ring slots the packet is dropped and
 *    the held chains are returned with length 0. num_buffers is written last, through
 *    pointers to wherever its two bytes landed (the first chain may be tiny).
 * While RX has no buffers the worker stops polling the fd for POLLIN: the backlog stays in
 * the tap (at most one packet waits in the bounce buffer).
 *
 * Each pair has its own worker thread, rings, scratch space and counters (atomic adds, so
 * a snapshot from another thread is torn-free per field); pairs share only the receive
 * filter (copied into the pair whenever its generation number changes), the stop eventfd
 * and the error eventfd. Every loop is bounded: RX_BURST packets and TX_BURST chains per
 * wake-up, after which the worker polls with a zero timeout so the other direction and
 * the stop fd get their turn. */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "net.h"

/* Ethernet (IEEE 802.3). */
#define NET_ETH_ALEN 6
#define NET_ETH_HLEN 14
#define NET_ETH_GROUP_BIT 0x01u /* I/G bit of the first destination byte: multicast */

/* struct virtio_net_hdr (10 bytes, no num_buffers) is the smallest header a backend may
 * carry; virtio_net_hdr_v1 (12) adds le16 num_buffers at offset 10. */
#define VIRTIO_NET_HDR_MIN_LEN 10u
#define VIRTIO_NET_HDR_NUM_BUFFERS_OFF 10u
#define VIRTIO_NET_HDR_V1_LEN 12u
#define NET_HDR_MAX_LEN 64u

#define RX_BURST 64          /* packets read (delivered or dropped) per RX pass */
#define TX_BURST 256         /* chains popped per TX pass */
#define SYNC_MAX_ROUNDS 1024 /* TX+RX passes in one iov_net_process_pair call */
#define RX_MAX_HELD 32768    /* the largest ring: a packet never holds more chains */

/* A chain popped for the packet being received, filled, not yet returned. */
struct rx_held {
    uint16_t head;
    uint16_t ndescs;
    uint32_t len;
};

/* Per-pair scratch space: big, so it lives on the heap. */
struct net_scratch {
    struct iov_chain rx_chain;
    struct iov_chain tx_chain; /* also the chain waiting for POLLOUT (tx_pending) */
    struct rx_held held[RX_MAX_HELD];
};

struct net_queue {
    struct iov_vq vq;
    int configured;
    int kick_fd;
    int call_fd;
    int error; /* atomic: 0 or the negative errno that broke the queue */
};

/* Where the RX side of a pair stands after a pass. */
enum rx_state {
    RX_IDLE,  /* the fd is drained: wait for POLLIN */
    RX_NOBUF, /* the guest has no (or not enough) buffers: wait for the RX kick */
    RX_MORE,  /* the burst budget ran out: come back without waiting */
    RX_DEAD,  /* the fd hung up or failed: read it no more */
};

struct net_pair {
    struct iov_net *net;
    struct net_queue rx, tx;
    int fd;
    int running; /* a worker thread exists (joined by iov_net_stop) */
    pthread_t thread;
    struct net_scratch *scratch;
    uint8_t *bounce; /* hdr_len + IOV_NET_MAX_PACKET + 1 bytes */
    /* The packet in the bounce buffer (pkt_len 0: none) and how far it got. */
    uint32_t pkt_len;
    uint32_t pkt_off;     /* bytes already copied into held chains */
    uint32_t nheld;       /* chains in scratch->held */
    uint32_t held_slots;  /* ring slots those chains occupy */
    uint8_t *numbuf_at[2]; /* guest bytes that hold num_buffers (low, high) */
    int rx_dead;
    int tx_pending; /* scratch->tx_chain is popped and waits for the fd to be writable */
    /* The pair's copy of the filter and the generation it was copied at. */
    unsigned filter_gen;
    struct iov_net_filter filter;
    struct iov_net_stats stats; /* atomic adds */
};

struct iov_net {
    const struct iov_mem *mem;
    struct iov_net_config cfg;
    unsigned npairs;
    int error_fd;
    int stop_fd;
    int lock_ok;
    pthread_mutex_t filter_lock; /* guards filter and filter_gen's writers */
    struct iov_net_filter filter;
    unsigned filter_gen; /* atomic; bumped by every iov_net_set_filter */
    struct net_pair *pairs;
};

#define STAT_ADD(p, field, n) __atomic_fetch_add(&(p)->stats.field, (n), __ATOMIC_RELAXED)

static size_t bounce_size(const struct iov_net_config *cfg)
{
    /* One byte more than the largest packet: a read that fills it was truncated. */
    return (size_t)cfg->hdr_len + IOV_NET_MAX_PACKET + 1;
}

static void signal_fd(int fd)
{
    uint64_t one = 1;
    if (fd < 0)
        return;
    /* EAGAIN means the counter is saturated: the reader will wake up anyway. */
    while (write(fd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

static void queue_broke(struct net_pair *p, struct net_queue *q)
{
    int expected = 0;
    if (__atomic_compare_exchange_n(&q->error, &expected, q->vq.error, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST))
        signal_fd(p->net->error_fd);
}

/* The error of a broken queue of the pair (the pair then does nothing), or 0. */
static int pair_error(const struct net_pair *p)
{
    if (p->rx.vq.broken)
        return p->rx.vq.error;
    if (p->tx.vq.broken)
        return p->tx.vq.error;
    return 0;
}

/* Flush what a pass completed and interrupt the guest if it asked for it. */
static void publish(struct net_pair *p, struct net_queue *q, unsigned *added)
{
    if (*added == 0)
        return;
    *added = 0;
    iov_vq_flush_used(&q->vq);
    if (iov_vq_needs_notification(&q->vq)) {
        signal_fd(q->call_fd);
        STAT_ADD(p, notifications, 1);
    }
}

/* ---- receive filter ------------------------------------------------------------- */

static void filter_promisc(struct iov_net_filter *f)
{
    memset(f, 0, sizeof(*f));
    f->promisc = 1;
}

static void refresh_filter(struct net_pair *p)
{
    struct iov_net *net = p->net;
    if (__atomic_load_n(&net->filter_gen, __ATOMIC_ACQUIRE) == p->filter_gen)
        return;
    pthread_mutex_lock(&net->filter_lock);
    p->filter = net->filter;
    p->filter_gen = net->filter_gen;
    pthread_mutex_unlock(&net->filter_lock);
}

static int mac_listed(const uint8_t (*list)[NET_ETH_ALEN], uint32_t n, const uint8_t *mac)
{
    for (uint32_t i = 0; i < n && i < IOV_NET_MAX_FILTER_MACS; i++)
        if (memcmp(list[i], mac, NET_ETH_ALEN) == 0)
            return 1;
    return 0;
}

/* virtio 1.2, 5.1.6.5.1-2 (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_MAC). The NO* modes win
 * over the ALL* ones for their class of frames, as in the reference implementations. */
static int filter_accepts(const struct iov_net_filter *f, const uint8_t *dst)
{
    static const uint8_t broadcast[NET_ETH_ALEN] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    if (f->promisc)
        return 1;
    if (dst[0] & NET_ETH_GROUP_BIT) {
        if (memcmp(dst, broadcast, NET_ETH_ALEN) == 0)
            return !f->nobcast;
        if (f->nomulti)
            return 0;
        return f->allmulti || mac_listed(f->multicast, f->n_multicast, dst);
    }
    if (f->nouni)
        return 0;
    return f->alluni || mac_listed(f->unicast, f->n_unicast, dst);
}

/* ---- receive -------------------------------------------------------------------- */

enum rx_read {
    RXR_PACKET,  /* a packet is in the bounce buffer */
    RXR_DROPPED, /* one was read and dropped (short, too long or filtered) */
    RXR_EMPTY,   /* nothing to read now */
    RXR_EOF,     /* the fd is dead */
};

/* Read 0 bytes: an empty datagram, or the peer hung up? poll() tells the two apart. */
static int fd_hung_up(int fd)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    return poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLHUP | POLLERR | POLLNVAL));
}

static enum rx_read rx_read_packet(struct net_pair *p)
{
    const struct iov_net_config *cfg = &p->net->cfg;
    size_t cap = bounce_size(cfg);
    ssize_t r;
    do
        r = read(p->fd, p->bounce, cap);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? RXR_EMPTY : RXR_EOF;
    if (r == 0 && fd_hung_up(p->fd))
        return RXR_EOF;
    /* No Ethernet header, or truncated by our buffer (a packet larger than any we take). */
    if ((size_t)r < cfg->hdr_len + NET_ETH_HLEN || (size_t)r == cap) {
        STAT_ADD(p, rx_dropped_nobuf_or_short, 1);
        return RXR_DROPPED;
    }
    refresh_filter(p);
    if (!filter_accepts(&p->filter, p->bounce + cfg->hdr_len)) {
        STAT_ADD(p, rx_dropped_filter, 1);
        return RXR_DROPPED;
    }
    p->pkt_len = (uint32_t)r;
    p->pkt_off = 0;
    p->nheld = 0;
    p->held_slots = 0;
    p->numbuf_at[0] = p->numbuf_at[1] = NULL;
    return RXR_PACKET;
}

static void rx_packet_done(struct net_pair *p, int delivered)
{
    if (delivered) {
        STAT_ADD(p, rx_packets, 1);
        STAT_ADD(p, rx_bytes, p->pkt_len - p->net->cfg.hdr_len);
    } else {
        STAT_ADD(p, rx_dropped_nobuf_or_short, 1);
    }
    p->pkt_len = 0;
    p->pkt_off = 0;
    p->nheld = 0;
    p->held_slots = 0;
}

/* Copy the rest of the packet (from pkt_off) into the chain's writable segments; note
 * where the num_buffers bytes land. Returns the bytes copied. */
static uint32_t rx_fill_chain(struct net_pair *p, const struct iov_chain *c)
{
    const struct iovec *seg = c->iov + c->nout;
    int has_numbuf = p->net->cfg.hdr_len >= VIRTIO_NET_HDR_V1_LEN;
    uint32_t copied = 0;
    for (uint32_t i = 0; i < c->nin && p->pkt_off < p->pkt_len; i++) {
        uint32_t left = p->pkt_len - p->pkt_off;
        uint32_t n = seg[i].iov_len < left ? (uint32_t)seg[i].iov_len : left;
        uint8_t *dst = seg[i].iov_base;
        memcpy(dst, p->bounce + p->pkt_off, n);
        for (uint32_t k = 0; has_numbuf && k < 2; k++) {
            uint32_t at = VIRTIO_NET_HDR_NUM_BUFFERS_OFF + k;
            if (at >= p->pkt_off && at - p->pkt_off < n)
                p->numbuf_at[k] = dst + (at - p->pkt_off);
        }
        p->pkt_off += n;
        copied += n;
    }
    return copied;
}

/* Without MRG_RXBUF: the whole packet into one chain, or dropped. 1 done, 0 no chain,
 * or a negative errno (the queue broke). */
static int rx_deliver_single(struct net_pair *p, unsigned *added, int *moved)
{
    struct iov_vq *vq = &p->rx.vq;
    struct iov_chain *c = &p->scratch->rx_chain;
    int r = iov_vq_pop(vq, p->net->mem, c);
    if (r <= 0)
        return r;
    if (c->in_bytes < p->pkt_len) {
        /* Never half a packet: the chain goes back empty (5.1.6.4 allows no truncation). */
        iov_vq_add_used(vq, c->head, c->ndescs, 0);
        (*added)++;
        rx_packet_done(p, 0);
        return 1;
    }
    if (p->net->cfg.hdr_len >= VIRTIO_NET_HDR_V1_LEN) {
        /* 5.1.6.4: num_buffers is 1 without MRG_RXBUF (whatever the backend left there). */
        p->bounce[VIRTIO_NET_HDR_NUM_BUFFERS_OFF] = 1;
        p->bounce[VIRTIO_NET_HDR_NUM_BUFFERS_OFF + 1] = 0;
    }
    p->pkt_off = 0;
    uint32_t len = rx_fill_chain(p, c);
    iov_vq_add_used(vq, c->head, c->ndescs, len);
    (*added)++;
    (*moved)++;
    rx_packet_done(p, 1);
    return 1;
}

/* With MRG_RXBUF: fill chains until the packet is in (see the top of the file). 1 done
 * (delivered or dropped), 0 the ring ran dry (chains stay held), or a negative errno. */
static int rx_deliver_merged(struct net_pair *p, unsigned *added, int *moved)
{
    struct iov_vq *vq = &p->rx.vq;
    struct iov_chain *c = &p->scratch->rx_chain;
    struct rx_held *held = p->scratch->held;
    int delivered = 1;
    while (p->pkt_off < p->pkt_len) {
        if (p->held_slots >= vq->size || p->nheld >= RX_MAX_HELD) {
            delivered = 0; /* a whole ring cannot hold it: it never will */
            break;
        }
        int r = iov_vq_pop(vq, p->net->mem, c);
        if (r <= 0)
            return r;
        uint32_t len = rx_fill_chain(p, c);
        held[p->nheld].head = c->head;
        held[p->nheld].ndescs = c->ndescs;
        held[p->nheld].len = len;
        p->nheld++;
        p->held_slots += c->ndescs ? c->ndescs : 1;
    }
    if (delivered && p->numbuf_at[0] && p->numbuf_at[1]) {
        /* nheld <= ring size <= 32768: fits le16. Written before the used entries that
         * publish it. */
        *p->numbuf_at[0] = (uint8_t)(p->nheld & 0xff);
        *p->numbuf_at[1] = (uint8_t)(p->nheld >> 8);
    }
    for (uint32_t i = 0; i < p->nheld; i++)
        iov_vq_add_used(vq, held[i].head, held[i].ndescs, delivered ? held[i].len : 0);
    *added += p->nheld;
    if (delivered)
        (*moved)++;
    rx_packet_done(p, delivered);
    return 1;
}

/* One RX pass: up to RX_BURST packets from the fd into the guest. 0 or a negative errno
 * (the RX queue broke). */
static int rx_process(struct net_pair *p, enum rx_state *state, int *moved)
{
    struct iov_vq *vq = &p->rx.vq;
    unsigned added = 0;
    int err = 0;
    *state = RX_MORE;
    /* While buffers last we look at the ring when packets come; kicks are only needed
     * once it runs dry. */
    iov_vq_disable_notification(vq);
    for (int budget = RX_BURST; budget > 0; budget--) {
        if (p->pkt_len == 0) {
            if (p->rx_dead) {
                *state = RX_DEAD;
                break;
            }
            enum rx_read rr = rx_read_packet(p);
            if (rr == RXR_EMPTY) {
                *state = RX_IDLE;
                break;
            }
            if (rr == RXR_EOF) {
                p->rx_dead = 1;
                *state = RX_DEAD;
                break;
            }
            if (rr == RXR_DROPPED)
                continue;
        }
        int r = p->net->cfg.mrg_rxbuf ? rx_deliver_merged(p, &added, moved)
                                      : rx_deliver_single(p, &added, moved);
        if (r < 0) {
            err = r;
            break;
        }
        if (r == 0) {
            /* Out of buffers: ask for a kick; if some came meanwhile, go on. */
            if (iov_vq_enable_notification(vq)) {
                iov_vq_disable_notification(vq);
                continue;
            }
            *state = RX_NOBUF;
            break;
        }
    }
    publish(p, &p->rx, &added);
    if (err) {
        queue_broke(p, &p->rx);
        return err;
    }
    return 0;
}

/* ---- transmit ------------------------------------------------------------------- */

enum tx_result {
    TXS_SENT,   /* the packet went out */
    TXS_FAILED, /* malformed chain or write error: counted, the chain is done */
    TXS_AGAIN,  /* the fd is full: try the same chain again on POLLOUT */
};

/* Write one TX chain to the fd. */
static enum tx_result tx_send(struct net_pair *p, const struct iov_chain *c)
{
    uint64_t hdr_len = p->net->cfg.hdr_len;
    if (c->nin > 0 || c->out_bytes < hdr_len + NET_ETH_HLEN ||
        c->out_bytes > hdr_len + IOV_NET_MAX_PACKET) {
        STAT_ADD(p, tx_errors, 1);
        return TXS_FAILED;
    }
    /* nout <= IOV_CHAIN_MAX_SEGS == 1024 == IOV_MAX: one writev, one packet. */
    ssize_t r;
    do
        r = writev(p->fd, c->iov, (int)c->nout);
    while (r < 0 && errno == EINTR);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return TXS_AGAIN;
    if (r < 0 || (uint64_t)r != c->out_bytes) {
        STAT_ADD(p, tx_errors, 1);
        return TXS_FAILED;
    }
    STAT_ADD(p, tx_packets, 1);
    STAT_ADD(p, tx_bytes, c->out_bytes - hdr_len);
    return TXS_SENT;
}

/* One TX pass: up to TX_BURST chains, with the notification dance of 2.7.10 / 2.8.10.
 * *more: the budget ran out with notifications still disabled (come back unasked).
 * 0 or a negative errno (the TX queue broke). */
static int tx_process(struct net_pair *p, int *more, int *moved)
{
    struct iov_vq *vq = &p->tx.vq;
    struct iov_chain *c = &p->scratch->tx_chain;
    unsigned added = 0;
    int budget = TX_BURST;
    int err = 0;
    *more = 0;
    if (p->tx_pending) {
        enum tx_result res = tx_send(p, c);
        if (res == TXS_AGAIN)
            return 0; /* still full: wait for POLLOUT */
        p->tx_pending = 0;
        iov_vq_add_used(vq, c->head, c->ndescs, 0);
        added++;
        *moved += res == TXS_SENT;
    }
    for (;;) {
        iov_vq_disable_notification(vq);
        while (budget > 0) {
            int r = iov_vq_pop(vq, p->net->mem, c);
            if (r < 0) {
                err = r;
                goto out;
            }
            if (r == 0)
                break;
            budget--;
            enum tx_result res = tx_send(p, c);
            if (res == TXS_AGAIN) {
                p->tx_pending = 1; /* notifications stay off: POLLOUT brings us back */
                goto out;
            }
            /* TX buffers are device-readable only: the used length is always 0. */
            iov_vq_add_used(vq, c->head, c->ndescs, 0);
            added++;
            *moved += res == TXS_SENT;
        }
        if (budget == 0) {
            *more = 1;
            goto out;
        }
        publish(p, &p->tx, &added);
        if (!iov_vq_enable_notification(vq))
            break;
    }
out:
    publish(p, &p->tx, &added);
    if (err) {
        queue_broke(p, &p->tx);
        return err;
    }
    return 0;
}

/* ---- worker --------------------------------------------------------------------- */

enum { PFD_STOP, PFD_RX_KICK, PFD_TX_KICK, PFD_PACKET, PFD_COUNT };

/* Consume a kick eventfd's count; 0 if the fd is unusable from now on. */
static int drain_kick(int fd, short revents)
{
    if (revents & (POLLERR | POLLNVAL | POLLHUP))
        return 0;
    uint64_t v;
    if (read(fd, &v, sizeof(v)) < 0 && errno != EAGAIN && errno != EINTR)
        return 0;
    return 1;
}

static void *worker(void *arg)
{
    struct net_pair *p = arg;
    sigset_t all;
    /* Signals meant for vCPU threads (kicks) must never land here. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);

    int rx_kick = p->rx.kick_fd, tx_kick = p->tx.kick_fd;
    int moved = 0; /* unused here; the passes want somewhere to count */
    int tx_more = 0;
    enum rx_state rx = RX_MORE;
    /* Anything queued before we started (kicks we missed, packets waiting) goes now. */
    int alive = tx_process(p, &tx_more, &moved) == 0 && rx_process(p, &rx, &moved) == 0;
    for (;;) {
        struct pollfd fds[PFD_COUNT];
        short events = 0;
        if (alive && rx == RX_IDLE)
            events |= POLLIN; /* only while the guest has room */
        if (alive && p->tx_pending)
            events |= POLLOUT;
        fds[PFD_STOP] = (struct pollfd){.fd = p->net->stop_fd, .events = POLLIN};
        /* poll() skips negative fds: a broken pair waits for the stop fd only. */
        fds[PFD_RX_KICK] = (struct pollfd){.fd = alive ? rx_kick : -1, .events = POLLIN};
        fds[PFD_TX_KICK] = (struct pollfd){.fd = alive ? tx_kick : -1, .events = POLLIN};
        fds[PFD_PACKET] = (struct pollfd){.fd = events ? p->fd : -1, .events = events};
        int timeout = alive && (tx_more || rx == RX_MORE) ? 0 : -1;
        int r = poll(fds, PFD_COUNT, timeout);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[PFD_STOP].revents)
            break;
        if (!alive)
            continue;
        int do_rx = rx == RX_MORE, do_tx = tx_more;
        if (fds[PFD_RX_KICK].revents) {
            if (!drain_kick(rx_kick, fds[PFD_RX_KICK].revents))
                rx_kick = -1;
            do_rx = 1;
        }
        if (fds[PFD_TX_KICK].revents) {
            if (!drain_kick(tx_kick, fds[PFD_TX_KICK].revents))
                tx_kick = -1;
            do_tx = 1;
        }
        short pr = fds[PFD_PACKET].revents;
        /* Hang-ups and errors go to whichever side polled: its read or write sees them. */
        if ((events & POLLIN) && (pr & (POLLIN | POLLHUP | POLLERR | POLLNVAL)))
            do_rx = 1;
        if ((events & POLLOUT) && (pr & (POLLOUT | POLLHUP | POLLERR | POLLNVAL)))
            do_tx = 1;
        if (do_tx && tx_process(p, &tx_more, &moved) < 0)
            alive = 0;
        if (alive && do_rx && rx_process(p, &rx, &moved) < 0)
            alive = 0;
        moved = 0;
    }
    return NULL;
}

/* ---- public API ----------------------------------------------------------------- */

static int config_ok(const struct iov_net_config *cfg)
{
    if (cfg->hdr_len < VIRTIO_NET_HDR_MIN_LEN || cfg->hdr_len > NET_HDR_MAX_LEN)
        return 0;
    /* Merged buffers need num_buffers in the header. */
    return !cfg->mrg_rxbuf || cfg->hdr_len >= VIRTIO_NET_HDR_V1_LEN;
}

struct iov_net *iov_net_new(const struct iov_mem *mem, const struct iov_net_config *config,
                            unsigned npairs)
{
    if (!mem || !config || npairs == 0 || npairs > IOV_NET_MAX_PAIRS || !config_ok(config)) {
        errno = EINVAL;
        return NULL;
    }
    struct iov_net *net = calloc(1, sizeof(*net));
    if (!net)
        return NULL;
    net->mem = mem;
    net->cfg = *config;
    net->cfg.mrg_rxbuf = !!config->mrg_rxbuf;
    net->npairs = npairs;
    net->error_fd = -1;
    net->stop_fd = -1;
    filter_promisc(&net->filter); /* the device starts promiscuous until told otherwise */
    int err = pthread_mutex_init(&net->filter_lock, NULL);
    if (err) {
        free(net);
        errno = err;
        return NULL;
    }
    net->lock_ok = 1;
    net->pairs = calloc(npairs, sizeof(*net->pairs));
    if (!net->pairs)
        goto fail;
    for (unsigned i = 0; i < npairs; i++) {
        struct net_pair *p = &net->pairs[i];
        p->net = net;
        p->fd = -1;
        p->rx.kick_fd = p->rx.call_fd = -1;
        p->tx.kick_fd = p->tx.call_fd = -1;
        p->filter = net->filter;
        p->scratch = calloc(1, sizeof(*p->scratch));
        p->bounce = malloc(bounce_size(&net->cfg));
        if (!p->scratch || !p->bounce)
            goto fail;
    }
    net->error_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (net->error_fd < 0)
        goto fail;
    net->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (net->stop_fd < 0)
        goto fail;
    return net;
fail: {
    int saved = errno;
    iov_net_free(net);
    errno = saved;
    return NULL;
}
}

int iov_net_setup_queue(struct iov_net *net, unsigned q, uint16_t size, uint32_t flags,
                        uint64_t desc_gpa, uint64_t driver_gpa, uint64_t device_gpa, int kick_fd,
                        int call_fd)
{
    if (q >= 2 * net->npairs)
        return -EINVAL;
    struct net_pair *p = &net->pairs[q / 2];
    int is_rx = q % 2 == 0;
    struct net_queue *queue = is_rx ? &p->rx : &p->tx;
    if (p->running)
        return -EBUSY;
    queue->configured = 0;
    __atomic_store_n(&queue->error, 0, __ATOMIC_SEQ_CST);
    /* Whatever the old ring held (a packet half-copied, a chain waiting for POLLOUT)
     * belonged to the old ring. */
    if (is_rx)
        p->pkt_len = p->pkt_off = p->nheld = p->held_slots = 0;
    else
        p->tx_pending = 0;
    int err = iov_vq_setup(&queue->vq, net->mem, size, flags, desc_gpa, driver_gpa, device_gpa);
    if (err)
        return err;
    queue->kick_fd = kick_fd;
    queue->call_fd = call_fd;
    queue->configured = 1;
    return 0;
}

int iov_net_set_backend(struct iov_net *net, unsigned pair, int fd)
{
    if (pair >= net->npairs || fd < 0)
        return -EINVAL;
    struct net_pair *p = &net->pairs[pair];
    if (p->running)
        return -EBUSY;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    p->fd = fd;
    p->rx_dead = 0;
    return 0;
}

static int pair_ready(const struct net_pair *p)
{
    return p->rx.configured && p->tx.configured && p->fd >= 0;
}

int iov_net_start_pair(struct iov_net *net, unsigned pair)
{
    if (pair >= net->npairs)
        return -EINVAL;
    struct net_pair *p = &net->pairs[pair];
    if (!pair_ready(p) || p->rx.kick_fd < 0 || p->tx.kick_fd < 0)
        return -EINVAL;
    if (p->running)
        return -EBUSY;
    /* Create the thread with every signal blocked so that none can reach it before it
     * blocks them itself; the caller's mask is restored right after. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int err = pthread_create(&p->thread, NULL, worker, p);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err)
        return -err;
    p->running = 1;
    return 0;
}

int iov_net_process_pair(struct iov_net *net, unsigned pair)
{
    if (pair >= net->npairs)
        return -EINVAL;
    struct net_pair *p = &net->pairs[pair];
    if (!pair_ready(p))
        return -EINVAL;
    if (p->running)
        return -EBUSY;
    int err = pair_error(p);
    if (err)
        return err;
    int moved = 0;
    /* Every pass is bounded; so is the number of passes. */
    for (int round = 0; round < SYNC_MAX_ROUNDS; round++) {
        int tx_more;
        enum rx_state rx;
        err = tx_process(p, &tx_more, &moved);
        if (err)
            return err;
        err = rx_process(p, &rx, &moved);
        if (err)
            return err;
        if (!tx_more && rx != RX_MORE)
            break;
    }
    return moved;
}

void iov_net_set_filter(struct iov_net *net, const struct iov_net_filter *filter)
{
    pthread_mutex_lock(&net->filter_lock);
    net->filter = *filter;
    if (net->filter.n_unicast > IOV_NET_MAX_FILTER_MACS)
        net->filter.n_unicast = IOV_NET_MAX_FILTER_MACS;
    if (net->filter.n_multicast > IOV_NET_MAX_FILTER_MACS)
        net->filter.n_multicast = IOV_NET_MAX_FILTER_MACS;
    __atomic_store_n(&net->filter_gen, net->filter_gen + 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&net->filter_lock);
}

void iov_net_stop(struct iov_net *net)
{
    int any = 0;
    for (unsigned i = 0; i < net->npairs; i++)
        any |= net->pairs[i].running;
    if (!any)
        return;
    signal_fd(net->stop_fd);
    for (unsigned i = 0; i < net->npairs; i++) {
        struct net_pair *p = &net->pairs[i];
        if (p->running) {
            pthread_join(p->thread, NULL);
            p->running = 0;
        }
    }
    /* Drain the stop fd so that workers started later do not stop at once. */
    uint64_t v;
    while (read(net->stop_fd, &v, sizeof(v)) < 0 && errno == EINTR)
        ;
}

int iov_net_error_fd(const struct iov_net *net)
{
    return net->error_fd;
}

int iov_net_queue_error(const struct iov_net *net, unsigned q)
{
    if (q >= 2 * net->npairs)
        return -EINVAL;
    const struct net_pair *p = &net->pairs[q / 2];
    const struct net_queue *queue = q % 2 == 0 ? &p->rx : &p->tx;
    return __atomic_load_n(&queue->error, __ATOMIC_SEQ_CST);
}

void iov_net_get_stats(const struct iov_net *net, struct iov_net_stats *out)
{
    memset(out, 0, sizeof(*out));
    for (unsigned i = 0; i < net->npairs; i++) {
        const struct iov_net_stats *s = &net->pairs[i].stats;
#define SUM(field) out->field += __atomic_load_n(&s->field, __ATOMIC_RELAXED)
        SUM(rx_packets);
        SUM(rx_bytes);
        SUM(rx_dropped_filter);
        SUM(rx_dropped_nobuf_or_short);
        SUM(tx_packets);
        SUM(tx_bytes);
        SUM(tx_errors);
        SUM(notifications);
#undef SUM
    }
}

void iov_net_free(struct iov_net *net)
{
    if (!net)
        return;
    if (net->pairs) {
        if (net->stop_fd >= 0)
            iov_net_stop(net);
        for (unsigned i = 0; i < net->npairs; i++) {
            free(net->pairs[i].scratch);
            free(net->pairs[i].bounce);
        }
        free(net->pairs);
    }
    if (net->error_fd >= 0)
        close(net->error_fd);
    if (net->stop_fd >= 0)
        close(net->stop_fd);
    if (net->lock_ok)
        pthread_mutex_destroy(&net->filter_lock);
    free(net);
}
