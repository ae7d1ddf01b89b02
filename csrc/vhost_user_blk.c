/* iovirt vhost-user virtio-blk back-end data path: blk.c's request handling, run by a worker
 * that can start a ring in the middle of its life and keeps the vhost-user inflight region.
 *
 * A vhost-user back-end differs from the in-VMM device in two ways blk.c does not cover:
 *  - a ring may start where a previous back-end left it (VHOST_USER_SET_VRING_BASE), so
 *    last_avail_idx comes from the front-end and used_idx from the used ring in memory;
 *  - with VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD every request is recorded in a region that
 *    the front-end keeps across back-end restarts; a new back-end resubmits what the old
 *    one had taken and not completed ("Inflight I/O tracking" in QEMU's
 *    docs/interop/vhost-user.rst), so a crash or restart loses no request.
 *
 * To use blk.c's request parser and file I/O unchanged (one implementation, one set of
 * tests), this file compiles blk.c a second time with its public entry points renamed
 * (vub_*), which gives it the engine's internals (struct blk_queue, blk_handle). Only
 * the worker loop is ours. If blk.c gains a public function, add it to the list below.
 *
 * Only split rings are served here (the back-ends do not offer VIRTIO_F_RING_PACKED). */
#define iov_blk_new vub_blk_new
#define iov_blk_setup_queue vub_blk_setup_queue
#define iov_blk_start_queue vub_blk_start_queue
#define iov_blk_process_queue vub_blk_process_queue
#define iov_blk_stop vub_blk_stop
#define iov_blk_error_fd vub_blk_error_fd
#define iov_blk_queue_error vub_blk_queue_error
#define iov_blk_get_stats vub_blk_get_stats
#define iov_blk_free vub_blk_free
#include "blk.c"

#include "vhost_user_engine.h"

/* The inflight region of one split queue (vhost-user.rst, "Inflight I/O tracking"). */
struct vu_desc_state_split {
    uint8_t inflight; /* the head descriptor is taken and not yet used */
    uint8_t padding[5];
    uint16_t next;    /* batch list (unused here: we put one request at a time) */
    uint64_t counter; /* order in which heads were taken */
};

struct vu_queue_region_split {
    uint64_t features;
    uint16_t version; /* 0: not initialised yet; 1: this layout */
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx; /* used->idx as of the last completed put */
    struct vu_desc_state_split desc[];
};

_Static_assert(sizeof(struct vu_desc_state_split) == 16, "inflight descriptor state");
_Static_assert(sizeof(struct vu_queue_region_split) == IOV_VU_INFLIGHT_HEADER, "inflight header");

struct vu_resubmit {
    uint64_t counter;
    uint16_t head;
};

struct vu_blk_queue {
    struct iov_vu_blk *owner;
    struct blk_queue *q;
    struct vu_queue_region_split *inflight; /* NULL: no inflight tracking */
    uint64_t counter;
    struct vu_resubmit *resubmit; /* requests to run again before the ring's own */
    uint32_t nresubmit;
};

struct iov_vu_blk {
    struct iov_blk *blk;
    struct vu_blk_queue *queues;
};

static uint16_t used_ring_idx(const struct iov_vq *vq)
{
    const uint16_t *used = vq->device; /* flags, idx, ring[] */
    return le16toh(__atomic_load_n(&used[1], __ATOMIC_ACQUIRE));
}

static int resubmit_order(const void *a, const void *b)
{
    const struct vu_resubmit *x = a, *y = b;
    return x->counter < y->counter ? -1 : x->counter > y->counter;
}

/* Take the inflight region over at ring start: initialise a fresh one, or collect what the
 * previous back-end left in flight. Returns the number of requests to resubmit. */
