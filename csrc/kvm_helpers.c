/* Thin syscall helpers for the VMM core (see native.h for why they exist). */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>

#include "native.h"

int iovirt_ioctl_ptr(int fd, unsigned long request, void *arg)
{
    int ret = ioctl(fd, request, arg);
    return ret < 0 ? -errno : ret;
}

int iovirt_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    int ret = ioctl(fd, request, arg);
    return ret < 0 ? -errno : ret;
}

int iovirt_kvm_run(int vcpu_fd)
{
    int ret = ioctl(vcpu_fd, KVM_RUN, 0);
    return ret < 0 ? -errno : ret;
}

static void kick_handler(int signo)
{
    (void)signo; /* the interruption of KVM_RUN is the whole point */
}

int iovirt_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: KVM_RUN must come back with EINTR */
    return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}

int iovirt_memfd_create(const char *name, unsigned int flags)
{
    int fd = memfd_create(name, flags | MFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}
