/* iovirt native helpers: the small pieces of the VMM core that want C.
 *
 * The KVM structures themselves come from <linux/kvm.h>; cffi's API mode lets the
 * compiler lay them out, so no byte offset is counted by hand anywhere in iovirt. */
#ifndef IOVIRT_NATIVE_H
#define IOVIRT_NATIVE_H

#include <stdint.h>

/* ioctl(2) wrappers that return -errno instead of touching errno, so the caller
 * needs no second call to read it.  cffi releases the GIL around them. */
int iovirt_ioctl_ptr(int fd, unsigned long request, void *arg);
int iovirt_ioctl_int(int fd, unsigned long request, unsigned long arg);

/* KVM_RUN on a vCPU fd: 0, or -errno (-EINTR when kicked). */
int iovirt_kvm_run(int vcpu_fd);

/* Install a do-nothing handler for signo without SA_RESTART.  Sending that signal to a
 * vCPU thread makes a blocking KVM_RUN return -EINTR: the standard way to kick a vCPU. */
int iovirt_install_kick_handler(int signo);

/* memfd_create(2) with MFD_CLOEXEC; -errno on failure. */
int iovirt_memfd_create(const char *name, unsigned int flags);

#endif
