/*
 * netbench: TCP throughput between a guest and its host side, for benchmarks/net.py.
 *
 *   netbench server PORT [CONNECTIONS]
 *   netbench client HOST PORT send|recv SECONDS
 *
 * The client connects and says what it wants in a 16-byte hello ("NETBENCH", the
 * direction as 'S' or 'R', the duration in milliseconds as a decimal string):
 *
 *   send  the client writes for SECONDS, then shuts its write half down;
 *   recv  the server writes for SECONDS, then shuts its write half down.
 *
 * In both directions the receiving side counts the bytes from its first byte to the
 * sender's end of stream, so the figure is what arrived, not what was queued in socket
 * buffers. The receiver then writes its count back (one text line) and closes; the client
 * prints the receiver's figure as
 *
 *   netbench DIR bytes=N seconds=S Mbps=X
 *
 * with Mbit = 10^6 bits. The server handles CONNECTIONS connections one after another
 * (default: until killed) and prints the same line for each, prefixed "netbench-server".
 * Everything is plain libc, so that the tool links statically and runs in a busybox
 * initramfs. Exit status 1 on any error; a peer that stalls for SECONDS + 60 s ends it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE (256 * 1024) /* per write/read: large enough that syscalls are not the cost */
#define HELLO_SIZE 16
#define HELLO_MAGIC "NETBENCH"
#define REPORT_SIZE 64
#define STALL_GRACE 60 /* seconds past the run before a silent peer counts as hung */
#define MAX_SECONDS 3600

static char buf[BUF_SIZE];

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "netbench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *what)
{
	fprintf(stderr, "netbench: %s\n", what);
	exit(1);
}

static void write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t done = send(fd, p, n, MSG_NOSIGNAL);
		if (done < 0) {
			if (errno == EINTR)
				continue;
			die("send");
		}
		p += done;
		n -= (size_t)done;
	}
}

/* Read exactly n bytes; 0 if the peer closed first. */
static int read_exact(int fd, char *p, size_t n)
{
	while (n > 0) {
		ssize_t got = recv(fd, p, n, 0);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			die("recv");
		}
		if (got == 0)
			return 0;
		p += got;
		n -= (size_t)got;
	}
	return 1;
}

/* Write for `seconds`, then end the stream (write half only: the report comes back).
 * Returns the bytes written. */
static unsigned long long send_for(int fd, double seconds)
{
	double end = now() + seconds;
	unsigned long long sent = 0;
	size_t i;

	/* Not all zeros: nothing on the path may take a shortcut for a zero page. */
	for (i = 0; i < sizeof(buf); i++)
		buf[i] = (char)(i * 131 + 7);
	while (now() < end) {
		write_all(fd, buf, sizeof(buf));
		sent += sizeof(buf);
	}
	if (shutdown(fd, SHUT_WR) < 0)
		die("shutdown");
	return sent;
}

/* Count bytes until the sender's end of stream; timed from the first byte. */
static void receive_all(int fd, unsigned long long *bytes, double *seconds)
{
	double start = 0;
	unsigned long long total = 0;

	for (;;) {
		ssize_t got = recv(fd, buf, sizeof(buf), 0);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			die("recv");
		}
		if (got == 0)
			break;
		if (total == 0)
			start = now();
		total += (unsigned long long)got;
	}
	*bytes = total;
	*seconds = total ? now() - start : 0;
}

static void print_result(const char *prefix, const char *dir, unsigned long long bytes,
			 double seconds)
{
	double mbps = seconds > 0 ? bytes * 8.0 / seconds / 1e6 : 0;
	printf("%s %s bytes=%llu seconds=%.3f Mbps=%.1f\n", prefix, dir, bytes, seconds, mbps);
	fflush(stdout);
}

static void send_report(int fd, unsigned long long bytes, double seconds)
{
	char report[REPORT_SIZE];
	int n = snprintf(report, sizeof(report), "%llu %.6f\n", bytes, seconds);
	write_all(fd, report, (size_t)n);
}

static void read_report(int fd, unsigned long long *bytes, double *seconds)
{
	char report[REPORT_SIZE];
	size_t len = 0;

	for (;;) {
		ssize_t got = recv(fd, report + len, sizeof(report) - 1 - len, 0);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			die("recv report");
		}
		if (got == 0)
			break;
		len += (size_t)got;
		if (len == sizeof(report) - 1)
			break;
	}
	report[len] = 0;
	if (sscanf(report, "%llu %lf", bytes, seconds) != 2)
		fail("no report from the receiver");
}