static int inflight_load(struct vu_blk_queue *vq, uint16_t used)
{
    struct vu_queue_region_split *r = vq->inflight;
    uint16_t size = vq->q->vq.size;
    free(vq->resubmit);
    vq->resubmit = NULL;
    vq->nresubmit = 0;
    vq->counter = 0;
    if (r->version != 1 || r->desc_num != size) {
        memset(r->desc, 0, sizeof(r->desc[0]) * size);
        r->features = 0;
        r->desc_num = size;
        r->last_batch_head = 0;
        r->used_idx = used;
        __atomic_store_n(&r->version, 1, __ATOMIC_RELEASE);
        return 0;
    }
    /* The old back-end died between publishing used->idx and clearing the head's flag:
     * that request did complete. */
    if (r->used_idx != used) {
        if (r->last_batch_head < size)
            r->desc[r->last_batch_head].inflight = 0;
        r->used_idx = used;
    }
    uint32_t n = 0;
    uint64_t max_counter = 0;
    for (uint32_t i = 0; i < size; i++) {
        if (r->desc[i].inflight == 1)
            n++;
        else
            r->desc[i].inflight = 0; /* anything else is garbage: not in flight */
    }
    if (n == 0)
        return 0;
    vq->resubmit = calloc(n, sizeof(*vq->resubmit));
    if (!vq->resubmit)
        return -ENOMEM;
    for (uint32_t i = 0, j = 0; i < size && j < n; i++) {
        if (r->desc[i].inflight == 1) {
            vq->resubmit[j].head = (uint16_t)i;
            vq->resubmit[j].counter = r->desc[i].counter;
            if (r->desc[i].counter > max_counter)
                max_counter = r->desc[i].counter;
            j++;
        }
    }
    qsort(vq->resubmit, n, sizeof(*vq->resubmit), resubmit_order);
    vq->nresubmit = n;
    vq->counter = max_counter + 1;
    return (int)n;
}

static void inflight_get(struct vu_blk_queue *vq, uint16_t head)
{
    struct vu_queue_region_split *r = vq->inflight;
    if (!r)
        return;
    r->desc[head].counter = vq->counter++;
    __atomic_store_n(&r->desc[head].inflight, 1, __ATOMIC_RELEASE);
}

/* Complete one request: record it as the batch head, publish the used entry, then clear
 * its flag and record the used index (the order recovery relies on). */
static void put_one(struct vu_blk_queue *vq, uint16_t head, uint16_t ndescs, uint32_t len)
{
    struct iov_vq *ring = &vq->q->vq;
    struct vu_queue_region_split *r = vq->inflight;
    if (r)
        r->last_batch_head = head;
    iov_vq_add_used(ring, head, ndescs, len);
    if (!r)
        return; /* without inflight tracking the flush is batched by the caller */
    iov_vq_flush_used(ring);
    __atomic_store_n(&r->desc[head].inflight, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&r->used_idx, ring->used_idx, __ATOMIC_RELEASE);
}

static void notify(struct vu_blk_queue *vq)
{
    struct blk_queue *q = vq->q;
    if (iov_vq_needs_notification(&q->vq)) {
        signal_fd(__atomic_load_n(&q->call_fd, __ATOMIC_ACQUIRE));
        STAT_ADD(q, notifications, 1);
    }
}

static int break_queue(struct vu_blk_queue *vq, int err)
{
    struct iov_vq *ring = &vq->q->vq;
    if (!ring->broken) {
        ring->broken = 1;
        ring->error = err;
    }
    queue_broke(vq->q, ring->error);
    return ring->error;
}

/* Run the requests the previous back-end left in flight, in the order it took them. The
 * chain is walked from its head with the engine's checks: a copy of the ring state whose
 * avail ring is a private one-entry ring naming that head. */
