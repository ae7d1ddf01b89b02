/* iovirt virtio-net data path: RX and TX between a tap (or any packet fd) and guest
 * buffers, in one C worker thread per queue pair.
 *
 * Python (iovirt.virtio.net) owns features, config space, the control queue, the tap's
 * offload settings and reset; when the driver sets DRIVER_OK it hands each queue pair to
 * the engine. Queue numbering is virtio's: pair i uses receiveq 2i and transmitq 2i+1.
 *
 * The backend fd carries one packet per read/write, each preceded by a virtio-net header
 * of hdr_len bytes (a tap with IFF_VNET_HDR and TUNSETVNETHDRSZ = hdr_len; in tests, a
 * SOCK_SEQPACKET socket). TX writev()s the guest's readable buffers straight to the fd
 * (the guest's header first, as the driver wrote it). RX reads one packet into a bounce
 * buffer, applies the receive filter, then copies it into one guest chain, or into as
 * many chains as it needs with VIRTIO_NET_F_MRG_RXBUF (num_buffers in the header says
 * how many). When the guest has no receive buffers the worker stops reading the fd
 * (backpressure stays in the tap's queue) until the guest kicks the receive queue. */
#ifndef IOVIRT_NET_H
#define IOVIRT_NET_H

#include <stdint.h>

#include "virtqueue.h"

#define IOV_NET_MAX_PAIRS 16
#define IOV_NET_MAX_FILTER_MACS 64
/* Largest packet: a 64 KiB GSO frame plus an Ethernet header. */
#define IOV_NET_MAX_PACKET (65536 + 14)

struct iov_net_config {
    uint32_t hdr_len;   /* bytes of virtio-net header on both sides: 12 (virtio_net_hdr_v1) */
    uint8_t mrg_rxbuf;  /* VIRTIO_NET_F_MRG_RXBUF negotiated */
};

/* The receive filter (virtio 1.2, 5.1.6.5.1-2: VIRTIO_NET_CTRL_RX and _MAC). A frame is
 * delivered if promisc, or broadcast (unless nobcast), or multicast and (allmulti or in
 * multicast[] unless nomulti), or unicast and (alluni or equal to one of unicast[] unless
 * nouni). The device's own MAC is unicast[0] when Python sets it so. */
struct iov_net_filter {
    uint8_t promisc, allmulti, alluni, nomulti, nouni, nobcast;
    uint32_t n_unicast;
    uint32_t n_multicast;
    uint8_t unicast[IOV_NET_MAX_FILTER_MACS][6];
    uint8_t multicast[IOV_NET_MAX_FILTER_MACS][6];
};

struct iov_net_stats {
    uint64_t rx_packets, rx_bytes, rx_dropped_filter, rx_dropped_nobuf_or_short;
    uint64_t tx_packets, tx_bytes, tx_errors; /* tx_errors: malformed chain or write failure */
    uint64_t notifications;
};

struct iov_net; /* opaque */

struct iov_net *iov_net_new(const struct iov_mem *mem, const struct iov_net_config *config,
                            unsigned npairs);

/* Queue q (2i = rx of pair i, 2i+1 = tx of pair i); see iov_vq_setup. 0 or -errno. */
int iov_net_setup_queue(struct iov_net *net, unsigned q, uint16_t size, uint32_t flags,
                        uint64_t desc_gpa, uint64_t driver_gpa, uint64_t device_gpa, int kick_fd,
                        int call_fd);

/* The packet fd of pair i (the engine sets O_NONBLOCK on it; it does not close it). */
int iov_net_set_backend(struct iov_net *net, unsigned pair, int fd);

/* Start the worker of pair i (both its queues set up, backend set). 0 or -errno. */
int iov_net_start_pair(struct iov_net *net, unsigned pair);

/* One pass on the calling thread, for tests and the fuzzer (no worker running on it):
 * transmit every available TX chain, then receive packets from the fd while there are
 * packets and RX buffers. Returns packets moved (rx + tx), or -errno if a queue broke. */
int iov_net_process_pair(struct iov_net *net, unsigned pair);

/* Replace the receive filter (thread-safe against running workers). */
void iov_net_set_filter(struct iov_net *net, const struct iov_net_filter *filter);

/* Stop and join every worker (idempotent). */
void iov_net_stop(struct iov_net *net);

/* eventfd signalled when a queue breaks (the device then needs a reset). */
int iov_net_error_fd(const struct iov_net *net);

/* 0 if queue q is healthy, else the negative errno that broke it. */
int iov_net_queue_error(const struct iov_net *net, unsigned q);

void iov_net_get_stats(const struct iov_net *net, struct iov_net_stats *out);

/* Stop workers and free (closes no fds). */
void iov_net_free(struct iov_net *net);

#endif
