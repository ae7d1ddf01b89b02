/* iovirt vhost-user virtio-net back-end data path: net.c, able to resume a ring.
 *
 * net.c's workers, filter and packet handling are used unchanged; a vhost-user back-end
 * needs only to start a ring at the front-end's avail index, to say where a stopped ring
 * stands, and to take a new call eventfd while running (see vhost_user_engine.h). Those
 * touch the engine's ring state, so this file compiles net.c a second time with its
 * public entry points renamed (vun_*). If net.c gains a public function, add it below. */
#define iov_net_new vun_net_new
#define iov_net_setup_queue vun_net_setup_queue
#define iov_net_set_backend vun_net_set_backend
#define iov_net_start_pair vun_net_start_pair
#define iov_net_process_pair vun_net_process_pair
#define iov_net_set_filter vun_net_set_filter
#define iov_net_stop vun_net_stop
#define iov_net_error_fd vun_net_error_fd
#define iov_net_queue_error vun_net_queue_error
#define iov_net_get_stats vun_net_get_stats
#define iov_net_free vun_net_free
#include "net.c"

#include "vhost_user_engine.h"

struct iov_vu_net {
    struct iov_net *net;
};

static struct net_queue *vu_queue(const struct iov_vu_net *vn, unsigned q)
{
    if (q >= 2 * vn->net->npairs)
        return NULL;
    struct net_pair *p = &vn->net->pairs[q / 2];
    return q % 2 == 0 ? &p->rx : &p->tx;
}

struct iov_vu_net *iov_vu_net_new(const struct iov_mem *mem, const struct iov_net_config *config,
                                  unsigned npairs)
{
    struct iov_vu_net *vn = calloc(1, sizeof(*vn));
    if (!vn)
        return NULL;
    vn->net = vun_net_new(mem, config, npairs);
    if (!vn->net) {
        int saved = errno;
        free(vn);
        errno = saved;
        return NULL;
    }
    return vn;
}

int iov_vu_net_setup_queue(struct iov_vu_net *vn, unsigned q, uint16_t size, uint64_t desc_gpa,
                           uint64_t driver_gpa, uint64_t device_gpa, uint32_t flags, int kick_fd,
                           int call_fd, uint16_t avail_base)
{
    if (flags & IOV_VQ_F_PACKED)
        return -EINVAL;
    int err = vun_net_setup_queue(vn->net, q, size, flags, desc_gpa, driver_gpa, device_gpa,
                                  kick_fd, call_fd);
    if (err)
        return err;
    struct iov_vq *ring = &vu_queue(vn, q)->vq;
    const uint16_t *used = ring->device; /* flags, idx, ring[] */
    ring->used_idx = ring->published_used = le16toh(__atomic_load_n(&used[1], __ATOMIC_ACQUIRE));
    ring->last_avail_idx = avail_base;
    return 0;
}

int iov_vu_net_set_backend(struct iov_vu_net *vn, unsigned pair, int fd)
{
    return vun_net_set_backend(vn->net, pair, fd);
}

int iov_vu_net_start_pair(struct iov_vu_net *vn, unsigned pair)
{
    return vun_net_start_pair(vn->net, pair);
}

int iov_vu_net_process_pair(struct iov_vu_net *vn, unsigned pair)
{
    return vun_net_process_pair(vn->net, pair);
}

void iov_vu_net_stop(struct iov_vu_net *vn)
{
    vun_net_stop(vn->net);
}

int iov_vu_net_running(const struct iov_vu_net *vn, unsigned pair)
{
    return pair < vn->net->npairs && vn->net->pairs[pair].running;
}

int iov_vu_net_vring_base(const struct iov_vu_net *vn, unsigned q)
{
    struct net_queue *queue = vu_queue(vn, q);
    if (!queue || !queue->configured)
        return -EINVAL;
    const struct net_pair *p = &vn->net->pairs[q / 2];
    /* Chains are used in the order they are taken: those still held go back. */
    uint16_t outstanding = q % 2 == 0 ? (uint16_t)p->nheld : (uint16_t)(p->tx_pending != 0);
    return (uint16_t)(queue->vq.last_avail_idx - outstanding);
}

void iov_vu_net_set_call(struct iov_vu_net *vn, unsigned q, int call_fd)
{
    struct net_queue *queue = vu_queue(vn, q);
    if (queue)
        __atomic_store_n(&queue->call_fd, call_fd, __ATOMIC_RELEASE);
}

int iov_vu_net_error_fd(const struct iov_vu_net *vn)
{
    return vun_net_error_fd(vn->net);
}

int iov_vu_net_queue_error(const struct iov_vu_net *vn, unsigned q)
{
    return vun_net_queue_error(vn->net, q);
}

void iov_vu_net_get_stats(const struct iov_vu_net *vn, struct iov_net_stats *out)
{
    vun_net_get_stats(vn->net, out);
}

void iov_vu_net_free(struct iov_vu_net *vn)
{
    if (!vn)
        return;
    vun_net_free(vn->net);
    free(vn);
}