static int resubmit(struct vu_blk_queue *vq)
{
    struct blk_queue *q = vq->q;
    struct iov_chain *chain = &q->scratch->chain;
    uint16_t private_avail[3]; /* flags, idx, ring[0] */
    int done = 0;
    for (uint32_t i = 0; i < vq->nresubmit; i++) {
        uint16_t head = vq->resubmit[i].head;
        struct iov_vq walk = q->vq;
        private_avail[0] = 0;
        private_avail[1] = htole16(1);
        private_avail[2] = htole16(head);
        walk.driver = private_avail;
        walk.last_avail_idx = 0;
        int r = iov_vq_pop(&walk, q->blk->mem, chain);
        if (r != 1)
            return break_queue(vq, r < 0 ? walk.error : -EINVAL);
        uint32_t len = blk_handle(q, chain);
        put_one(vq, chain->head, chain->ndescs, len);
        done++;
    }
    free(vq->resubmit);
    vq->resubmit = NULL;
    vq->nresubmit = 0;
    iov_vq_flush_used(&q->vq);
    if (done)
        notify(vq);
    return done;
}

/* blk.c's process() with the inflight bookkeeping around every request. */
static int vu_process(struct vu_blk_queue *vq)
{
    struct blk_queue *q = vq->q;
    struct iov_vq *ring = &q->vq;
    struct iov_chain *chain = &q->scratch->chain;
    int total = 0;
    if (ring->broken)
        return ring->error;
    if (vq->nresubmit) {
        int r = resubmit(vq);
        if (r < 0)
            return r;
        total += r;
    }
    for (;;) {
        int batch = 0, err = 0;
        iov_vq_disable_notification(ring);
        for (;;) {
            int r = iov_vq_pop(ring, q->blk->mem, chain);
            if (r < 0) {
                err = r;
                break;
            }
            if (r == 0)
                break;
            inflight_get(vq, chain->head);
            uint32_t len = blk_handle(q, chain);
            put_one(vq, chain->head, chain->ndescs, len);
            batch++;
        }
        iov_vq_flush_used(ring);
        if (batch > 0)
            notify(vq);
        if (total <= INT_MAX - batch)
            total += batch;
        if (err) {
            queue_broke(q, ring->error);
            return ring->error;
        }
        if (!iov_vq_enable_notification(ring))
            break;
    }
    return total;
}

static void *vu_worker(void *arg)
{
    struct vu_blk_queue *vq = arg;
    struct blk_queue *q = vq->q;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);

    struct pollfd fds[2] = {
        {.fd = q->blk->stop_fd, .events = POLLIN},
        {.fd = q->kick_fd, .events = POLLIN},
    };
    /* Resubmissions and anything queued before the first kick go now. */
    int alive = vu_process(vq) >= 0;
    for (;;) {
        int r = poll(fds, alive ? 2 : 1, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[0].revents)
            break;
        if (!alive)
            continue;
        if (fds[1].revents & (POLLERR | POLLNVAL | POLLHUP)) {
            alive = 0;
            continue;
        }
        if (fds[1].revents & POLLIN) {
            uint64_t v;
            if (read(q->kick_fd, &v, sizeof(v)) < 0 && errno != EAGAIN && errno != EINTR) {
                alive = 0;
                continue;
            }
            if (vu_process(vq) < 0)
                alive = 0;
        }
    }
    return NULL;
}

/* ---- public API ----------------------------------------------------------------- */

struct iov_vu_blk *iov_vu_blk_new(const struct iov_mem *mem, const struct iov_blk_config *config,
                                  unsigned nqueues)
{
    struct iov_vu_blk *vb = calloc(1, sizeof(*vb));
    if (!vb)
        return NULL;
    vb->blk = vub_blk_new(mem, config, nqueues);
    if (!vb->blk) {
        int saved = errno;
        free(vb);
        errno = saved;
        return NULL;
    }
    vb->queues = calloc(nqueues, sizeof(*vb->queues));
    if (!vb->queues) {
        vub_blk_free(vb->blk);
        free(vb);
        errno = ENOMEM;
        return NULL;
    }
    for (unsigned i = 0; i < nqueues; i++) {
        vb->queues[i].owner = vb;
        vb->queues[i].q = &vb->blk->queues[i];
    }
    return vb;
}

