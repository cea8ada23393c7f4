/* A disk whose cache flush takes SLOWSYNC_US microseconds, for the benchmarks
 * (bench/README.md): preloaded, fsync() and fdatasync() make the real call, then
 * wait for a flush that starts after they were called; one flush at a time, and
 * one flush serves every caller waiting for it (as a journal commit does).
 *
 *   gcc -O2 -shared -fPIC -o /tmp/slowsync.so bench/slowsync.c -lpthread
 *   LD_PRELOAD=/tmp/slowsync.so SLOWSYNC_US=3000 .venv/bin/python bench/e2e_bench.py ...
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static unsigned long started, completed;
static int flushing;
static long delay_us = -1;

static void child(void) {
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&cv, NULL);
    started = completed = 0;
    flushing = 0;
}

static void flush_wait(void) {
    if (delay_us < 0) {
        const char *s = getenv("SLOWSYNC_US");
        delay_us = s ? atol(s) : 0;
        pthread_atfork(NULL, NULL, child);
    }
    if (delay_us <= 0) return;
    pthread_mutex_lock(&mu);
    unsigned long mine = started + 1;
    while (completed < mine) {
        if (!flushing) {
            flushing = 1;
            unsigned long gen = ++started;
            pthread_mutex_unlock(&mu);
            struct timespec ts = {delay_us / 1000000, (delay_us % 1000000) * 1000};
            while (nanosleep(&ts, &ts) != 0) {}
            pthread_mutex_lock(&mu);
            completed = gen;
            flushing = 0;
            pthread_cond_broadcast(&cv);
        } else {
            pthread_cond_wait(&cv, &mu);
        }
    }
    pthread_mutex_unlock(&mu);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    int rc = real(fd);
    flush_wait();
    return rc;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    int rc = real(fd);
    flush_wait();
    return rc;
}
