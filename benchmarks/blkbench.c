/*
 * blkbench: block-device throughput from inside a guest, for benchmarks/blk.py.
 *
 *   blkbench DEVICE MODE BS QD SECONDS [SPAN_MIB]
 *
 * MODE is seqread, seqwrite, randread or randwrite. The device is opened with O_DIRECT,
 * so every request reaches the (virtual) disk instead of the guest's page cache, and QD
 * requests are kept in flight with Linux native AIO, called through raw syscalls so that
 * the tool needs nothing but libc and links statically. Sequential modes walk the first
 * SPAN_MIB MiB (default: the whole device) and wrap; random modes pick BS-aligned offsets
 * in it from a fixed-seed xorshift, so every run and every VMM sees the same sequence.
 * After SECONDS no new request is issued; the ones in flight are waited for, and writes
 * end with fdatasync (a flush the disk must honour), all inside the measured time. Prints
 *
 *   blkbench MODE bs=BS qd=QD ios=N bytes=N seconds=S MBps=X iops=Y
 *
 * with MB = 10^6 bytes. Exit status 1 on any error or short transfer.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_QD 256
#define ALIGN 4096 /* O_DIRECT buffer alignment; covers every logical block size */
#define MIB (1024ULL * 1024)

static long io_setup(unsigned nr, aio_context_t *ctx) { return syscall(SYS_io_setup, nr, ctx); }
static long io_destroy(aio_context_t ctx) { return syscall(SYS_io_destroy, ctx); }
static long io_submit(aio_context_t ctx, long n, struct iocb **iocbs)
{
	return syscall(SYS_io_submit, ctx, n, iocbs);
}
static long io_getevents(aio_context_t ctx, long min, long max, struct io_event *events)
{
	return syscall(SYS_io_getevents, ctx, min, max, events, NULL);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "blkbench: %s: %s\n", what, strerror(errno));
	exit(1);
}

struct job {
	int write, random;
	uint64_t bs, blocks; /* blocks: BS-sized slots in the span */
	uint64_t next;       /* sequential: next slot */
	uint64_t rng;        /* random: xorshift64 state */
};

static uint64_t next_offset(struct job *j)
{
	uint64_t slot;

	if (j->random) {
		j->rng ^= j->rng << 13;
		j->rng ^= j->rng >> 7;
		j->rng ^= j->rng << 17;
		slot = j->rng % j->blocks;
	} else {
		slot = j->next;
		j->next = (j->next + 1) % j->blocks;
	}
	return slot * j->bs;
}

static void prepare(struct iocb *cb, struct job *j, int fd, void *buf, unsigned slot)
{
	memset(cb, 0, sizeof(*cb));
	cb->aio_data = slot;
	cb->aio_lio_opcode = j->write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
	cb->aio_fildes = fd;
	cb->aio_buf = (uintptr_t)buf;
	cb->aio_nbytes = j->bs;
	cb->aio_offset = next_offset(j);
}

static uint64_t device_size(int fd)
{
	struct stat st;
	uint64_t size;

	if (fstat(fd, &st) < 0)
		die("fstat");
	if (!S_ISBLK(st.st_mode))
		return st.st_size;
	if (ioctl(fd, BLKGETSIZE64, &size) < 0)
		die("BLKGETSIZE64");
	return size;
}

static int usage(void)
{
	fprintf(stderr, "usage: blkbench DEVICE seqread|seqwrite|randread|randwrite BS QD SECONDS "
			"[SPAN_MIB]\n");
	return 2;
}

int main(int argc, char **argv)
{
	static struct iocb cbs[MAX_QD];
	static struct iocb *ptrs[MAX_QD];
	static struct io_event events[MAX_QD];
	static void *bufs[MAX_QD];
	struct job j = { .rng = 0x9e3779b97f4a7c15ULL };
	aio_context_t ctx = 0;
	uint64_t size, span, ios = 0;
	unsigned qd, i, inflight = 0;
	double seconds, start, deadline, elapsed;
	const char *mode;
	int fd;

	if (argc < 6 || argc > 7)
		return usage();
	mode = argv[2];
	if (!strcmp(mode, "seqread") || !strcmp(mode, "randread"))
		j.write = 0;
	else if (!strcmp(mode, "seqwrite") || !strcmp(mode, "randwrite"))
		j.write = 1;
	else
		return usage();
	j.random = !strncmp(mode, "rand", 4);
	j.bs = strtoull(argv[3], NULL, 0);
	qd = strtoul(argv[4], NULL, 0);
	seconds = strtod(argv[5], NULL);
	if (j.bs == 0 || j.bs % 512 || qd == 0 || qd > MAX_QD || !(seconds > 0))
		return usage();

	fd = open(argv[1], (j.write ? O_RDWR : O_RDONLY) | O_DIRECT);
	if (fd < 0)
		die(argv[1]);
	size = device_size(fd);
	span = argc == 7 ? strtoull(argv[6], NULL, 0) * MIB : size;
	if (span > size)
		span = size;
	j.blocks = span / j.bs;
	if (j.blocks == 0) {
		fprintf(stderr, "blkbench: span of %llu bytes holds no %llu-byte block\n",
			(unsigned long long)span, (unsigned long long)j.bs);
		return 1;
	}

	for (i = 0; i < qd; i++) {
		if (posix_memalign(&bufs[i], ALIGN, j.bs))
			die("posix_memalign");
		/* Writes carry data, not zeroes, in case a layer below treats zeroes specially. */
		memset(bufs[i], 0xa5 ^ i, j.bs);
	}
	if (io_setup(qd, &ctx) < 0)
		die("io_setup");

	start = now();
	deadline = start + seconds;
	for (i = 0; i < qd; i++) {
		prepare(&cbs[i], &j, fd, bufs[i], i);
		ptrs[i] = &cbs[i];
	}
	if (io_submit(ctx, qd, ptrs) != (long)qd)
		die("io_submit");
	inflight = qd;

	while (inflight > 0) {
		long n = io_getevents(ctx, 1, inflight, events);
		unsigned again = 0;
		int more;

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("io_getevents");
		}
		more = now() < deadline;
		for (long e = 0; e < n; e++) {
			unsigned slot = events[e].data;

			if (events[e].res != (int64_t)j.bs) {
				fprintf(stderr, "blkbench: request at %llu: result %lld (%s)\n",
					(unsigned long long)cbs[slot].aio_offset, (long long)events[e].res,
					events[e].res < 0 ? strerror(-events[e].res) : "short transfer");
				return 1;
			}
			ios++;
			inflight--;
			if (more) {
				prepare(&cbs[slot], &j, fd, bufs[slot], slot);
				ptrs[again++] = &cbs[slot];
			}
		}
		/* Resubmit the whole batch in one call, as fio's libaio engine does. */
		if (again > 0) {
			if (io_submit(ctx, again, ptrs) != (long)again)
				die("io_submit");
			inflight += again;
		}
	}
	if (j.write && fdatasync(fd) < 0)
		die("fdatasync");
	elapsed = now() - start;
	io_destroy(ctx);
	close(fd);

	printf("blkbench %s bs=%llu qd=%u ios=%llu bytes=%llu seconds=%.3f MBps=%.2f iops=%.1f\n",
	       mode, (unsigned long long)j.bs, qd, (unsigned long long)ios,
	       (unsigned long long)(ios * j.bs), elapsed, ios * j.bs / elapsed / 1e6,
	       ios / elapsed);
	return 0;
}