int iov_vu_blk_setup_queue(struct iov_vu_blk *vb, unsigned q, uint16_t size, uint64_t desc_gpa,
                           uint64_t driver_gpa, uint64_t device_gpa, uint32_t flags, int kick_fd,
                           int call_fd, uint16_t avail_base, void *inflight,
                           uint64_t inflight_len)
{
    if (q >= vb->blk->nqueues || (flags & IOV_VQ_F_PACKED))
        return -EINVAL;
    struct vu_blk_queue *vq = &vb->queues[q];
    if (inflight && inflight_len < IOV_VU_INFLIGHT_HEADER + 16ull * size)
        return -EINVAL;
    int err = vub_blk_setup_queue(vb->blk, q, size, flags, desc_gpa, driver_gpa, device_gpa,
                                  kick_fd, call_fd);
    if (err)
        return err;
    struct iov_vq *ring = &vq->q->vq;
    uint16_t used = used_ring_idx(ring);
    /* The used ring goes on where it is; the avail side where the front-end says. */
    ring->used_idx = ring->published_used = used;
    ring->last_avail_idx = avail_base;
    vq->inflight = inflight;
    if (!inflight)
        return 0;
    int n = inflight_load(vq, used);
    if (n < 0)
        return n;
    /* What was in flight is taken already: the ring's own requests start after it. */
    ring->last_avail_idx = (uint16_t)(used + n);
    return n;
}

int iov_vu_blk_start_queue(struct iov_vu_blk *vb, unsigned q)
{
    if (q >= vb->blk->nqueues)
        return -EINVAL;
    struct blk_queue *queue = &vb->blk->queues[q];
    if (!queue->configured || queue->kick_fd < 0)
        return -EINVAL;
    if (queue->running)
        return -EBUSY;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int err = pthread_create(&queue->thread, NULL, vu_worker, &vb->queues[q]);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err)
        return -err;
    queue->running = 1;
    return 0;
}

int iov_vu_blk_process_queue(struct iov_vu_blk *vb, unsigned q)
{
    if (q >= vb->blk->nqueues)
        return -EINVAL;
    struct blk_queue *queue = &vb->blk->queues[q];
    if (!queue->configured)
        return -EINVAL;
    if (queue->running)
        return -EBUSY;
    return vu_process(&vb->queues[q]);
}

void iov_vu_blk_stop(struct iov_vu_blk *vb)
{
    vub_blk_stop(vb->blk); /* our workers watch the same stop fd */
}

int iov_vu_blk_running(const struct iov_vu_blk *vb, unsigned q)
{
    return q < vb->blk->nqueues && vb->blk->queues[q].running;
}

int iov_vu_blk_vring_base(const struct iov_vu_blk *vb, unsigned q)
{
    if (q >= vb->blk->nqueues || !vb->blk->queues[q].configured)
        return -EINVAL;
    /* Requests complete in the order they are taken, so after a stop every taken
     * request is used and last_avail_idx is where a successor starts. */
    return vb->blk->queues[q].vq.last_avail_idx;
}

void iov_vu_blk_set_call(struct iov_vu_blk *vb, unsigned q, int call_fd)
{
    if (q < vb->blk->nqueues)
        __atomic_store_n(&vb->blk->queues[q].call_fd, call_fd, __ATOMIC_RELEASE);
}

int iov_vu_blk_error_fd(const struct iov_vu_blk *vb)
{
    return vub_blk_error_fd(vb->blk);
}

int iov_vu_blk_queue_error(const struct iov_vu_blk *vb, unsigned q)
{
    return vub_blk_queue_error(vb->blk, q);
}

void iov_vu_blk_get_stats(const struct iov_vu_blk *vb, struct iov_blk_stats *out)
{
    vub_blk_get_stats(vb->blk, out);
}

void iov_vu_blk_free(struct iov_vu_blk *vb)
{
    if (!vb)
        return;
    if (vb->queues) {
        vub_blk_stop(vb->blk);
        for (unsigned i = 0; i < vb->blk->nqueues; i++)
            free(vb->queues[i].resubmit);
        free(vb->queues);
    }
    vub_blk_free(vb->blk);
    free(vb);
}
