/* LD_PRELOAD shim for test peers that cannot choose their bind address (Orthanc 1.10):
 *  - bind() to the IPv4/IPv6 wildcard address is rewritten to loopback, so nothing listens
 *    beyond 127.0.0.1;
 *  - pthread_attr_setstacksize() is raised to at least 8 MiB, because civetweb's 100 KiB worker
 *    stacks overflow in GDCM's JPEG 2000 decoder.
 * Build: gcc -shared -fPIC -O2 -o loopback.so loopback.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind) real_bind = dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in copy;
        memcpy(&copy, addr, sizeof copy);
        if (copy.sin_addr.s_addr == htonl(INADDR_ANY)) copy.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        return real_bind(fd, (struct sockaddr *)&copy, sizeof copy);
    }
    if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 copy;
        memcpy(&copy, addr, sizeof copy);
        if (memcmp(&copy.sin6_addr, &in6addr_any, sizeof(struct in6_addr)) == 0) copy.sin6_addr = in6addr_loopback;
        return real_bind(fd, (struct sockaddr *)&copy, sizeof copy);
    }
    return real_bind(fd, addr, len);
}

int pthread_attr_setstacksize(pthread_attr_t *attr, size_t size) {
    static int (*real_set)(pthread_attr_t *, size_t);
    if (!real_set) real_set = dlsym(RTLD_NEXT, "pthread_attr_setstacksize");
    const size_t minimum = 8u << 20;
    return real_set(attr, size < minimum ? minimum : size);
}
