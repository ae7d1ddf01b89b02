/* iovirt vhost-user back-end data paths: the virtio-blk and virtio-net engines (blk.c,
 * net.c) driven the way a vhost-user back-end needs them.
 *
 * The front-end (QEMU, DPDK, iovirt) owns the rings; the back-end maps its memory and is
 * told where each ring is and where to start. So, beyond the in-VMM engines:
 *  - a ring is set up with the avail index to start from (VHOST_USER_SET_VRING_BASE) and
 *    takes used_idx from the used ring in memory, so it can resume a ring in use;
 *  - GET_VRING_BASE reads back where a stopped ring stands;
 *  - the call eventfd can be replaced while the ring runs (VHOST_USER_SET_VRING_CALL);
 *  - virtio-blk keeps the inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) and
 *    resubmits what a previous back-end left in flight.
 * Split rings only. Every guest address is still checked against the memory table. */
#ifndef IOVIRT_VHOST_USER_ENGINE_H
#define IOVIRT_VHOST_USER_ENGINE_H

#include <stdint.h>

#include "blk.h"
#include "net.h"
#include "virtqueue.h"

/* Bytes of one queue's inflight region before its descriptor states (16 bytes each). */
#define IOV_VU_INFLIGHT_HEADER 16

struct iov_vu_blk; /* opaque */

struct iov_vu_blk *iov_vu_blk_new(const struct iov_mem *mem, const struct iov_blk_config *config,
                                  unsigned nqueues);
/* Set up queue q (stopped) to start at avail_base. With an inflight region (inflight_len
 * bytes at inflight) the requests it records as in flight are resubmitted first, and the
 * return value is how many; else 0. Negative errno on a bad layout. */
int iov_vu_blk_setup_queue(struct iov_vu_blk *vb, unsigned q, uint16_t size, uint64_t desc_gpa,
                           uint64_t driver_gpa, uint64_t device_gpa, uint32_t flags, int kick_fd,
                           int call_fd, uint16_t avail_base, void *inflight,
                           uint64_t inflight_len);
int iov_vu_blk_start_queue(struct iov_vu_blk *vb, unsigned q);
/* One pass on the calling thread (tests); completed requests or -errno. */
int iov_vu_blk_process_queue(struct iov_vu_blk *vb, unsigned q);
/* Stop and join every worker; rings keep their state. */
void iov_vu_blk_stop(struct iov_vu_blk *vb);
int iov_vu_blk_running(const struct iov_vu_blk *vb, unsigned q);
/* The avail index a successor starts from (after a stop), or -EINVAL. */
int iov_vu_blk_vring_base(const struct iov_vu_blk *vb, unsigned q);
void iov_vu_blk_set_call(struct iov_vu_blk *vb, unsigned q, int call_fd);
int iov_vu_blk_error_fd(const struct iov_vu_blk *vb);
int iov_vu_blk_queue_error(const struct iov_vu_blk *vb, unsigned q);
void iov_vu_blk_get_stats(const struct iov_vu_blk *vb, struct iov_blk_stats *out);
void iov_vu_blk_free(struct iov_vu_blk *vb);

struct iov_vu_net; /* opaque */

struct iov_vu_net *iov_vu_net_new(const struct iov_mem *mem, const struct iov_net_config *config,
                                  unsigned npairs);
/* Queue q (2i: rx of pair i, 2i+1: tx) set up to start at avail_base; 0 or -errno. */
int iov_vu_net_setup_queue(struct iov_vu_net *vn, unsigned q, uint16_t size, uint64_t desc_gpa,
                           uint64_t driver_gpa, uint64_t device_gpa, uint32_t flags, int kick_fd,
                           int call_fd, uint16_t avail_base);
int iov_vu_net_set_backend(struct iov_vu_net *vn, unsigned pair, int fd);
int iov_vu_net_start_pair(struct iov_vu_net *vn, unsigned pair);
int iov_vu_net_process_pair(struct iov_vu_net *vn, unsigned pair);
void iov_vu_net_stop(struct iov_vu_net *vn);
int iov_vu_net_running(const struct iov_vu_net *vn, unsigned pair);
/* Where a successor starts queue q (after a stop): chains taken but not used (a packet
 * half received, a frame waiting for the fd) are given back. -EINVAL if not set up. */
int iov_vu_net_vring_base(const struct iov_vu_net *vn, unsigned q);
void iov_vu_net_set_call(struct iov_vu_net *vn, unsigned q, int call_fd);
int iov_vu_net_error_fd(const struct iov_vu_net *vn);
int iov_vu_net_queue_error(const struct iov_vu_net *vn, unsigned q);
void iov_vu_net_get_stats(const struct iov_vu_net *vn, struct iov_net_stats *out);
void iov_vu_net_free(struct iov_vu_net *vn);

#endif