static double parse_seconds(const char *text)
{
	char *end;
	double s = strtod(text, &end);
	if (*end || !(s > 0) || s > MAX_SECONDS)
		fail("SECONDS must be a number of seconds between 0 and 3600");
	return s;
}

static int parse_port(const char *text)
{
	char *end;
	long port = strtol(text, &end, 10);
	if (*end || port < 1 || port > 65535)
		fail("PORT must be 1-65535");
	return (int)port;
}

static void serve_one(int fd)
{
	char hello[HELLO_SIZE + 1];
	char dir;
	long ms;
	unsigned long long bytes;
	double seconds;

	if (!read_exact(fd, hello, HELLO_SIZE))
		fail("client closed before its hello");
	hello[HELLO_SIZE] = 0;
	if (memcmp(hello, HELLO_MAGIC, strlen(HELLO_MAGIC)) != 0)
		fail("not a netbench client");
	dir = hello[strlen(HELLO_MAGIC)];
	ms = strtol(hello + strlen(HELLO_MAGIC) + 1, NULL, 10);
	if (ms <= 0 || ms > MAX_SECONDS * 1000L)
		fail("bad duration in hello");
	alarm((unsigned)(ms / 1000 + STALL_GRACE));
	if (dir == 'S') {
		receive_all(fd, &bytes, &seconds);
		send_report(fd, bytes, seconds);
		print_result("netbench-server", "send", bytes, seconds);
	} else if (dir == 'R') {
		bytes = send_for(fd, ms / 1000.0);
		/* The client measures what arrived; wait for its close so all of it is out. */
		while (recv(fd, buf, sizeof(buf), 0) > 0)
			;
		print_result("netbench-server", "recv(sent)", bytes, ms / 1000.0);
	} else {
		fail("bad direction in hello");
	}
	alarm(0);
}

static int server(int port, long connections)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	int one = 1;
	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	long served;

	if (lfd < 0)
		die("socket");
	if (setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
		die("SO_REUSEADDR");
	addr.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("bind");
	if (listen(lfd, 4) < 0)
		die("listen");
	printf("netbench-server listening on %d\n", port);
	fflush(stdout);
	for (served = 0; connections <= 0 || served < connections; served++) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR)
				continue;
			die("accept");
		}
		serve_one(fd);
		close(fd);
	}
	close(lfd);
	return 0;
}

static int client(const char *host, int port, const char *dir, double seconds)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	char hello[HELLO_SIZE + 1];
	unsigned long long bytes;
	double took;
	int sending;
	int fd;

	if (strcmp(dir, "send") == 0)
		sending = 1;
	else if (strcmp(dir, "recv") == 0)
		sending = 0;
	else
		fail("direction must be send or recv");
	if (inet_pton(AF_INET, host, &addr.sin_addr) != 1)
		fail("HOST must be an IPv4 address");
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket");
	alarm((unsigned)seconds + STALL_GRACE);
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("connect");
	memset(hello, 0, sizeof(hello));
	snprintf(hello, sizeof(hello), "%s%c%06ld", HELLO_MAGIC, sending ? 'S' : 'R',
		 (long)(seconds * 1000));
	write_all(fd, hello, HELLO_SIZE);
	if (sending) {
		send_for(fd, seconds);
		read_report(fd, &bytes, &took);
	} else {
		receive_all(fd, &bytes, &took);
	}
	close(fd);
	print_result("netbench", dir, bytes, took);
	return bytes > 0 ? 0 : 1;
}

static void usage(void)
{
	fputs("usage: netbench server PORT [CONNECTIONS]\n"
	      "       netbench client HOST PORT send|recv SECONDS\n",
	      stderr);
	exit(2);
}

int main(int argc, char **argv)
{
	/* Default SIGALRM action ends the process: a hung peer cannot hang the benchmark. */
	if (argc >= 3 && strcmp(argv[1], "server") == 0 && argc <= 4)
		return server(parse_port(argv[2]), argc == 4 ? strtol(argv[3], NULL, 10) : 0);
	if (argc == 6 && strcmp(argv[1], "client") == 0)
		return client(argv[2], parse_port(argv[3]), argv[4], parse_seconds(argv[5]));
	usage();
	return 2;
}
